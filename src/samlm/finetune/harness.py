"""Fine-tune a T5 or an encoder classifier on GLUE/SuperGLUE/QA tasks, with or without SAM.

``samlm finetune --model DIR_OR_HUB_ID --task glue/rte --data-dir glue_data --optimizer sam --out runs/rte-sam``

The Bahri et al. (2022) protocol: a pretrained T5 fine-tuned with Adafactor (constant lr 1e-3,
batch 128), optionally with efficient SAM (ascent gradient on 1/4 of the batch), on a training
set optionally subsampled to a fraction of its size; evaluated every ``--eval-every`` steps; each
task-metric reported at its best checkpoint (chosen separately per task-metric pair) and at the
final checkpoint.

Run directory (``--out``)::

    finetune.json      the resolved run configuration (checked when resuming)
    metrics.jsonl      one line per evaluation: step, train_* means, <task>/<metric>, <task>/loss
    summary.json       best and final value + step of every metric, the overall score, the config
    checkpoints/checkpoint-<step>/   weights (safetensors) + optimizer/data/RNG state

``--dry-run`` checks everything (flags, model config, data files, the run directory) and
prints the resolved settings, writing nothing. Exit codes: 0 done, 2 a mistake (one line
``samlm: error: ...``), 130 stopped by SIGINT/SIGTERM after saving a checkpoint (continue with
``--resume``); see docs/reliability.md.

Metric keys are ``<task>/<metric>`` (``glue/rte/accuracy``), or ``<task>:<split>/<metric>``
when the evaluation split is not the task's only default one (MNLI's two validation splits,
``--eval-split``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samlm import io
from samlm.errors import UserError
from samlm.finetune.formats import Example, load_generic, parse_column_mapping
from samlm.finetune.metrics import AVERAGED_TASKS, benchmark_average, compute_metrics, task_score
from samlm.finetune.tasks import (
    CLASSIFICATION,
    GENERATION,
    MIXTURES,
    REGRESSION,
    TASKS,
    MixtureSampler,
    Task,
    generic_task,
    load_task,
    parse_mixture,
    subsample,
)
from samlm.progress import say

OPTIMIZER_CHOICES = ("adamw", "adafactor", "sgd", "sam", "asam", "fsam", "psam", "pfsam")
SAM_CHOICES = ("sam", "asam", "fsam", "psam", "pfsam")
BASE_CHOICES = ("adafactor", "adamw", "sgd")
KIND_CHOICES = (CLASSIFICATION, REGRESSION, GENERATION)
RUN_CONFIG_FILE = "finetune.json"
DEFAULT_MAX_NONFINITE = 5
MAX_SEED = 2**63
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "samlm-finetune-summary"
GENERIC_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
GENERIC_SPLIT_NAMES = {"validation": ("validation", "dev", "val"), "train": ("train",), "test": ("test",)}

# Settings that must not change when a run is resumed (steps and eval/save cadence may; the
# training data is checked by its fingerprint, the architecture when the weights load).
RESUME_KEYS = (
    "model", "tasks", "columns", "labels", "kind", "optimizer", "base", "rho",
    "ascent_fraction", "m", "lr", "weight_decay", "lr_schedule", "warmup_steps", "batch",
    "grad_accum", "subsample", "subsample_seed", "mixture_limit", "seed", "max_input_length",
    "max_target_length", "max_grad_norm", "eval_split", "eval_examples",
)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default=None,
                        help="adafactor/adamw/sgd alone, or a SAM-family method around --base "
                             "(default: adafactor for T5, adamw for encoders)")
    parser.add_argument("--rho", type=float, default=None,
                        help="SAM radius (default for T5 with sam/fsam: 0.05 Small, 0.15 Base+, "
                             "0.02 mT5; otherwise the method's own default)")
    parser.add_argument("--subsample", type=float, default=1.0, metavar="RATE",
                        help="train on this fraction in (0, 1] of each training split (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order, dropout and a new head")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start over in a --out that holds a run")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the flags, model config, data and --out, print the resolved settings, "
                             "and stop (writes nothing)")


def add_run_arguments(parser, *, model_required: bool = True) -> None:
    """Flags shared by ``samlm finetune`` and the comparison grid (everything but the varied ones)."""
    parser.add_argument("--model", required=model_required, help="local model directory or hub id (T5/mT5 or an encoder)")
    parser.add_argument("--task", default=None,
                        help="task or comma-separated mixture (glue/rte, superglue, glue/rte,superglue/cb); "
                             "with --columns, a name for generic data (default 'generic')")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the official files (default: the Hugging Face hub)")
    parser.add_argument("--columns", default=None, metavar="MAPPING",
                        help="generic JSONL/CSV/TSV data in --data-dir (train.*, validation.*): "
                             "input=COL[,input2=COL][,target=COL][,answers=COL]")
    parser.add_argument("--labels", default=None, help="generic classification: comma-separated label words")
    parser.add_argument("--kind", choices=KIND_CHOICES, default=None,
                        help="generic data kind (default: classification with --labels, else generation)")
    parser.add_argument("--base", choices=BASE_CHOICES, default=None,
                        help="base optimizer of a SAM method (default: adafactor for T5, adamw for encoders)")
    parser.add_argument("--ascent-fraction", type=float, default=None,
                        help="share of each batch for SAM's ascent gradient (default 0.25, Bahri et al.)")
    parser.add_argument("--m", type=int, default=1, help="m-sharpness groups per batch (default 1)")
    parser.add_argument("--subsample-seed", type=int, default=0,
                        help="seed of the subsample (default 0: the same subset for every run)")
    parser.add_argument("--mixture-limit", type=int, default=None, metavar="K",
                        help="examples-proportional mixing with each task's size capped at K")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per optimizer step (default 128 for T5, 32 for encoders)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="split each step's batch into this many micro-batches (default 1)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 T5, 2e-5 encoders)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--lr-schedule", choices=("constant", "linear"), default="constant",
                        help="constant (the paper) or linear decay to 0; both after --warmup-steps")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip the update gradient")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="evaluate every N steps and at the end (0: only at the end)")
    parser.add_argument("--save-every", type=int, default=None,
                        help="checkpoint every N steps (default: --eval-every; always at the end)")
    parser.add_argument("--eval-split", default=None,
                        help="split to evaluate on (default: each task's validation split(s))")
    parser.add_argument("--eval-examples", type=int, default=0,
                        help="evaluate on the first N examples of each split (0: all)")
    parser.add_argument("--eval-batch", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--max-input-length", type=int, default=512, help="input tokens (truncated)")
    parser.add_argument("--max-target-length", type=int, default=128,
                        help="target tokens (truncated) and the decoding budget of generation tasks")
    parser.add_argument("--nonfinite", choices=("skip", "stop"), default="skip",
                        help="on a non-finite loss or gradient: skip the step, or stop after "
                             "--max-nonfinite in a row (exit 2); NaN weights are never saved")
    parser.add_argument("--max-nonfinite", type=int, default=DEFAULT_MAX_NONFINITE, metavar="N",
                        help=f"with --nonfinite stop: consecutive non-finite steps allowed (default "
                             f"{DEFAULT_MAX_NONFINITE})")
    parser.add_argument("--device", default="auto", help="auto (cuda:<local rank> if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32); = --mixed-precision bf16")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the model repository (off by default)")
    from samlm.train import parallel

    parallel.add_arguments(parser, device_flag=False)


def run(args: argparse.Namespace) -> int:
    plan = prepare(args)
    if getattr(args, "dry_run", False):
        print(json.dumps(plan.settings, indent=2, default=str))
        say(f"dry run: flags, model config, data and {plan.out_dir} are fine; nothing was written")
        return 0
    result = execute(plan)
    # 130: stopped by a signal before the last step (a checkpoint was saved; --resume continues).
    return 0 if result.get("completed") else 130


# --------------------------------------------------------------------------- planning


@dataclass
class EvalSet:
    task: Task
    split: str
    key: str                     # metric key prefix: "glue/rte" or "glue/mnli:validation_matched"
    examples: list[Example]


@dataclass
class Plan:
    """Everything a run needs, validated and loaded; nothing written yet."""

    settings: dict[str, Any]
    out_dir: Path
    info: Any
    tasks: list[Task]
    train: dict[str, list[Example]]
    train_sizes: dict[str, int]
    eval_sets: list[EvalSet]
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(args: argparse.Namespace) -> Plan:
    """Validate flags, read the model config and the data, resolve defaults. Writes nothing.

    Cheap checks come first, so a mistake is reported before any weights are loaded.
    """
    from samlm.finetune import modeling

    _check_numbers(args)
    _check_out_dir(args)
    tasks = _resolve_tasks(args)
    info = modeling.inspect_model(args.model, trust_remote_code=args.trust_remote_code)
    modeling.check_tasks(info, tasks)
    train, sizes, eval_sets = _load_data(args, tasks)
    settings = _resolve_settings(args, info, tasks)
    if settings["resume"] and _holds_run(Path(args.out)):
        _check_resume_config(Path(args.out), settings)
    return Plan(settings=settings, out_dir=Path(args.out), info=info, tasks=tasks, train=train,
                train_sizes=sizes, eval_sets=eval_sets, device=_device(args.device))


def _check_numbers(args) -> None:
    positive = {"--steps": args.steps, "--grad-accum": args.grad_accum, "--eval-batch": args.eval_batch,
                "--max-input-length": args.max_input_length, "--max-target-length": args.max_target_length,
                "--m": args.m}
    if args.batch is not None:
        positive["--batch"] = args.batch
    if args.mixture_limit is not None:
        positive["--mixture-limit"] = args.mixture_limit
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--eval-every", args.eval_every), ("--save-every", args.save_every),
                        ("--eval-examples", args.eval_examples), ("--warmup-steps", args.warmup_steps),
                        ("--weight-decay", args.weight_decay)):
        if value is not None and not value >= 0:  # "not >=" also catches NaN
            raise UserError(f"{flag} must be >= 0, got {value}")
    if not math.isfinite(args.weight_decay):
        raise UserError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    for flag, value in (("--seed", args.seed), ("--subsample-seed", args.subsample_seed)):
        if not 0 <= value < MAX_SEED:
            raise UserError(f"{flag} must be an integer in [0, 2**63), got {value}")
    max_nonfinite = getattr(args, "max_nonfinite", DEFAULT_MAX_NONFINITE)
    if max_nonfinite < 1:
        raise UserError(f"--max-nonfinite must be >= 1, got {max_nonfinite}")
    if not (0 < args.subsample <= 1):
        hint = f" (did you mean {args.subsample / 100:g}?)" if 1 < args.subsample <= 100 else ""
        raise UserError(f"--subsample must be in (0, 1], got {args.subsample:g}{hint}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise UserError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    sam = args.optimizer in SAM_CHOICES
    if args.optimizer is not None and not sam:
        for flag, value in (("--rho", args.rho), ("--base", args.base), ("--ascent-fraction", args.ascent_fraction)):
            if value is not None:
                raise UserError(f"{flag} applies to SAM-family optimizers ({', '.join(SAM_CHOICES)}), "
                                f"not --optimizer {args.optimizer}")
        if args.m != 1:
            raise UserError(f"--m applies to SAM-family optimizers, not --optimizer {args.optimizer}")
    if args.rho is not None and not (args.rho > 0 and math.isfinite(args.rho)):
        raise UserError(f"--rho must be > 0, got {args.rho}")
    if args.ascent_fraction is not None and not (0 < args.ascent_fraction <= 1):
        raise UserError(f"--ascent-fraction must be in (0, 1], got {args.ascent_fraction}")
    for flag, value in (("--lr", args.lr), ("--rho", args.rho), ("--weight-decay", args.weight_decay)):
        if value is not None and abs(value) > FLOAT32_MAX:
            raise UserError(f"{flag} {value:g} is beyond float32's range (<= {FLOAT32_MAX:.3g}), in which "
                            "the weights are updated")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")


def _holds_run(out: Path) -> bool:
    from samlm.train.loop import CHECKPOINTS_DIR, METRICS_FILE

    return (out / METRICS_FILE).exists() or bool(io.checkpoint_dirs(out / CHECKPOINTS_DIR))


def _check_out_dir(args) -> None:
    """Refuse an --out that is a file, or that holds a run, unless --resume/--overwrite (writes nothing)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if _holds_run(out) and not args.resume and not args.overwrite:
        raise UserError(f"{out} already holds a run (metrics.jsonl or checkpoints); "
                        "pass --resume to continue it, --overwrite to start over, or choose another --out")


def _resolve_tasks(args) -> list[Task]:
    if args.columns is not None:
        if args.task is not None and ("," in args.task or args.task.strip().lower() in {*TASKS, *MIXTURES}):
            raise UserError(
                f"--columns reads generic files, so --task names that data and must not be a registered task "
                f"or a mixture (got {args.task!r}); drop --columns to read {args.task}'s official files")
        parse_column_mapping(args.columns)
        labels = _split_list(args.labels)
        kind = args.kind or (CLASSIFICATION if labels else GENERATION)
        if kind != CLASSIFICATION and labels:
            raise UserError(f"--labels only applies to classification data, not --kind {kind}")
        return [generic_task(kind, labels or None, name=(args.task or "generic").strip())]
    if args.labels is not None or args.kind is not None:
        raise UserError("--labels and --kind describe generic data: use them with --columns")
    if not args.task:
        raise UserError("--task is required (a task such as glue/rte, a mixture, or --columns for generic data)")
    return parse_mixture(args.task)


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _load_data(args, tasks: Sequence[Task]):
    """Training examples (subsampled) and evaluation sets of every task, checked for labels."""
    train: dict[str, list[Example]] = {}
    sizes: dict[str, int] = {}
    eval_sets: list[EvalSet] = []
    for task in tasks:
        examples = _read_split(args, task, "train")
        _check_labelled(task, "train", examples, training=True)
        sizes[task.name] = len(examples)
        train[task.name] = subsample(examples, args.subsample, seed=args.subsample_seed) if args.subsample < 1 else examples
        default_splits = ("validation",) if args.columns is not None else task.eval_splits
        splits = (args.eval_split,) if args.eval_split else default_splits
        for split in splits:
            examples = _read_split(args, task, split)
            if args.eval_examples:
                examples = examples[: args.eval_examples]
            _check_labelled(task, split, examples, training=False)
            one_default = len(default_splits) == 1 and split == default_splits[0]
            key = task.name if one_default else f"{task.name}:{split}"
            eval_sets.append(EvalSet(task, split, key, examples))
    return train, sizes, eval_sets


def _read_split(args, task: Task, split: str) -> list[Example]:
    if args.columns is None:
        return load_task(task, data_dir=args.data_dir, split=split)
    if args.data_dir is None:
        raise UserError("--columns reads generic files from --data-dir; pass --data-dir")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found")
    names = GENERIC_SPLIT_NAMES.get(split, (split,))
    candidates = [data_dir / f"{name}{suffix}" for name in names for suffix in GENERIC_SUFFIXES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"no {split} file for generic data: expected {data_dir}/{names[0]}.jsonl, .csv or .tsv")
    return load_generic(path, args.columns, task.kind, list(task.labels) or None)


def _check_labelled(task: Task, split: str, examples: Sequence[Example], *, training: bool) -> None:
    for example in examples:
        if task.kind == GENERATION:
            ok = bool(example.answers or example.target)
        else:
            ok = example.label is not None
        if not ok:
            what = "train on" if training else "evaluate on"
            raise UserError(
                f"{task.name} {split}: example {example.uid} has no label (an unlabelled test split?); "
                f"cannot {what} it" + ("" if training else "; choose a labelled split with --eval-split"))


def _resolve_settings(args, info, tasks: Sequence[Task]) -> dict[str, Any]:
    from samlm.finetune.modeling import paper_defaults

    defaults = paper_defaults(info, args.optimizer)
    optimizer = args.optimizer or defaults["optimizer"]
    sam = optimizer in SAM_CHOICES
    if sam:
        base = args.base or defaults["base"]
        rho = args.rho if args.rho is not None else defaults["rho"]
        if rho is None:  # the method's own default (ASAM's scale differs from SAM's)
            rho = _method_default_rho(optimizer)
        ascent_fraction = args.ascent_fraction if args.ascent_fraction is not None else defaults["ascent_fraction"]
    else:
        base, rho, ascent_fraction = None, None, None
    batch = args.batch or defaults["batch"]
    if batch % args.grad_accum:
        raise UserError(f"--batch {batch} is not divisible by --grad-accum {args.grad_accum}")
    if sam and batch % args.m:
        raise UserError(f"--m {args.m} does not divide --batch {batch}: each of the m groups needs an equal "
                        "share of the batch's rows")
    mixed_precision = getattr(args, "mixed_precision", None)
    if args.bf16:
        if mixed_precision not in (None, "bf16"):
            raise UserError(f"--bf16 contradicts --mixed-precision {mixed_precision}")
        mixed_precision = "bf16"
    save_every = args.save_every if args.save_every is not None else args.eval_every
    return {
        "model": args.model,
        "family": info.family,
        "model_type": info.model_type,
        "t5_size": info.t5_size,
        "tasks": [t.name for t in tasks],
        "task_spec": args.task,
        "data_dir": str(args.data_dir) if args.data_dir is not None else None,
        "columns": args.columns,
        "labels": list(tasks[0].labels) if args.columns is not None else None,
        "kind": tasks[0].kind if args.columns is not None else None,
        "optimizer": optimizer,
        "base": base,
        "rho": rho,
        "ascent_fraction": ascent_fraction,
        "m": args.m if sam else None,
        "lr": args.lr if args.lr is not None else defaults["lr"],
        "weight_decay": args.weight_decay,
        "lr_schedule": args.lr_schedule,
        "warmup_steps": args.warmup_steps,
        "batch": batch,
        "grad_accum": args.grad_accum,
        "micro_batch": batch // args.grad_accum,
        "subsample": args.subsample,
        "subsample_seed": args.subsample_seed,
        "mixture_limit": args.mixture_limit,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "save_every": save_every,
        "eval_split": args.eval_split,
        "eval_examples": args.eval_examples,
        "eval_batch": args.eval_batch,
        "seed": args.seed,
        "max_input_length": args.max_input_length,
        "max_target_length": args.max_target_length,
        "max_grad_norm": args.max_grad_norm,
        "nonfinite": args.nonfinite,
        "max_nonfinite": getattr(args, "max_nonfinite", DEFAULT_MAX_NONFINITE),
        "device": args.device,
        "bf16": mixed_precision == "bf16",
        "mixed_precision": mixed_precision,
        "strategy": getattr(args, "strategy", "auto"),
        "sync_ascent": bool(getattr(args, "sync_ascent", False)),
        "trust_remote_code": args.trust_remote_code,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "defaults_from": defaults["source"],
    }


def _method_default_rho(optimizer: str) -> float:
    import inspect

    from samlm.optim import SAM_METHODS

    return float(inspect.signature(SAM_METHODS[optimizer].__init__).parameters["rho"].default)


def _device(spec: str) -> torch.device:
    from samlm.train.parallel import resolve_device

    device = resolve_device(spec)
    return device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- the training data stream


class TrainBatches:
    """Endless micro-batches from a :class:`MixtureSampler`, resumable by draw count.

    ``state_dict()`` holds the number of examples drawn and a fingerprint of the training set,
    so a resume with different data (``--task``, ``--subsample``) is refused.
    """

    def __init__(self, sampler: MixtureSampler, collate, micro_batch: int, fingerprint: str):
        self.sampler = sampler
        self.collate = collate
        self.micro_batch = micro_batch
        self.fingerprint = fingerprint
        self.draws = 0
        self._stream = sampler.iterate(0)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self):
        examples = [next(self._stream) for _ in range(self.micro_batch)]
        self.draws += len(examples)
        return self.collate(examples)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "micro_batch": self.micro_batch, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise UserError("the checkpoint was trained on other data (the tasks, data files or --subsample "
                            "changed); resume with the original flags or start over with --overwrite")
        self.draws = int(state["draws"])
        self._stream = self.sampler.iterate(self.draws)


def data_fingerprint(train: Mapping[str, Sequence[Example]]) -> str:
    h = hashlib.sha256()
    for name in sorted(train):
        for example in train[name]:
            h.update(f"{name}\t{example.uid}\t{example.target}\n".encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- evaluation and scores


def make_evaluator(fm, eval_sets: Sequence[EvalSet], batch_size: int, autocast_dtype=None):
    """``evaluate(model) -> {"<key>/<metric>": value, "<key>/loss": value}`` over every eval set."""

    def evaluate(model) -> dict[str, float]:
        record: dict[str, float] = {}
        for es in eval_sets:
            predictions, loss = fm.predict(es.task, es.examples, batch_size, autocast_dtype=autocast_dtype)
            for metric, value in compute_metrics(es.task, predictions, es.examples).items():
                record[f"{es.key}/{metric}"] = value
            record[f"{es.key}/loss"] = loss
        return record

    return evaluate


def overall_score(values: Mapping[str, float], eval_keys: Mapping[str, Sequence[str]],
                  tasks: Mapping[str, Task]) -> tuple[str, float | None]:
    """The run's one-number score from metric values (``<key>/<metric>`` -> value).

    Mean over tasks of each task's mean over its evaluation splits of ``task_score`` (the mean
    of its official metrics). When the tasks are exactly GLUE's or SuperGLUE's averaged set,
    this is T5's benchmark average and is named so.
    """
    per_key: dict[str, dict[str, float]] = {}
    for name, keys in eval_keys.items():
        for key in keys:
            metrics = {m: values.get(f"{key}/{m}") for m in tasks[name].metrics}
            if any(v is None for v in metrics.values()):
                return _score_name(eval_keys), None
            per_key[key] = metrics
    names = set(eval_keys)
    for benchmark, members in AVERAGED_TASKS.items():
        if names == set(members):
            try:
                return f"{benchmark} average", benchmark_average(per_key, benchmark)
            except UserError:
                break  # evaluated on other splits: fall back to the plain mean
    task_means = [sum(task_score(tasks[n], per_key[k]) for k in keys) / len(keys) for n, keys in eval_keys.items()]
    return _score_name(eval_keys), sum(task_means) / len(task_means)


def _score_name(eval_keys: Mapping[str, Sequence[str]]) -> str:
    names = set(eval_keys)
    for benchmark, members in AVERAGED_TASKS.items():
        if names == set(members):
            return f"{benchmark} average"
    return "mean task score"


def build_summary(result, plan: Plan, extra: Mapping[str, Any]) -> dict:
    """``summary.json``: best/final value and step of each metric, the score, the config."""
    loop = result.summary()
    best = result.best()
    final = result.final or {}
    metrics = {}
    for key, b in best.items():
        metrics[key] = {"best": b["value"], "best_step": b["step"], "mode": b["mode"],
                        "final": final.get(key), "final_step": final.get("step")}
    tasks = {t.name: t for t in plan.tasks}
    eval_keys: dict[str, list[str]] = {}
    for es in plan.eval_sets:
        eval_keys.setdefault(es.task.name, []).append(es.key)
    name, best_score = overall_score({k: v["best"] for k, v in metrics.items()}, eval_keys, tasks)
    _, final_score = overall_score({k: v["final"] for k, v in metrics.items() if v["final"] is not None},
                                   eval_keys, tasks)
    return io.json_safe({
        "format": SUMMARY_FORMAT,
        "version": 1,
        "completed": loop["completed"],
        "interrupted": loop["interrupted"],
        "step": loop["step"],
        "steps": loop["steps"],
        "metrics": metrics,
        "score": {"name": name, "best": best_score, "final": final_score,
                  "note": "best: from each task-metric's best checkpoint (Bahri et al.); final: last evaluation"},
        "config": plan.settings,
        "model": {**plan.info.describe(), **extra.get("model", {})},
        "parallel": extra.get("parallel", {"world_size": 1}),
        "data": {
            name: {"train_examples": len(plan.train[name]), "train_examples_before_subsample": plan.train_sizes[name],
                   "eval": {es.key: {"split": es.split, "examples": len(es.examples)}
                            for es in plan.eval_sets if es.task.name == name}}
            for name in plan.train
        },
        "loop": loop,
    })


# --------------------------------------------------------------------------- running


def execute(plan: Plan) -> dict:
    """Load the model, train, write ``summary.json``; returns the summary."""
    from samlm import distributed
    from samlm.finetune.modeling import load_finetune_model
    from samlm.optim import build_optimizer
    from samlm.train import parallel
    from samlm.train.loop import LoopConfig, clear_run, train

    s = plan.settings
    out = plan.out_dir
    holds_run = _holds_run(out)
    if holds_run and not s["resume"] and not s["overwrite"]:
        raise UserError(f"{out} already holds a run (metrics.jsonl or checkpoints); "
                        "pass --resume to continue it, --overwrite to start over, or choose another --out")
    if s["resume"] and holds_run:
        _check_resume_config(out, s)

    info = parallel.setup(s["device"])
    distributed.check_batch_split(s["micro_batch"], info.world_size, "--batch / --grad-accum (the micro-batch)")
    first_task = plan.tasks[0]
    fm = load_finetune_model(plan.info, first_task, seed=s["seed"], max_input_length=s["max_input_length"],
                             max_target_length=s["max_target_length"], device=info.device)
    par = parallel.parallelize(fm.model, info, strategy=s["strategy"], sync_ascent=s["sync_ascent"],
                               mixed_precision=s["mixed_precision"], sam=s["base"] is not None)
    if par.strategy == "fsdp" and "adafactor" in (s["optimizer"], s["base"]):
        raise UserError("Adafactor's factored second moments need whole weight matrices, which FSDP shards "
                        "across processes: use --base adamw (or --optimizer adamw) with FSDP, or DDP")
    if s["resume"] and holds_run:
        _check_resume_parallel(out, par.describe())
    model = par.module
    try:
        optimizer = build_optimizer(
            s["optimizer"], model.parameters(), base=s["base"] or "adamw", lr=s["lr"], rho=s["rho"],
            ascent_fraction=s["ascent_fraction"] if s["ascent_fraction"] is not None else 0.25,
            m=s["m"] or 1, weight_decay=s["weight_decay"], sam_kwargs=par.sam_kwargs)
    except ValueError as exc:
        raise UserError(f"cannot build optimizer {s['optimizer']}: {exc}") from None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(s["lr_schedule"], s["warmup_steps"], s["steps"]))
    sampler = MixtureSampler(plan.train, limit=s["mixture_limit"], seed=s["seed"])
    batches = distributed.shard_batches(TrainBatches(sampler, fm.collate, s["micro_batch"], data_fingerprint(plan.train)),
                                        info.rank, info.world_size)
    evaluate = make_evaluator(fm, plan.eval_sets, s["eval_batch"], autocast_dtype=par.autocast_dtype)

    # Written only now that everything loaded: a failed start leaves no trace in --out.
    if info.is_main:
        if not (s["resume"] and holds_run):
            # Starting over: the old run goes before the new finetune.json comes, so a crash in
            # between cannot pair the new settings with the old checkpoints.
            clear_run(out)
        io.atomic_write_json(out / RUN_CONFIG_FILE, dict(s, parallel=par.describe()))
    total = sum(len(v) for v in plan.train.values())
    say(f"fine-tuning {plan.info.spec} ({plan.info.family}, {plan.info.model_type}) on {', '.join(plan.train)}: "
        f"{total} training examples, {s['optimizer']}"
        + (f"[{s['base']}, rho={s['rho']:g}, ascent fraction {s['ascent_fraction']:g}]" if s["base"] else "")
        + f", lr {s['lr']:g}, batch {s['batch']}, {s['steps']} steps (defaults: {s['defaults_from']})")

    config = LoopConfig(
        out_dir=out, steps=s["steps"], eval_every=s["eval_every"], save_every=s["save_every"],
        grad_accum=s["grad_accum"], max_grad_norm=s["max_grad_norm"], nonfinite=s["nonfinite"],
        max_consecutive_nonfinite=s.get("max_nonfinite", DEFAULT_MAX_NONFINITE),
        resume=s["resume"], overwrite=s["overwrite"], seed=s["seed"],
    )
    result = train(par.model, optimizer, batches, config=config, evaluate=evaluate, scheduler=scheduler,
                   forward=functools.partial(fm.forward, module=par.model), loss=fm.loss,
                   scaler=par.scaler, step_kwargs=par.step_kwargs)
    summary = build_summary(result, plan, {"model": {"parameters": sum(p.numel() for p in model.parameters())},
                                           "parallel": par.describe()})
    if info.is_main:
        io.atomic_write_json(out / SUMMARY_FILE, summary)
    _report(summary, out)
    distributed.barrier()
    return summary


def _check_resume_parallel(out: Path, now: Mapping[str, Any]) -> None:
    """The processes, strategy and precision of a resumed run are those it was saved with."""
    try:
        before = json.loads((out / RUN_CONFIG_FILE).read_text()).get("parallel")
    except (OSError, ValueError, AttributeError):
        return  # _check_resume_config has reported an unreadable file already
    if before is None:
        before = {"world_size": 1}
    changed = [k for k in before if before.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"--resume with a different launch: {k} was {before[k]!r}, now {now.get(k)!r}; "
                        "resume with the same number of processes, --strategy and --mixed-precision, "
                        "or start over with --overwrite")


def _schedule(kind: str, warmup: int, steps: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (steps - step) / max(1, steps - warmup))
        return 1.0

    return factor


def _check_resume_config(out: Path, settings: Mapping[str, Any]) -> None:
    path = out / RUN_CONFIG_FILE
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({type(exc).__name__}: {exc}); cannot check that --resume continues "
                        "the same run; start over with --overwrite") from None
    if not isinstance(previous, dict):
        raise UserError(f"{path} is not a samlm finetune configuration; start over with --overwrite")
    changed = [k for k in RESUME_KEYS if k in previous and not _same_setting(k, previous[k], settings.get(k))]
    if changed:
        k = changed[0]
        raise UserError(f"--resume with different settings: {k} was {previous[k]!r}, now {settings.get(k)!r}; "
                        "resume with the original flags, or start over with --overwrite")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if key == "model" and isinstance(old, str) and isinstance(new, str) and old != new:
        # The same local directory spelled differently ("t5" and "./t5") is the same model.
        before, now = Path(old).expanduser(), Path(new).expanduser()
        return before.exists() and now.exists() and before.resolve() == now.resolve()
    return old == new


def _report(summary: Mapping[str, Any], out: Path) -> None:
    for key, m in summary["metrics"].items():
        if key.endswith("/loss"):
            continue
        final = "n/a" if m["final"] is None else f"{m['final']:.2f}"
        say(f"{key}: best {m['best']:.2f} (step {m['best_step']}), final {final} (step {m['final_step']})")
    score = summary["score"]
    if score["best"] is not None:
        final = "n/a" if score["final"] is None else f"{score['final']:.2f}"
        say(f"{score['name']}: {score['best']:.2f} from best checkpoints, {final} final")
    say(f"wrote {out / SUMMARY_FILE}")
