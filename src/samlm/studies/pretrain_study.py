"""The pretraining study of Singh et al. (2025): ``samlm study pretrain``.

For each model size, two stages of :func:`samlm.studies.compare.compare` runs:

1. **sweep**: every method at every point of its (lr, ρ) grid, on the sweep seeds, equal steps,
   no sharpness (``OUT/<size>/sweep``);
2. **final**: every method at its tuned point (the lowest val loss on the *tuning* slice of the
   validation split, mean over the sweep seeds), on every seed, at equal steps *and* at equal
   compute, with the sharpness measurements at the end (``OUT/<size>/final``).

Then ``OUT/report.md`` holds the analogue of the paper's Tables 2-4 for every size: the loss on
the disjoint *report* slice, the paired Δ to AdamW under each budget, and λ_max of the Hessian,
the Gauss-Newton matrix, the functional part of the Hessian and the preconditioned Hessian
P^-1/2 H P^-1/2. ``OUT/study.json`` records the chosen points. Every stage skips finished runs and
resumes interrupted ones, so rerunning the command continues a study.

Presets (:data:`PRESETS`): ``cpu`` fits a 2-core machine (docs/results.md has its time; 3 seeds and a
1-seed sweep, where the GPU presets have 5 and 2, to keep it); ``cpu-bpe``
is the same protocol on a 2x32 model with a byte-level BPE of 512 tokens trained on the corpus; ``gpu-24m`` and
``gpu-118m`` are the paper-like settings on C4, for a GPU. A preset with a data budget (the GPU
ones) first prepares its corpus once into ``OUT/data`` (C4's own validation split; exactly the
training tokens its runs read: 20 tokens per parameter of the largest size, times the
equal-compute factor of the cheapest method), which every run then memory-maps.
``PretrainStudy.overrides`` replaces the preset's data, tokenizer, device and precision settings.

``bases`` (``--bases adamw,muon``): the whole protocol once around each base optimizer, the plain
base (``adamw``, or ``muon``: Muon+AdamW) taking AdamW's place as the reference and its lr grid;
a base other than AdamW writes under ``OUT/<size>/<base>/``. ``cpu-muon`` runs the cpu preset's
2x32 model around Muon; ``gpu-24m-muon`` the 24M llama-style model around AdamW and Muon.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from samlm import io
from samlm.data import Budget, is_prepared_dir
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.config import TextDataSettings
from samlm.harness.settings import setting
from samlm.progress import say
from samlm.studies.compare import COMPUTE_SUFFIX, CompareConfig, CompareResult, compare
from samlm.studies.demo import CPU_RUN
from samlm.studies.grid import (
    StudySettings,
    check_optimizers,
    check_out_dir,
    check_seeds,
    parse_optimizers,
    parse_seeds,
    study_seconds,
    study_time_text,
)
from samlm.studies.runs import REPORT_KEY, Column, group_runs, load_run, seed_values, tuned_point
from samlm.studies.stats import edge_mark, format_delta, format_mean_std, mean_std, paired_delta, value_text

STUDY_OPTIMIZERS = ("adamw", "sam", "fsam", "psam", "pfsam")
STUDY_FILE = "study.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class ModelSize:
    """One model size of the study: its directory name and its shape."""

    name: str
    layers: int
    width: int
    heads: int


@dataclass(frozen=True)
class StudyPreset:
    """Everything a study runs, except where it writes."""

    description: str
    sizes: tuple[ModelSize, ...]
    base: PretrainConfig
    lr: str  # the sweep's lr grid (samlm.studies.grid syntax)
    rho: str  # the sweep's ρ grid
    sweep_seeds: tuple[int, ...] = (0, 1)  # two seeds steady the choice; five final seeds give intervals power
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    jobs: int = 1
    minutes: str = ""  # what it took, where it was measured (docs/results.md)
    data_tokens: tuple[int, int] | None = None  # (training, validation) tokens to prepare into OUT/data first
    bases: tuple[str, ...] = ("adamw",)  # the base optimizers the protocol runs around, each in turn


def _grid(values: Mapping[str, Sequence[str]]) -> str:
    return ",".join(f"{method}={value}" for method, grid in values.items() for value in grid)


# The CPU grid spans the sweep of the 2x40 demo (until 2026-12-03; the demo now sweeps this grid): factors of 2 around
# each method's best lr there (psam starts from pfsam's: the two share the preconditioned ε), one
# more step on the side where a first 3-point grid chose its edge. The report marks a choice on
# the grid's edge.
CPU_LR = _grid(
    {
        "adamw": ("2.4e-2", "4.8e-2", "9.6e-2", "1.92e-1"),
        "sam": ("6e-3", "1.2e-2", "2.4e-2", "4.8e-2"),
        "fsam": ("6e-3", "1.2e-2", "2.4e-2", "4.8e-2"),
        "psam": ("3e-3", "6e-3", "1.2e-2", "2.4e-2"),
        "pfsam": ("6e-3", "1.2e-2", "2.4e-2", "4.8e-2"),
    }
)
# Around Muon every method is swept on one grid centred on the base's best lr: a first sweep on
# CPU_LR put SAM, F-SAM and PF-SAM at its top edge (4.8e-2, Muon's own optimum), docs/results.md §7.
CPU_MUON_LR = _grid(
    {method: ("1.2e-2", "2.4e-2", "4.8e-2", "9.6e-2") for method in ("sam", "fsam", "psam", "pfsam")}
    | {"adamw": ("2.4e-2", "4.8e-2", "9.6e-2", "1.92e-1")}
)
CPU_RHO = _grid({"sam": ("0.05", "0.1"), "fsam": ("0.05", "0.1"), "psam": ("0.1", "0.2"), "pfsam": ("0.1", "0.2")})
# Singh et al. tune AdamW's lr and each method's ρ around it at ~1e-3 (Adam-scale ε for the
# preconditioned variants: ρ is a radius in the P-metric).
GPU_LR = _grid(
    {
        "adamw": ("5e-4", "1e-3", "2e-3"),
        "sam": ("5e-4", "1e-3", "2e-3"),
        "fsam": ("5e-4", "1e-3", "2e-3"),
        "psam": ("5e-4", "1e-3", "2e-3"),
        "pfsam": ("5e-4", "1e-3", "2e-3"),
    }
)
GPU_RHO = _grid({"sam": ("0.01", "0.05"), "fsam": ("0.01", "0.05"), "psam": ("0.05", "0.2"), "pfsam": ("0.05", "0.2")})

# The GPU presets' run settings (the robustness study's gpu-24m preset starts from them too).
GPU_BASE = PretrainConfig(
    arch="llama",
    context=512,
    data="allenai/c4:en",
    tokenizer="gpt2",
    batch=256,
    tokens_per_param=20,
    eval_every=500,
    val_batches=32,
    sharpness_every=0,
    sharpness_iters=20,
    sharpness_batches=4,
    sharpness_batch_size=16,
    mixed_precision="bf16",
    compile=True,
    device="cuda",
    progress=False,
)

# What the GPU presets prepare (tests/test_studies.py recomputes both from the sizes). Training: the
# tokens of the longest run, AdamW's at equal compute on the largest size (20 tokens/param x 1.5, the
# cost of F-SAM's step; GPT-2's 50257 tokens; batch 256 x context 512 per step), plus the token that
# ends the last window. Validation: both slices, 2 x 32 batches of 256 windows of 512 tokens, plus one.
GPU_24M_TOKENS = (705_691_649, 8_388_609)
GPU_118M_TOKENS = (3_706_585_089, 8_388_609)
OVERRIDES_GROUP = "overrides of the preset's run settings"
STUDY_OVERRIDES = (
    "data",
    "tokenizer",
    "max_chars",
    "device",
    "mixed_precision",
    "compile",
    "report_to",
    "run_name",
    "log_every",
)

# The CPU presets keep 3 seeds, a 1-seed sweep: 5 and 2 would take cpu's ~28 minutes on 2 cores to ~50.
CPU_SEEDS: dict[str, Any] = {"sweep_seeds": (0,), "seeds": (0, 1, 2)}
PRESETS: dict[str, StudyPreset] = {
    "cpu": StudyPreset(
        "two byte-level GPT-2 models (2x32 and 2x40, context 64) on Tiny Shakespeare, 20 tokens/param",
        (ModelSize("2x32", 2, 32, 4), ModelSize("2x40", 2, 40, 4)),
        CPU_RUN,
        CPU_LR,
        CPU_RHO,
        jobs=2,
        minutes="docs/results.md",
        **CPU_SEEDS,
    ),
    "cpu-bpe": StudyPreset(
        "a 2x32 GPT-2 model (context 64) on Tiny Shakespeare with a byte-level BPE of 512 tokens trained on its "
        "training split, 20 tokens/param",
        (ModelSize("2x32-bpe512", 2, 32, 4),),
        dataclasses.replace(CPU_RUN, tokenizer="bpe:512"),
        CPU_LR,
        CPU_RHO,
        jobs=2,
        minutes="docs/results.md",
        **CPU_SEEDS,
    ),
    "gpu-24m": StudyPreset(
        "a ~24M-parameter llama-style model (GPT-2 tokenizer) on C4 (prepared once into OUT/data), 20 tokens/param",
        (ModelSize("24m", 6, 320, 5),),
        GPU_BASE,
        GPU_LR,
        GPU_RHO,
        jobs=1,
        data_tokens=GPU_24M_TOKENS,
    ),
    "gpu-118m": StudyPreset(
        "~24M and ~118M-parameter llama-style models (GPT-2 tokenizer) on C4 (prepared once into OUT/data), "
        "20 tokens/param",
        (ModelSize("24m", 6, 320, 5), ModelSize("118m", 12, 768, 12)),
        GPU_BASE,
        GPU_LR,
        GPU_RHO,
        jobs=1,
        data_tokens=GPU_118M_TOKENS,
    ),
    "cpu-muon": StudyPreset(
        "the cpu preset's 2x32 byte-level GPT-2 model on Tiny Shakespeare around Muon+AdamW (--base muon), "
        "20 tokens/param",
        (ModelSize("2x32", 2, 32, 4),),
        CPU_RUN,
        CPU_MUON_LR,
        CPU_RHO,
        jobs=2,
        minutes="docs/results.md",
        **CPU_SEEDS,
        bases=("muon",),
    ),
    "gpu-24m-muon": StudyPreset(
        "the ~24M-parameter llama-style model (GPT-2 tokenizer) on C4 around AdamW and around Muon+AdamW, "
        "20 tokens/param",
        (ModelSize("24m", 6, 320, 5),),
        GPU_BASE,
        GPU_LR,
        GPU_RHO,
        jobs=1,
        data_tokens=GPU_24M_TOKENS,
        bases=("adamw", "muon"),
    ),
}

STUDY_BASES = ("adamw", "muon")


def _for_base(spec: str, base: str) -> str:
    """A per-method grid spec with AdamW's entries given to the plain ``base`` (its reference)."""
    if base == "adamw":
        return spec
    return ",".join(
        f"{base}={item.partition('=')[2]}" if item.partition("=")[0] == "adamw" else item for item in spec.split(",")
    )


@dataclass
class PretrainStudy:
    """A study: ``preset``'s sizes × methods, written under ``out``. ``seeds`` / ``sweep_seeds`` /
    ``jobs`` / ``steps`` override the preset's (``steps``: instead of its tokens per parameter,
    for a quick look)."""

    out: str
    preset: StudyPreset
    optimizers: Sequence[str] = STUDY_OPTIMIZERS
    seeds: Sequence[int] | None = None
    sweep_seeds: Sequence[int] | None = None
    jobs: int | None = None
    steps: int | None = None
    overwrite: bool = False
    overrides: Mapping[str, object] = field(default_factory=dict)  # of STUDY_OVERRIDES: replace the preset's
    robustness: bool = False  # the final runs measure weight noise, quantization and forgetting at their end
    bases: Sequence[str] | None = None  # None: the preset's

    def base_list(self) -> tuple[str, ...]:
        return tuple(self.bases or self.preset.bases)

    def optimizers_for(self, base: str) -> list[str]:
        """The study's methods around ``base``: its plain optimizer in AdamW's place."""
        return [base if m == "adamw" else m for m in parse_optimizers(self.optimizers)]

    def stage_dir(self, size: ModelSize, stage: str, base: str) -> Path:
        return Path(self.out) / size.name / stage if base == "adamw" else Path(self.out) / size.name / base / stage

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(STUDY_OVERRIDES))
        if unknown:
            raise UserError(f"a study cannot override {', '.join(unknown)} (only {', '.join(STUDY_OVERRIDES)})")

    def configured(self) -> PretrainConfig:
        """The preset's run settings with the overrides, as given (``data`` a raw spec or a directory)."""
        changes: dict[str, Any] = {k: v for k, v in self.overrides.items() if v is not None}
        return dataclasses.replace(self.preset.base, **changes)

    def base_config(self) -> PretrainConfig:
        """The run settings (data: the prepared ``OUT/data`` once it exists)."""
        base = self.configured()
        if self.preset.data_tokens is not None and not is_prepared_dir(base.data) and is_prepared_dir(self.data_dir()):
            base = dataclasses.replace(base, data=str(self.data_dir()), tokenizer=None, max_chars=None)
        return base

    def data_dir(self) -> Path:
        return Path(self.out) / "data"

    def data_budget(self) -> Budget | None:
        """What a preset with a data budget prepares into ``OUT/data`` (None: the runs use the cache)."""
        if self.preset.data_tokens is None:
            return None
        train, val = self.preset.data_tokens
        return Budget(max_tokens=train, val_tokens=val)

    def prepare_data(self) -> None:
        """Prepare the preset's corpus once into ``OUT/data`` (resumable, idempotent)."""
        import os

        from samlm.data import prepare
        from samlm.data.store import META_FILE

        budget, source = self.data_budget(), self.configured()
        if budget is None or (self.data_dir() / META_FILE).exists() or is_prepared_dir(source.data):
            return  # no budget, prepared by an earlier call, or a prepared --data given
        tokenizer = source.tokenizer or "bytes"
        say(
            f"study data: preparing {source.data} ({budget.max_tokens:,} training, {budget.val_tokens:,} "
            f"validation tokens, tokenizer {tokenizer}) into {self.data_dir()}"
        )
        prepare(
            source.data,
            self.data_dir(),
            tokenizer=tokenizer,
            budget=budget,
            max_chars=source.max_chars,
            workers=max(1, os.cpu_count() or 1),
            trust_remote_code=source.trust_remote_code,
            progress=True,
        )

    def _base(self, size: ModelSize, base: str = "adamw") -> PretrainConfig:
        budget: dict[str, Any] = {} if self.steps is None else {"steps": self.steps, "tokens_per_param": None}
        return dataclasses.replace(
            self.base_config(), layers=size.layers, width=size.width, heads=size.heads, base=base, **budget
        )

    def _common(self, base: str = "adamw") -> dict:
        return dict(optimizers=self.optimizers_for(base), overwrite=self.overwrite, jobs=self.jobs or self.preset.jobs)

    def sweep(self, size: ModelSize, base: str | None = None) -> CompareConfig:
        """Stage 1: every (lr, ρ) of the grid on the sweep seeds, equal steps, no sharpness."""
        base = base or self.base_list()[0]
        optimizers = self.optimizers_for(base)
        around = "" if base == "adamw" else f" around {base}"
        return CompareConfig(
            out=str(self.stage_dir(size, "sweep", base)),
            seeds=parse_seeds(self.sweep_seeds or self.preset.sweep_seeds),
            rho=_restrict(self.preset.rho, optimizers),
            lr=_restrict(_for_base(self.preset.lr, base), optimizers),
            base=dataclasses.replace(self._base(size, base), sharpness=False),
            budget="steps",
            title=f"samlm study pretrain, {size.name}{around}: the (lr, ρ) sweep",
            **self._common(base),
        )

    def _final_base(self, size: ModelSize, base: str = "adamw") -> PretrainConfig:
        if not self.robustness:
            return self._base(size, base)
        from samlm.harness.pretrain.robustness import group_size_for

        return dataclasses.replace(self._base(size, base), robustness=True, quant_group_size=group_size_for(size.width))

    def final(
        self, size: ModelSize, chosen: Mapping[str, tuple[float | None, float]], base: str | None = None
    ) -> CompareConfig:
        """Stage 2: each method at its ``chosen`` (ρ, lr), every seed, equal steps and equal compute."""
        base = base or self.base_list()[0]
        rho = ",".join(f"{m}={r:g}" for m, (r, _) in chosen.items() if r is not None) or None
        lr = ",".join(f"{m}={lr:g}" for m, (_, lr) in chosen.items())
        around = "" if base == "adamw" else f" around {base}"
        return CompareConfig(
            out=str(self.stage_dir(size, "final", base)),
            seeds=parse_seeds(self.seeds or self.preset.seeds),
            rho=rho,
            lr=lr,
            base=self._final_base(size, base),
            budget="steps,compute",
            lr_in_names=True,
            title=f"samlm study pretrain, {size.name}{around}: tuned methods, equal steps and equal compute",
            **self._common(base),
        )


@dataclass
class PretrainStudySettings(StudySettings):
    """study"""

    preset: str = settings.override(
        StudySettings,
        "preset",
        choices=tuple(PRESETS),
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    out: str = settings.override(StudySettings, "out", default="runs/study-pretrain")
    optimizers: str = setting(
        ",".join(STUDY_OPTIMIZERS),
        "comma-separated methods (must include adamw)",
        check=check_optimizers,
        group="study",
    )
    sweep_seeds: str | None = setting(
        None,
        "comma-separated seeds of the sweep",
        default_text="the preset's",
        check=check_seeds,
        group="study",
    )
    # The pretraining settings themselves (one definition), as overrides of the preset's.
    data: str | None = settings.override(
        TextDataSettings, "data", default=None, default_text="the preset's", group=OVERRIDES_GROUP
    )
    tokenizer: str | None = settings.override(
        TextDataSettings, "tokenizer", default_text="the preset's", group=OVERRIDES_GROUP
    )
    max_chars: int | None = settings.override(TextDataSettings, "max_chars", group=OVERRIDES_GROUP)
    device: str | None = settings.override(
        settings.ParallelSettings, "device", default=None, default_text="the preset's", group=OVERRIDES_GROUP
    )
    mixed_precision: str | None = settings.override(
        settings.ParallelSettings, "mixed_precision", default_text="the preset's", group=OVERRIDES_GROUP
    )
    robustness: bool = setting(
        False,
        "the final runs also measure weight noise, int8/int4 quantization and forgetting "
        "(docs/robustness.md; int4 groups of 32, or of the model width where 32 does not divide "
        "it)",
        group="study",
    )
    bases: str | None = setting(
        None,
        "comma-separated base optimizers: the whole study around each (adamw; muon: "
        "Muon on the hidden matrices + AdamW, its plain run the reference)",
        default_text="the preset's",
        check=cast(settings.Check, lambda flag, value: parse_bases(value)),
        group="study",
    )

    def study(self) -> PretrainStudy:
        """The study these settings describe."""
        overrides = {
            name: getattr(self, name)
            for name in ("data", "tokenizer", "max_chars", "device", "mixed_precision")
            if getattr(self, name) is not None
        }
        overrides.update(self.tracking())
        return PretrainStudy(
            out=self.out,
            preset=PRESETS[self.preset],
            optimizers=parse_optimizers(self.optimizers),
            seeds=None if self.seeds is None else parse_seeds(self.seeds),
            sweep_seeds=None if self.sweep_seeds is None else parse_seeds(self.sweep_seeds),
            jobs=self.jobs,
            steps=self.steps,
            overwrite=self.overwrite,
            overrides=overrides,
            robustness=self.robustness,
            bases=None if self.bases is None else parse_bases(self.bases),
        )


def parse_bases(value: str) -> tuple[str, ...]:
    bases = tuple(b.strip() for b in str(value).split(",") if b.strip())
    unknown = [b for b in bases if b not in STUDY_BASES]
    if not bases or unknown or len(set(bases)) != len(bases):
        raise UserError(f"--bases must be distinct base optimizers among {', '.join(STUDY_BASES)}, got {value!r}")
    return bases


def _restrict(spec: str, optimizers: Sequence[str]) -> str | None:
    """The part of a per-method grid spec that names one of ``optimizers``."""
    kept = [item for item in spec.split(",") if item.partition("=")[0] in optimizers]
    return ",".join(kept) or None


def choose(sweep_dir: Path, runs: Sequence[str], optimizers: Sequence[str]) -> dict[str, tuple[float | None, float]]:
    """Each method's (ρ, lr) with the lowest mean tuning-slice val loss over the sweep seeds."""
    groups = group_runs([load_run(sweep_dir / name) for name in runs])
    chosen = {}
    for optimizer in optimizers:
        key = tuned_point(groups, optimizer)
        if key is None:
            raise UserError(f"the sweep in {sweep_dir} has no finished {optimizer} run to choose from")
        chosen[optimizer] = (key[1], key[2])
    return chosen


@dataclass
class StudyResult:
    out: Path
    stages: dict[str, CompareResult] = field(default_factory=dict)  # "<size>/sweep", "<size>/final"
    chosen: dict[str, dict] = field(default_factory=dict)  # size -> method -> {"rho", "lr"}
    interrupted: str | None = None
    seconds: float = 0.0
    time: dict = field(default_factory=dict)  # grid.study_seconds: the total over every call


def run_study(study: PretrainStudy) -> StudyResult:
    """Run (or continue) every stage of every size, then write ``report.md`` and ``study.json``."""
    started = time.perf_counter()
    out = check_out_dir(study.out)
    optimizers = parse_optimizers(study.optimizers)
    if "adamw" not in optimizers:
        raise UserError("the pretraining study compares against AdamW: --optimizers must include adamw")
    stages = [(size, base) for size in study.preset.sizes for base in study.base_list()]
    for size, base in stages:  # every stage's settings before anything runs
        study.sweep(size, base).runs()
    study.prepare_data()
    result = StudyResult(out=out)
    for size, base in stages:
        key = size_key(size, base)
        say(f"study {key}: sweep")
        sweep_config = study.sweep(size, base)
        sweep = compare(sweep_config)
        result.stages[f"{key}/sweep"] = sweep
        if not sweep.completed:
            result.interrupted = sweep.interrupted or "unfinished sweep runs"
            break
        chosen = choose(Path(sweep_config.out), list(sweep.summaries), study.optimizers_for(base))
        result.chosen[key] = {m: {"rho": r, "lr": lr} for m, (r, lr) in chosen.items()}
        say(
            f"study {key}: tuned "
            + ", ".join(f"{m} lr={lr:g}" + ("" if r is None else f" ρ={r:g}") for m, (r, lr) in chosen.items())
        )
        final = compare(study.final(size, chosen, base))
        result.stages[f"{key}/final"] = final
        if not final.completed:
            result.interrupted = final.interrupted or "unfinished final runs"
            break
    result.seconds = time.perf_counter() - started
    result.time = study_seconds(out / STUDY_FILE, result.seconds, restart=study.overwrite)
    write_study(out, study, result)
    return result


def size_key(size: ModelSize, base: str) -> str:
    """A stage's name: the size, and the base when it is not AdamW ("2x32", "2x32/muon")."""
    return size.name if base == "adamw" else f"{size.name}/{base}"


# --------------------------------------------------------------------------- the report

# The Tables 2-4 columns: the loss the choice did not see, and the four curvatures.
TABLE_COLUMNS = (
    Column("report_loss", "report loss", ".4f"),
    Column("hessian_lambda_max", "λ_max(H)", ".3g"),
    Column("gauss_newton_lambda_max", "λ_max(GN)", ".3g"),
    Column("functional_lambda", "λ_max(H_F)", ".3g"),
    Column("preconditioned_lambda_max", "λ_max(P⁻¹H)", ".3g"),
)


def size_table(
    final_dir: Path,
    names: Sequence[str],
    grid: Mapping[str, Mapping[str, list]] | None = None,
    reference: str = "adamw",
) -> str:
    """Markdown: one row per method at its tuned point (equal steps): report loss, the paired Δ
    report loss to AdamW at equal steps and at equal compute, and the sharpness columns.
    ``grid``: each method's swept values (``{"lr": [...], "rho": [...]}``); a chosen value on the
    edge of a grid of 3 or more is marked, since the optimum may lie beyond it."""
    runs = [load_run(final_dir / name) for name in names if (final_dir / name).is_dir()]
    steps_runs = [r for r in runs if not r.name.endswith(COMPUTE_SUFFIX)]
    compute = {r.summary.get("optimizer"): r for r in runs if r.name.endswith(COMPUTE_SUFFIX)}
    budgets = {
        "steps": steps_runs,
        "compute": [r for r in runs if r.name.endswith(COMPUTE_SUFFIX)]
        + [r for r in steps_runs if r.summary.get("optimizer") not in compute],
    }
    groups = {kind: group_runs(rs) for kind, rs in budgets.items()}
    references = {kind: next((k for k in g if k[0] == reference), None) for kind, g in groups.items()}
    name = {"adamw": "AdamW", "muon": "Muon"}.get(reference, reference)
    headers = ["method", "lr", "ρ", "seeds", "steps", TABLE_COLUMNS[0].header]
    headers += [f"Δ vs {name} (equal steps)", f"Δ vs {name} (equal compute)"] + [c.header for c in TABLE_COLUMNS[1:]]
    lines = ["| " + " | ".join(headers) + " |", "|---|---:|---:|---:|---:|" + "---:|" * (len(headers) - 5)]
    order = {name: i for i, name in enumerate(STUDY_OPTIMIZERS)}
    order[reference] = order["adamw"]
    for key, members in sorted(groups["steps"].items(), key=lambda item: order.get(item[0][0], len(order))):
        swept = (grid or {}).get(key[0], {})
        cells = [
            key[0],
            value_text(key[2]) + edge_mark(key[2], swept.get("lr")),
            value_text(key[1]) + edge_mark(key[1], swept.get("rho")),
            str(len(members)),
            str(members[0].summary.get("steps")),
        ]
        cells.append(format_mean_std(*mean_std(r.summary.get("report_loss") for r in members)[:2]))
        for kind in ("steps", "compute"):
            g, ref = groups[kind], references[kind]
            mine = next((v for k, v in g.items() if k[0] == key[0]), [])
            if ref is None or not mine:
                cells.append("n/a")
            elif key[0] == reference:
                cells.append("(reference)")
            else:
                cells.append(format_delta(paired_delta(seed_values(mine, REPORT_KEY), seed_values(g[ref], REPORT_KEY))))
        for column in TABLE_COLUMNS[1:]:
            cells.append(format_mean_std(*mean_std(r.summary.get(column.key) for r in members)[:2], column.fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def swept_values(study: PretrainStudy, size: ModelSize, base: str | None = None) -> dict[str, dict[str, list]]:
    """Each method's lr and ρ values in the sweep of ``size`` (around ``base``)."""
    from samlm.studies.grid import parse_lr, parse_rho

    base = base or study.base_list()[0]
    sweep = study.sweep(size, base)
    optimizers = study.optimizers_for(base)
    lrs, rhos = parse_lr(sweep.lr, optimizers, sweep.base.lr), parse_rho(sweep.rho, optimizers)
    return {m: {"lr": lrs[m], "rho": rhos[m]} for m in optimizers}


def study_markdown(study: PretrainStudy, result: StudyResult) -> str:
    preset = study.preset
    lines = [
        "# samlm study pretrain",
        "",
        f"Preset: {preset.description}.",
        "",
        "Protocol: for every size, (1) a sweep of each method over its (lr, ρ) grid on seed(s) "
        f"{','.join(map(str, study.sweep_seeds or preset.sweep_seeds))} at equal steps; (2) each method at the "
        "point with the lowest mean val loss on the **tuning slice** of the validation split, rerun on seeds "
        f"{','.join(map(str, study.seeds or preset.seeds))} at equal steps and at equal compute (AdamW and the "
        "two-pass methods get the steps that cost what the costliest method's steps cost). Losses below are on "
        "the disjoint **report slice**, which the choice did not see. Δ: report loss minus AdamW's at the same "
        "seed, mean ± std over seed pairs (n). Sharpness at the end of the equal-steps runs: λ_max of the "
        "Hessian H, of the Gauss-Newton matrix GN, the largest eigenvalue of the functional Hessian H_F = H − GN, "
        "and λ_max(P^-1/2 H P^-1/2) with P = √v̂ + eps from the run's own optimizer state. (edge): the "
        "chosen value is the smallest or largest of its grid, so the optimum may lie beyond it.",
        "",
    ]
    for size in preset.sizes:
        for base in study.base_list():
            key = size_key(size, base)
            final = result.stages.get(f"{key}/final")
            around = (
                ""
                if base == "adamw"
                else (
                    " — around Muon+AdamW (--base muon; λ_max(P⁻¹H): P⁻¹ is Muon's "
                    "Newton–Schulz map frozen at each matrix's momentum, and AdamW's "
                    "1/(√v̂ + eps) for the rest)"
                    if base == "muon"
                    else f" — around {base}"
                )
            )
            lines += [f"## {size.name}: {size.layers} layers × {size.width} wide, {size.heads} heads{around}", ""]
            if final is None or not final.summaries:
                lines += ["Not run yet (run the same command to continue).", ""]
                continue
            sample = next(s for name, s in final.summaries.items() if not name.endswith(COMPUTE_SUFFIX))
            lines += [
                f"{sample.get('params', '?')} parameters, {sample.get('steps', '?')} steps at equal steps "
                f"({(sample.get('config') or {}).get('tokens_per_param') or 'fixed'} tokens/param). Grid and each "
                f"point: `{key}/sweep/report.md`; per-run details: `{key}/final/report.md`.",
                "",
                size_table(Path(final.out), list(final.summaries), swept_values(study, size, base), reference=base),
                "",
            ]
    if result.seconds:
        lines += [study_time_text(result.time, result.seconds)]
    return "\n".join(lines) + "\n"


def write_study(out: Path, study: PretrainStudy, result: StudyResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "format": "samlm-pretrain-study",
        "preset": study.preset.description,
        "sizes": [dataclasses.asdict(s) for s in study.preset.sizes],
        "optimizers": list(study.optimizers),
        "bases": list(study.base_list()),
        "lr_grid": study.preset.lr,
        "rho_grid": study.preset.rho,
        "chosen": result.chosen,
        "completed": result.interrupted is None,
        **(result.time or {"seconds": round(result.seconds, 1)}),
    }
    io.atomic_write_text(out / STUDY_FILE, json.dumps(record, indent=2) + "\n")
    io.atomic_write_text(out / REPORT_FILE, study_markdown(study, result))
