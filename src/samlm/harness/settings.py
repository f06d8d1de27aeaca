"""Run settings, each defined once: a dataclass field with its type, default, help and check.

The pattern of Hugging Face's ``TrainingArguments`` + ``HfArgumentParser``: a harness's config
is a dataclass made of setting groups (:class:`OptimizerSettings`, :class:`ScheduleSettings`,
:class:`BatchSettings`, :class:`LoopSettings`, :class:`ParallelSettings`, and the harness's own),
and everything else is generated from the fields:

* the command-line flags (:func:`add_arguments`; ``lr`` → ``--lr``, a ``True`` bool → ``--no-x``),
  parsed back with :func:`from_args` (only the flags given; the dataclass holds the defaults);
* the checks (:func:`validate`): one-line ``UserError`` naming the flag;
* ``config.json`` (:func:`as_dict` / :func:`from_mapping`);
* the ``--resume`` identity (:func:`identity`, :func:`differences`): fields declared
  ``resume=False`` only change what is observed or saved, never the trajectory of the weights.

Both harnesses share the common groups, so a flag means the same thing in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from samlm.errors import UserError
from samlm.optim.looksam import LookSAM
from samlm.optim.registry import BASE_OPTIMIZERS, METHODS

FLOAT32_MAX = 3.4028234663852886e38  # lr, rho, ... multiply float32 weights
MAX_SEED = 2**63  # torch.manual_seed takes a 64-bit signed seed
Check = Callable[[str, Any], object]  # check(flag, value) raises UserError (any value it returns is unused)


def setting(
    default: Any = None,
    help: str = "",
    *,
    check: Check | None = None,
    choices: tuple | None = None,
    resume: bool = True,
    cli: bool = True,
    flag: str | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    group: str | None = None,
    aliases: tuple[str, ...] = (),
    deprecated: tuple[str, ...] = (),
    required: bool = False,
) -> Any:
    """A run setting. ``resume=False``: may change between a run and its ``--resume``.
    ``cli=False``: a setting of the library API only (no flag). ``default_text``: how help shows
    a default that is resolved later (``None`` in the dataclass). ``aliases``: other flags of the
    same setting; ``deprecated``: old flags still accepted with a note (and old ``config.json``
    keys, ``--split`` → ``split``, still read). ``required``: help says so (the config's
    ``check()`` refuses its absence)."""
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "check": check,
            "choices": choices,
            "resume": resume,
            "cli": cli,
            "flag": flag,
            "metavar": metavar,
            "default_text": default_text,
            "group": group,
            "aliases": tuple(aliases),
            "deprecated": tuple(deprecated),
            "required": required,
        },
    )


# --------------------------------------------------------------------------- checks


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def nonnegative_int(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{flag} must be an integer >= 0, got {value!r}")


MAX_THREADS = 4096  # torch.set_num_threads takes a C int; far beyond any machine's cores


def threads(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_THREADS:
        raise UserError(f"{flag} must be an integer in [1, {MAX_THREADS}], got {value!r}")


def seed(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SEED:
        raise UserError(f"{flag} must be an integer in [0, 2**63), got {value!r}")


def finite(low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number within float32's range, in [low, high] (open ends as asked)."""

    def check(flag: str, value) -> None:
        ok = _number(value)
        if ok and abs(value) > FLOAT32_MAX:
            raise UserError(
                f"{flag} {value:g} is beyond float32's range (|x| <= {FLOAT32_MAX:.3g}), "
                "in which the weights are updated"
            )
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            if low is not None and high is not None:
                where = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                where = f" {'>' if low_open else '>='} {low}"
            else:
                where = ""
            raise UserError(f"{flag} must be a finite number{where}, got {value!r}")

    return check


def pair(inner: Check) -> Check:
    """Two numbers (AdamW's betas), each checked by ``inner``."""

    def check(flag: str, value) -> None:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise UserError(f"{flag} must be two numbers like 0.9,0.98, got {value!r}")
        for v in value:
            inner(flag, v)

    return check


def sam_start(flag: str, value) -> None:
    """A step (an integer >= 0) or a fraction of the run in (0, 1)."""
    ok = _number(value) and value >= 0 and (value < 1 or float(value).is_integer())
    if not ok:
        raise UserError(f"{flag} must be a step (an integer >= 0) or a fraction of the run in (0, 1), got {value!r}")


def sam_schedule(config, total_steps: int) -> dict:
    """``sam_every``/``sam_start`` of a config as ``build_optimizer`` takes them."""
    start = config.sam_start
    return {
        "sam_every": config.sam_every,
        "sam_start": start if 0 < start < 1 else int(start),
        "total_steps": total_steps,
    }


def build_run_optimizer(config, params, *, total_steps: int, sam_kwargs=None, **resolved):
    """A run's optimizer from its :class:`OptimizerSettings` (``resolved``: values a harness resolved
    in their place): what a harness trains with and ``samlm sharpness`` loads a checkpoint's state
    into. ``params``: the model (``--base muon`` splits it), or its parameters."""
    from samlm.optim import build_optimizer

    sam_kwargs = {**(sam_kwargs or {}), **_looksam_settings(config)}
    values = dict(base=config.base, lr=config.lr, rho=config.rho, weight_decay=config.weight_decay)
    values.update(betas=config.betas, eps=config.adam_eps, ascent_fraction=config.ascent_fraction, m=config.m)
    try:
        return build_optimizer(
            config.optimizer,
            params,
            sam_kwargs=sam_kwargs,
            **{**values, **resolved},
            **sam_schedule(config, total_steps),
        )
    except ValueError as exc:
        raise UserError(f"cannot build optimizer {config.optimizer}: {exc}") from None


def _looksam_settings(config) -> dict:
    """``--look-every``/``--look-alpha`` as LookSAM takes them; refused for another method."""
    if config.optimizer == "looksam":
        return {"look_every": config.look_every, "alpha": config.look_alpha}
    for name, default in (("look_every", LookSAM.default_look_every), ("look_alpha", LookSAM.default_alpha)):
        if getattr(config, name) != default:
            raise UserError(f"{flag(config, name)} applies to --optimizer looksam, not {config.optimizer}")
    return {}


def known_method(flag: str, value) -> None:
    if value not in METHODS:
        raise UserError(f"unknown optimizer '{value}' (choose from {', '.join(METHODS)})")


def _parse_pair(text: str) -> tuple[float, float]:
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be two numbers like 0.9,0.98, got '{text}'")
    return parts


# --------------------------------------------------------------------------- the shared groups


@dataclass
class OptimizerSettings:
    """optimizer and SAM"""

    optimizer: str | None = setting(
        "adamw", "a plain optimizer, or a SAM-family method around --base: " + "|".join(METHODS), check=known_method
    )
    base: str | None = setting("adamw", "the base optimizer a SAM-family method wraps", choices=BASE_OPTIMIZERS)
    rho: float | None = setting(
        None,
        "SAM's perturbation radius",
        check=finite(0.0),
        default_text=", ".join(f"{m.name} {m.default_rho:g}" for m in METHODS.values() if m.is_sam),
    )
    ascent_fraction: float | None = setting(
        0.25,
        "share of the batch for SAM's ascent gradient (Bahri et al. 0.25; 1 = classic SAM)",
        check=finite(0.0, 1.0, low_open=True),
    )
    m: int = setting(
        1,
        "SAM's m-sharpness (Foret et al.): the batch's rows in m groups, each perturbed by the ascent "
        "gradient of its own rows (its own ε); 1: one ε for the whole batch",
        check=positive_int,
        aliases=("--m-sharpness",),
    )
    lr: float | None = setting(3e-3, "peak learning rate", check=finite(0.0, low_open=True))
    weight_decay: float = setting(0.1, "decoupled weight decay", check=finite(0.0))
    sam_every: int = setting(
        1,
        "a SAM-family step every k-th step, plain base-optimizer steps between "
        "(a step then costs 1 + extra/k of a plain one)",
        check=positive_int,
    )
    sam_start: float = setting(
        0,
        "plain base-optimizer steps before this step (an integer), or before this "
        "fraction of the run (in (0, 1); 0.8: SAM in the last 20%)",
        check=sam_start,
        metavar="STEP_OR_FRACTION",
    )
    look_every: int = setting(
        LookSAM.default_look_every,
        "LookSAM: a full SAM step every K-th step, the steps between reuse its direction "
        "(a step costs about 1 + ascent_fraction/K plain ones)",
        check=positive_int,
        metavar="K",
    )
    look_alpha: float = setting(
        LookSAM.default_alpha,
        "LookSAM: the weight alpha of the reused direction, g + alpha |g| g_v/|g_v|",
        check=finite(0.0),
    )
    betas: tuple[float, float] = setting(
        (0.9, 0.98), "AdamW betas", check=pair(finite(0.0, 1.0, high_open=True)), metavar="B1,B2"
    )
    adam_eps: float = setting(1e-9, "AdamW eps", check=finite(0.0, low_open=True))


@dataclass
class ScheduleSettings:
    """schedule and budget"""

    steps: int | None = setting(None, "optimizer steps", check=positive_int)
    warmup: int | None = setting(None, "linear learning-rate warmup steps", check=nonnegative_int)
    clip: float | None = setting(
        None, "clip the update gradient's global norm (default: no clipping)", check=finite(0.0, low_open=True)
    )


@dataclass
class BatchSettings:
    """batch and seed"""

    batch: int | None = setting(32, "examples (sequences) per optimizer step", check=positive_int)
    grad_accum: int = setting(1, "split each step's batch into this many micro-batches", check=positive_int)
    seed: int = setting(0, "initial weights (or a new head), data order, dropout", check=seed)

    @property
    def micro_batch(self) -> int:
        """Examples of one micro-batch (all processes together)."""
        return cast(int, self.batch) // self.grad_accum  # set by now (finetune: by resolve())


TRACKING = "experiment trackers (watching a run)"

# --eval-every's default: a run's curves have this many points whatever its length.
EVALUATIONS_PER_RUN = 20


def resolve_eval_every(eval_every: int | None, steps: int) -> int:
    """``--eval-every`` as given, else about :data:`EVALUATIONS_PER_RUN` evaluations over ``steps``."""
    return eval_every if eval_every is not None else max(1, round(steps / EVALUATIONS_PER_RUN))


def _check_report_to(flag: str, value) -> None:
    from samlm.integrations.tracking import check_report_to

    check_report_to(flag, value)


@dataclass
class LoopSettings:
    """loop, evaluation and checkpoints"""

    eval_every: int | None = setting(
        None,
        "evaluate every N steps and at the end; 0: only at the end",
        check=nonnegative_int,
        resume=False,
        default_text=f"about {EVALUATIONS_PER_RUN} evaluations per run: steps / {EVALUATIONS_PER_RUN}",
    )
    save_every: int | None = setting(
        0, "checkpoint every N steps (0: only at the end; always on Ctrl-C)", check=nonnegative_int, resume=False
    )
    keep_checkpoints: int = setting(2, "newest checkpoints kept", check=positive_int, resume=False)
    nonfinite: str = setting(
        "skip",
        "on a NaN/Inf loss or gradient: skip the step, or stop after "
        "--max-nonfinite in a row (exit 2); NaN weights are never saved",
        choices=("skip", "stop"),
        resume=False,
    )
    max_nonfinite: int = setting(
        5, "with --nonfinite stop: consecutive non-finite steps allowed", check=positive_int, resume=False, metavar="N"
    )
    progress: bool = setting(True, "progress bar", resume=False)
    threads: int | None = setting(None, "torch CPU threads (default: torch's choice)", check=threads, resume=False)
    out: str | None = setting("runs/run", "run directory", resume=False)
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint", resume=False)
    overwrite: bool = setting(False, "start over in an --out that holds a run", resume=False)
    dry_run: bool = setting(
        False, "check flags, data, model and --out, print the resolved run; write nothing", resume=False
    )
    report_to: str = setting(
        "none",
        "experiment trackers to watch the run in, comma-separated: tensorboard, wandb, "
        "mlflow, trackio; all (every one installed) or none (docs/tracking.md)",
        check=lambda flag, value: _check_report_to(flag, value),
        resume=False,
        metavar="TRACKERS",
        group=TRACKING,
    )
    run_name: str | None = setting(
        None, "the run's name in the trackers", resume=False, default_text="--out's directory name", group=TRACKING
    )
    log_every: int = setting(
        10,
        "send the training means (loss, lr, tokens/s, step time, SAM's loss at w+eps, "
        "|g|, |eps|, SAM-step share, update-gradient norm) to the trackers every N steps",
        check=positive_int,
        resume=False,
        group=TRACKING,
    )
    run_group: str | None = setting(
        None,
        "the trackers' group of this run (W&B group, MLflow experiment, "
        "trackio project); set by compare and the studies",
        resume=False,
        cli=False,
    )


@dataclass
class ParallelSettings:
    """devices and processes (multi-GPU: torchrun --nproc-per-node N -m samlm ... or accelerate launch -m samlm ...)"""

    device: str = setting("auto", "auto (cuda:<local rank> if available, else cpu), cpu, cuda, cuda:N", resume=False)
    strategy: str = setting(
        "auto",
        "data parallelism across processes: auto (FSDP under accelerate's --use_fsdp, "
        "else DDP when launched on several processes), ddp, fsdp (FSDP2), none",
        choices=("auto", "ddp", "fsdp", "none"),
        resume=False,
    )
    sync_ascent: bool = setting(
        False,
        "average SAM's ascent gradient over processes (exact global SAM); default: "
        "each process perturbs with its own gradient (m-sharpness, m = processes)",
        resume=False,
    )
    compile: bool = setting(
        False,
        "torch.compile the model's forward (the first steps of each batch shape "
        "compile: minutes on a CPU; needs a C++ compiler there)",
        resume=False,
    )
    mixed_precision: str | None = setting(
        None,
        "no | bf16 (autocast) | fp16 (autocast + GradScaler)",
        choices=("no", "bf16", "fp16"),
        resume=False,
        default_text="accelerate's setting, else no",
    )


# --------------------------------------------------------------------------- generated from the fields


def fields(cls_or_config) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls_or_config)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def flag(cls_or_config, name: str) -> str:
    """The command-line flag of setting ``name`` (``grad_accum`` → ``--grad-accum``)."""
    return flag_of(next(f for f in fields(cls_or_config) if f.name == name))


def _types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (
        args[0]
        if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", ())) and len(args) == 1
        else hint
    )


def _group_title(cls: type, field: dataclasses.Field) -> str:
    if field.metadata.get("group"):
        return field.metadata["group"]
    for klass in cls.__mro__[1:]:  # the most derived setting group that has the field
        if dataclasses.is_dataclass(klass) and field.name in klass.__dataclass_fields__:
            return (klass.__doc__ or klass.__name__).strip().splitlines()[0]
    return "settings"


def _default_text(field: dataclasses.Field) -> str:
    if field.metadata.get("default_text"):
        return field.metadata["default_text"]
    value = field.default
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_arguments(
    parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> None:
    """One flag per CLI field of the dataclass ``cls``, grouped by setting group.

    Defaults are not put in the namespace (``argparse.SUPPRESS``): :func:`from_args` takes the
    flags given and the dataclass supplies the rest, so each default is written once."""
    types = _types(cls)
    groups: dict[str, Any] = {}
    for field in fields(cls):
        if (
            not field.metadata.get("cli", True)
            or field.name in exclude
            or (only is not None and field.name not in only)
        ):
            continue
        title = _group_title(cls, field)
        group = groups.get(title)
        if group is None:
            group = groups[title] = parser.add_argument_group(title)
        hint = _base_type(types[field.name])
        help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        name = flag_of(field)
        names = (name, *field.metadata.get("aliases", ()))
        if hint is bool:
            if field.default is True:
                names = tuple("--no-" + n[2:] for n in names)
                kwargs.update(action="store_false", help=f"no {help_text}" if help_text else None)
            else:
                kwargs.update(action="store_true", help=help_text)
            group.add_argument(*names, **kwargs)
            _add_deprecated(group, field, names[0], kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            kwargs["type"] = _parse_pair
        elif hint in (int, float, str):
            kwargs["type"] = hint
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        default = _default_text(field).replace("%", "%%")
        if field.metadata.get("required"):
            kwargs["help"] = f"{help_text} (required)"
        else:
            kwargs["help"] = f"{help_text} (default {default})" if default not in ("None", "") else help_text
        group.add_argument(*names, **kwargs)
        _add_deprecated(group, field, names[0], kwargs)


class DeprecatedFlag(argparse.Action):
    """An old flag of a setting: sets it as the current flag does, after a one-line note."""

    def __init__(self, option_strings, dest, *, current: str, flag_value: Any = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.current = current
        self.flag_value = flag_value  # a bool setting's value (the flag takes no argument)

    def __call__(self, parser, namespace, values, option_string=None):
        from samlm.progress import say

        say(f"{option_string} is deprecated and goes in the next release: use {self.current} (same effect)")
        setattr(namespace, self.dest, self.flag_value if self.nargs == 0 else values)


def _add_deprecated(group, field: dataclasses.Field, current: str, kwargs: dict[str, Any]) -> None:
    """The setting's deprecated flags: accepted, hidden from help, a note when used."""
    kwargs = dict(kwargs, help=argparse.SUPPRESS, current=current)
    action = kwargs.pop("action", None)
    if action in ("store_true", "store_false"):
        kwargs.update(nargs=0, flag_value=action == "store_true")
    for old in field.metadata.get("deprecated", ()):
        group.add_argument(old, action=DeprecatedFlag, **kwargs)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The settings of ``cls`` given on the command line."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def from_args(cls, args: argparse.Namespace, **overrides):
    """A ``cls`` from the flags given (the rest: the dataclass's defaults), then ``overrides``."""
    return cls(**{**given(args, cls), **overrides})


def validate(config) -> None:
    """Every field's own check (a ``None`` means "not set" and is not checked), then the config's
    ``check()`` for rules across fields. Choices are checked too (for configs built in Python)."""
    for field in fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{flag_of(field)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        check = field.metadata.get("check")
        if check is not None:
            check(flag_of(field), value)
    cross = getattr(config, "check", None)
    if callable(cross):
        cross()


def as_dict(config) -> dict:
    """The JSON form of a config (what ``config.json`` records)."""
    return {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in fields(config)}


def renamed(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the keys of deprecated flags (an older ``config.json``: ``split``) under
    their settings' current names."""
    old_names = {old[2:].replace("-", "_"): f.name for f in fields(cls) for old in f.metadata.get("deprecated", ())}
    return {old_names.get(k, k) if old_names.get(k, k) not in values else k: v for k, v in values.items()}


def from_mapping(cls, values: Mapping[str, Any], what: str = "setting"):
    """A ``cls`` from a mapping (a Python dict, or ``config.json``); unknown keys are refused."""
    values = renamed(cls, values)
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"unknown {what}(s): {', '.join(unknown)}")
    types = _types(cls)
    converted = {}
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(_base_type(types[key])) is tuple:
            value = tuple(value)
        converted[key] = value
    return cls(**converted)


def identity(config) -> dict:
    """The settings a resumed run must share with the run it continues."""
    return {f.name: v for f in fields(config) if f.metadata.get("resume", True) for v in [getattr(config, f.name)]}


class _Unused:
    """The identity value of a setting that does not act in a run (sharpness settings under
    ``--no-sharpness``): it matches any value, so a resume may change it."""

    def __eq__(self, other) -> bool:
        return True

    def __ne__(self, other) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "unused"


UNUSED = _Unused()


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two identity dicts (tuples and lists compare equal)."""

    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    return sorted(k for k in set(saved) | set(now) if norm(saved.get(k)) != norm(now.get(k)))


def describe_differences(saved: Mapping[str, Any], now: Mapping[str, Any], keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"{k} ({saved.get(k)!r} in the run, {now.get(k)!r} now)" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def override(group, name: str, /, **changes) -> Any:
    """``name``'s setting from ``group`` with some of its parts changed (a harness's own default,
    help or resume rule), for a field redefined in a config that extends the group."""
    field = group.__dataclass_fields__[name]
    metadata = dict(field.metadata)
    default = changes.pop("default", field.default)
    unknown = set(changes) - set(metadata)
    if unknown:
        raise TypeError(f"override({name}): unknown parts {sorted(unknown)}")
    metadata.update(changes)
    return dataclasses.field(default=default, metadata=metadata)
