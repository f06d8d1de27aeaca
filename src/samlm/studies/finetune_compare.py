"""Compare fine-tuning runs: baseline vs SAM variants x (lr, ρ) x data fractions x seeds, paper-style tables.

Two ways to use it::

    # run a grid (missing runs only; interrupted ones are resumed), then report
    samlm finetune-compare --out cmp --model t5-base --task superglue --data-dir superglue_data \\
        --optimizers adafactor,sam --subsample 0.05,0.2,1 --seeds 0,1,2 --steps 2000

    # report on runs that already exist (run directories, or directories holding them)
    samlm finetune-compare --out cmp --runs runs/

Writes into ``--out``::

    results.md    tables of the best-checkpoint and final-checkpoint metrics (mean ± std over
                  seeds), one column per task-metric plus the score (the GLUE/SuperGLUE average
                  when the runs cover the benchmark), and SAM's gain over the baseline
    results.csv   the same numbers in long form (one row per group x metric x selection)
    gains.csv     SAM − baseline per group x metric (paired by seed when possible)
    gain.png      SAM's gain in score over the baseline against the fraction of training data
    runs/         the grid's run directories (grid mode)

"Best" follows Bahri et al. (2022): every task-metric is taken at its own best checkpoint, and
the score averages those bests; "final" is the last evaluation.

``--lr`` and ``--rho`` take grids (:mod:`samlm.studies.grid`: one value, a list, or per method).
When a method ran at several (lr, ρ) points, results.md gains a "Tuned" table: per model and data
fraction, each method's point with the highest mean best-checkpoint score (:func:`tuned_groups`),
and its gain over the tuned baseline. The summaries hold one evaluation split per task, so the
point, the checkpoint and the reported number are all chosen and measured on that split.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _stdio
import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune.config import FinetuneConfig
from samlm.harness.rundir import SUMMARY_FILE, RunDir
from samlm.optim.registry import METHODS
from samlm.progress import say
from samlm.studies.compare import COMPUTE_SUFFIX
from samlm.studies.grid import (
    CompareGridSettings,
    Job,
    compute_factors,
    parse_budget,
    parse_lr,
    parse_numbers,
    parse_optimizers,
    parse_rho,
    parse_seeds,
    run_jobs,
    start_fraction,
    stretched,
    tracked,
)
from samlm.studies.report import finite_number, value_text

SELECTIONS = ("best", "final")
SCORE = "score"


# --------------------------------------------------------------------------- the grid


@dataclass
class FinetuneGridSettings(CompareGridSettings):
    """comparison"""

    # samlm compare's lr grid; a method not named runs at the model's fine-tuning lr, not pretraining's.
    lr: str | None = settings.override(
        CompareGridSettings, "lr", default_text=FinetuneConfig.__dataclass_fields__["lr"].metadata["default_text"]
    )


@dataclass
class FinetuneGrid:
    """A grid of fine-tuning runs: ``base`` for every run, varied over methods × lr × ρ × data
    fractions × seeds. Runs go to ``OUT/runs/<method>[-rho<ρ>][-lr<lr>]-sub<fraction>-seed<s>/``,
    ``-lr`` only for a method run at several learning rates (``lr``: a grid of
    :func:`samlm.studies.grid.parse_lr`; a method it does not name runs at ``base.lr``, where
    ``None`` is the model's default)."""

    out: str
    base: FinetuneConfig
    optimizers: str | None = None  # default: the model's baseline optimizer and sam
    subsample: str = "1"
    seeds: str = "0"
    rho: str | None = None
    overwrite: bool = False
    jobs: int = 1
    budget: str = "steps"  # steps | compute | steps,compute (samlm.studies.grid)
    lr: str | None = None

    def runs(self) -> list[tuple[str, FinetuneConfig, tuple[str, ...]]]:
        """``(run name, config, budgets it serves)`` for every point of the grid. At equal compute a
        cheaper method's steps, warmup and evaluation/checkpoint cadence are stretched by its
        factor (:func:`samlm.studies.grid.compute_factors`), in ``<name>-equal-compute``."""
        from samlm.models.finetune import inspect_model, paper_defaults

        info = inspect_model(self.base.model, trust_remote_code=self.base.trust_remote_code)
        baseline = paper_defaults(info)["optimizer"]
        optimizers = parse_optimizers(self.optimizers or f"{baseline},sam")
        rhos = parse_rho(self.rho, optimizers)
        lrs = parse_lr(self.lr, optimizers, self.base.lr)
        rates = parse_numbers(self.subsample, "--subsample")
        seeds = parse_seeds(self.seeds)
        budgets = parse_budget(self.budget)
        factors = compute_factors(
            optimizers,
            self.base.ascent_fraction or 0.25,
            sam_every=self.base.sam_every,
            sam_start_fraction=start_fraction(self.base.sam_start, self.base.steps),
        )
        runs = []
        for optimizer in optimizers:
            points = itertools.product(lrs[optimizer], rhos[optimizer] if self.rho is not None else [None])
            for lr, rho in points:
                for rate in rates:
                    for seed in seeds:
                        name = (
                            optimizer
                            + (f"-rho{rho:g}" if rho is not None else "")
                            + (f"-lr{lr:g}" if len(lrs[optimizer]) > 1 else "")
                            + f"-sub{rate:g}-seed{seed}"
                        )
                        sam = METHODS[optimizer].is_sam
                        config = dataclasses.replace(
                            self.base,
                            optimizer=optimizer,
                            rho=rho,
                            lr=lr,
                            subsample=rate,
                            seed=seed,
                            out=str(Path(self.out) / "runs" / name),
                            resume=False,
                            overwrite=self.overwrite,
                            **({} if sam else {"base": None, "ascent_fraction": None, "m": 1}),
                        )
                        factor = factors[optimizer] if "compute" in budgets else 1.0
                        if factor == 1.0:
                            runs.append((name, tracked(config, name, self.out), budgets))
                            continue
                        if "steps" in budgets:
                            runs.append((name, tracked(config, name, self.out), ("steps",)))
                        longer = name + COMPUTE_SUFFIX
                        runs.append(
                            (
                                longer,
                                tracked(
                                    dataclasses.replace(
                                        config,
                                        out=str(Path(self.out) / "runs" / longer),
                                        steps=stretched(config.steps, factor),
                                        warmup=stretched(config.warmup, factor),
                                        eval_every=stretched(config.eval_every, factor),
                                        save_every=stretched(config.save_every, factor),
                                    ),
                                    longer,
                                    self.out,
                                ),
                                ("compute",),
                            )
                        )
        return runs


def run_finetune(config: Mapping[str, Any], on_step=None) -> dict:
    """One run of the grid (a module-level function: worker processes import it)."""
    from samlm.harness.finetune import finetune

    return finetune(FinetuneConfig.from_mapping(config), on_step=on_step)


def run_grid(grid: FinetuneGrid) -> dict[str, list[Path]]:
    """Run every missing point of the grid (resuming interrupted ones); the run directories of
    each budget (``steps``, ``compute``)."""
    from samlm.harness.finetune import prepare

    runs = grid.runs()
    todo: list[Job] = []
    for number, (name, config, _) in enumerate(runs, start=1):
        run_dir = RunDir(config.out)
        if run_dir.finished_summary() is not None and not grid.overwrite:
            say(f"[{number}/{len(runs)}] {name}: done, skipping")
            continue
        # Resume where a checkpoint exists; otherwise start clean (a run killed before its first
        # checkpoint leaves only a partial metrics.jsonl behind).
        resume = run_dir.has_checkpoint() and not grid.overwrite
        config = dataclasses.replace(config, resume=resume, overwrite=not resume)
        try:
            prepare(dataclasses.replace(config, dry_run=True))  # every run's mistakes before any training
        except UserError as err:
            raise UserError(f"run {name}: {err}") from None
        cost = (
            METHODS[config.optimizer].step_cost(config.ascent_fraction or 0.25, sam_every=config.sam_every)
            * config.steps
        )
        todo.append(Job(number, name + (" (resuming)" if config.resume else ""), config, cost))

    interrupted = run_jobs(
        todo, len(runs), lambda job, summary: bool(summary.get("completed")), run=run_finetune, jobs=grid.jobs
    )
    if interrupted:
        raise UserError(f"the grid stopped before the end ({interrupted}); run the same command to resume")
    return {
        budget: [Path(config.out) for _, config, serves in runs if budget in serves]
        for budget in parse_budget(grid.budget)
    }


def budget_markdown(reports: Mapping[str, Report]) -> str:
    """Each method's gain in score over the baseline (best checkpoints), paired by seed, at equal
    steps and at equal compute, side by side."""
    headers = {"steps": "equal steps", "compute": "equal compute"}
    cells: dict[tuple, dict[str, str]] = {}
    for budget, report in reports.items():
        for g in report.gains:
            if g.selection == "best" and g.metric == SCORE:
                method = g.method
                n = f" (n={len(g.diffs)})" if g.paired else " (unpaired)"
                cells.setdefault((g.model, g.subsample, method), {})[budget] = _gain_text(g) + n
    lines = [
        "## Gain over the baseline at equal steps and at equal compute (best checkpoints, score)",
        "",
        "Paired by seed: mean ± std of (method − baseline) over seeds, n seed pairs. **Equal steps**: every method "
        "the same number of steps. **Equal compute**: every method the forward+backward compute of the costliest "
        "method (a backward counted as 2 forwards; cheaper methods run proportionally more steps, with warmup, "
        "evaluation and checkpoint cadence stretched), so one baseline run per seed serves every method. Each "
        "budget's full tables: this file (equal steps) and equal-compute/results.md.",
        "",
        "| model | data | method | " + " | ".join(headers[b] for b in reports) + " |",
        "|---|---:|---|" + "---:|" * len(reports),
    ]
    for (model, rate, method), by_budget in cells.items():
        lines.append(
            f"| {model} | {_percent(rate)} | {method} | " + " | ".join(by_budget.get(b, "–") for b in reports) + " |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    path: Path
    model: str
    method: str
    optimizer: str
    base: str | None
    rho: float | None
    lr: float | None
    subsample: float
    seed: int
    score_name: str
    values: dict[str, dict[str, float | None]]  # selection -> metric key (or "score") -> value
    metric_keys: list[str]
    # eval key ("glue/rte", "glue/mnli:validation_matched") -> {"split": ..., "examples": ...}
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    family: str = ""  # the method without its (lr, ρ) point: what the Tuned table picks a point for

    @property
    def is_baseline(self) -> bool:
        return not (self.optimizer in METHODS and METHODS[self.optimizer].is_sam)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (those with summary.json) among ``paths`` and their subdirectories."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"run directory {path} not found")
        if (path / SUMMARY_FILE).is_file():
            found.append(path)
            continue
        children = sorted(p.parent for p in path.rglob(SUMMARY_FILE))
        if not children:
            raise UserError(f"{path} holds no fine-tuning run (no summary.json in it or below it)")
        found.extend(children)
    return list(dict.fromkeys(found))


def _read_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None


def load_run(path: Path) -> RunRecord:
    summary = _read_summary(path / SUMMARY_FILE)
    if summary is None:
        raise UserError(f"{path} has no summary.json")
    if summary.get("format") != "samlm-finetune-summary":
        raise UserError(f"{path}/summary.json is not a samlm finetune summary")
    config = summary.get("config", {})
    metrics = summary.get("metrics", {})
    keys = [k for k in metrics if not k.endswith("/loss")]
    values = {sel: {k: finite_number(metrics[k].get(sel)) for k in keys} for sel in SELECTIONS}
    score = summary.get("score", {})
    for sel in SELECTIONS:
        values[sel][SCORE] = finite_number(score.get(sel))
    eval_sets = {
        key: dict(info)
        for task in (summary.get("data") or {}).values()
        for key, info in (task.get("eval") or {}).items()
    }
    return RunRecord(
        path=path,
        model=model_name(summary),
        method="",
        optimizer=str(config.get("optimizer")),
        base=config.get("base"),
        rho=config.get("rho"),
        lr=finite_number(config.get("lr")),
        subsample=float(config.get("subsample", 1.0)),
        seed=int(config.get("seed", 0)),
        score_name=str(score.get("name", SCORE)),
        values=values,
        metric_keys=keys,
        eval_sets=eval_sets,
    )


def model_name(summary: Mapping[str, Any]) -> str:
    """The name a run's model goes by in reports: ``--model-label``, else the name the run
    recorded (:attr:`samlm.models.finetune.ModelInfo.name`); older summaries: the ``--model`` as given."""
    config = summary.get("config", {})
    recorded = (summary.get("model") or {}).get("name")
    return str(config.get("model_label") or recorded or config.get("model", "?"))


def _label_methods(runs: Sequence[RunRecord]) -> None:
    """Method labels: ``adafactor``, ``sam rho=0.15``; ``+base`` when a SAM base differs from the
    baseline; `` lr=<lr>`` only when the optimizer ran at several learning rates (on that model),
    so that a comparison without an lr grid keeps its labels."""
    baselines = {r.optimizer for r in runs if r.is_baseline}
    lrs: dict[tuple[str, str], set] = {}
    for r in runs:
        lrs.setdefault((r.model, r.optimizer), set()).add(r.lr)
    for r in runs:
        family = r.optimizer
        if not r.is_baseline and r.base and (len(baselines) != 1 or r.base not in baselines):
            family += f"+{r.base}"
        label = family
        if not r.is_baseline and r.rho is not None:
            label += f" rho={r.rho:g}"
        if len(lrs[(r.model, r.optimizer)]) > 1 and r.lr is not None:
            label += f" lr={r.lr:g}"
        r.family, r.method = family, label


# --------------------------------------------------------------------------- aggregation


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int = 1) -> str:
        if not self.values:
            return "–"
        std = self.std
        return f"{self.mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


@dataclass
class Group:
    model: str
    subsample: float
    method: str
    is_baseline: bool
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    # A group is one point of one method (its label names everything that differs), so its first
    # run speaks for all of them.
    @property
    def family(self) -> str:
        return self.runs[0].family

    @property
    def rho(self) -> float | None:
        return self.runs[0].rho

    @property
    def lr(self) -> float | None:
        return self.runs[0].lr

    def cell(self, selection: str, key: str) -> Cell:
        return Cell([v for r in self.runs if (v := r.values[selection].get(key)) is not None])

    def by_seed(self, selection: str, key: str) -> dict[int, float]:
        return {r.seed: v for r in self.runs if (v := r.values[selection].get(key)) is not None}


@dataclass
class Gain:
    model: str
    subsample: float
    method: str
    selection: str
    metric: str
    diffs: list[float]  # paired by seed; else [mean(method) - mean(baseline)]
    paired: bool
    baseline_mean: float | None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.diffs) if self.diffs else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.diffs) if self.paired and len(self.diffs) > 1 else None

    @property
    def relative(self) -> float | None:
        if self.mean is None or not self.baseline_mean:
            return None
        return 100.0 * self.mean / abs(self.baseline_mean)


class Baseline(NamedTuple):
    """What a model's gains are over: the baseline ``family`` (``adafactor``), at its tuned point
    at each data fraction, or, when ``--baseline`` named one, the point ``label``."""

    family: str
    label: str | None = None


@dataclass
class Report:
    groups: list[Group]
    metric_keys: list[str]
    score_name: str
    gains: list[Gain]
    out_dir: Path
    baselines: dict[str, Baseline] = field(default_factory=dict)  # model -> what its gains are over

    def headline(self) -> list[str]:
        lines = []
        for g in self.gains:
            if g.selection == "best" and g.metric == SCORE and g.mean is not None:
                rel = f" ({g.relative:+.1f}%)" if g.relative is not None else ""
                lines.append(
                    f"{g.model} {_percent(g.subsample)} data: {g.method} {g.mean:+.2f} {self.score_name}{rel} "
                    "over the baseline (best checkpoints)"
                )
        return lines


def compare_runs(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, baseline: str | None = None, extra_markdown: str = ""
) -> Report:
    """Aggregate runs, write results.md (then ``extra_markdown``) / results.csv / gains.csv /
    gain.png into ``out_dir``."""
    report = build_report(run_dirs, out_dir, baseline=baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(
        out / "results.md", render_markdown(report) + (("\n" + extra_markdown) if extra_markdown else "")
    )
    io.atomic_write_text(out / "results.csv", _results_csv(report))
    io.atomic_write_text(out / "gains.csv", _gains_csv(report))
    io.atomic_write_bytes(out / "gain.png", plot_gain(report))
    return report


def compare_budgets(
    by_budget: Mapping[str, Sequence[Path]], out_dir: str | Path, *, baseline: str | None = None
) -> Report:
    """The reports of a grid run under one or both budgets: equal steps in ``out_dir`` (with the
    side-by-side gains when both ran), equal compute in ``out_dir/equal-compute`` (or in
    ``out_dir`` when it is the only one). Returns the main report."""
    out = Path(out_dir)
    if "compute" not in by_budget:
        return compare_runs(by_budget["steps"], out, baseline=baseline)
    if not by_budget.get("steps"):
        return compare_runs(by_budget["compute"], out, baseline=baseline)
    compute = compare_runs(by_budget["compute"], out / "equal-compute", baseline=baseline)
    steps = build_report(by_budget["steps"], out, baseline=baseline)
    return compare_runs(
        by_budget["steps"], out, baseline=baseline, extra_markdown=budget_markdown({"steps": steps, "compute": compute})
    )


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, baseline: str | None = None) -> Report:
    """The aggregated runs: groups, gains; nothing written."""
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise UserError("no runs to compare")
    _label_methods(runs)
    groups = _group(runs)
    keys = list(dict.fromkeys(k for r in runs for k in r.metric_keys))
    names = sorted({r.score_name for r in runs})
    score_name = names[0] if len(names) == 1 else "score"
    baselines = {
        model: ref
        for model in dict.fromkeys(g.model for g in groups)
        if (ref := _baseline(groups, baseline, model)) is not None
    }
    return Report(groups, keys, score_name, _gains(groups, keys, baselines), Path(out_dir), baselines)


def _group(runs: Sequence[RunRecord]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = (r.model, r.subsample, r.method)
        group = groups.setdefault(key, Group(r.model, r.subsample, r.method, r.is_baseline))
        if any(other.seed == r.seed for other in group.runs):
            clash = next(o for o in group.runs if o.seed == r.seed)
            raise UserError(
                f"two runs of {r.method} at {_percent(r.subsample)} data with seed {r.seed}: "
                f"{clash.path} and {r.path}; keep one"
            )
        group.runs.append(r)

    # Paper order: model, data fraction, baseline first, then each method's points by ρ and lr.
    def point(value: float | None) -> tuple[bool, float]:
        return value is not None, value or 0.0

    return sorted(
        groups.values(), key=lambda g: (g.model, g.subsample, not g.is_baseline, g.family, point(g.rho), point(g.lr))
    )


def tuned_groups(report: Report) -> dict[tuple[str, float, str], Group]:
    """The point each method is tuned to: ``(model, subsample, family)`` -> the group (one (lr, ρ)
    point, all its seeds) with the highest mean best-checkpoint score over its seeds, among that
    family's groups at that model and data fraction (``family``: the method label without ρ and lr,
    e.g. ``sam``, ``sam+adamw``, ``adafactor``). On a tie the first in table order wins; points
    without a score come last. A method run at one point is tuned to it."""
    return _tuned(report.groups)


def _tuned(groups: Sequence[Group]) -> dict[tuple[str, float, str], Group]:
    def score(group: Group) -> float:
        mean = group.cell("best", SCORE).mean
        return -math.inf if mean is None else mean

    chosen: dict[tuple[str, float, str], Group] = {}
    for g in groups:
        key = (g.model, g.subsample, g.family)
        if key not in chosen or score(g) > score(chosen[key]):
            chosen[key] = g
    return chosen


def _gains(groups: Sequence[Group], keys: Sequence[str], baselines: Mapping[str, Baseline]) -> list[Gain]:
    """Every method's gain over its model's baseline at the same data fraction: the named point, or
    the baseline family's tuned point (then the family's other points are not compared to it: they
    are the baseline's own grid)."""
    gains = []
    tuned = _tuned(groups)
    for model, (family, label) in baselines.items():
        of_model = [g for g in groups if g.model == model]
        for rate in dict.fromkeys(g.subsample for g in of_model):
            if label is not None:
                ref = next((g for g in of_model if g.subsample == rate and g.method == label), None)
            else:
                ref = tuned.get((model, rate, family))
            if ref is None:
                continue
            for g in of_model:
                if g.subsample != rate or g is ref or (label is None and g.family == family):
                    continue
                gains += [
                    gain
                    for selection in SELECTIONS
                    for key in [*keys, SCORE]
                    if (gain := _gain(g, ref, selection, key)) is not None
                ]
    return gains


def _gain(group: Group, ref: Group, selection: str, key: str) -> Gain | None:
    """``group`` − ``ref`` in ``key`` at ``selection``: paired by seed over their common seeds, else
    the difference of the means (None when either has no value)."""
    mine, theirs = group.by_seed(selection, key), ref.by_seed(selection, key)
    if not mine or not theirs:
        return None
    common = sorted(set(mine) & set(theirs))
    if common:
        diffs, paired = [mine[s] - theirs[s] for s in common], True
    else:
        diffs, paired = [statistics.fmean(mine.values()) - statistics.fmean(theirs.values())], False
    return Gain(
        group.model, group.subsample, group.method, selection, key, diffs, paired, statistics.fmean(theirs.values())
    )


def _baseline(groups: Sequence[Group], baseline: str | None, model: str) -> Baseline | None:
    """What ``model``'s gains are over. ``--baseline`` names a method label (that point) or a family
    (``adafactor``: its tuned point); by default the one non-SAM family. None: no baseline ran."""
    of_model = [g for g in groups if g.model == model]
    methods = list(dict.fromkeys(g.method for g in of_model))
    families = list(dict.fromkeys(g.family for g in of_model))
    if baseline is not None:
        named = next((g for g in of_model if g.method == baseline), None)
        if named is not None:
            return Baseline(named.family, baseline)
        if baseline in families:
            return Baseline(baseline)
        raise UserError(f"--baseline {baseline!r} is not among the methods of {model}: {', '.join(methods)}")
    plain = list(dict.fromkeys(g.family for g in of_model if g.is_baseline))
    if len(plain) > 1:
        raise UserError(f"{model} has several baselines ({', '.join(plain)}); choose one with --baseline")
    return Baseline(plain[0]) if plain else None


# --------------------------------------------------------------------------- rendering


def _percent(rate: float) -> str:
    return f"{100 * rate:g}%"


def _short(key: str) -> str:
    """``glue/rte/accuracy`` -> ``rte/accuracy`` (the benchmark is in the table's context)."""
    task, _, metric = key.rpartition("/")
    return f"{task.split('/', 1)[-1]}/{metric}"


def render_markdown(report: Report) -> str:
    lines = ["# Fine-tuning comparison", ""]
    lines.append(
        f"Cells: mean ± sample std over seeds. Score: {report.score_name} (mean over tasks of the mean "
        "of each task's official metrics). **Best**: every task-metric at its own best checkpoint and "
        "the score from those values (Bahri et al. 2022); **final**: the last evaluation."
    )
    lines.append("")
    columns = [_short(k) for k in report.metric_keys] + [report.score_name]
    for selection in SELECTIONS:
        lines += [f"## {selection.capitalize()} checkpoint", ""]
        lines.append("| model | data | method | seeds | " + " | ".join(columns) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(columns))
        for g in report.groups:
            cells = [g.cell(selection, k).text() for k in [*report.metric_keys, SCORE]]
            lines.append(
                f"| {g.model} | {_percent(g.subsample)} | {g.method} | {len(g.runs)} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    points = Counter((g.model, g.subsample, g.family) for g in report.groups)
    tuned_baseline = any(
        points[(g.model, g.subsample, ref.family)] > 1
        for g in report.groups
        if (ref := report.baselines.get(g.model)) and ref.label is None
    )
    for selection in SELECTIONS:
        gains = [g for g in report.gains if g.selection == selection]
        if not gains:
            continue
        lines += [f"## Gain over the baseline ({selection} checkpoint)", ""]
        lines.append(
            "Paired by seed (mean ± std of the differences) when the runs share seeds; relative gain in % "
            "of the baseline's score."
            + (
                " The baseline ran at several (lr, ρ) points: the reference is its tuned point at each data "
                "fraction (see Tuned)."
                if tuned_baseline
                else ""
            )
        )
        lines.append("")
        header = ["Δ " + report.score_name, "Δ% " + report.score_name] + ["Δ " + _short(k) for k in report.metric_keys]
        lines.append("| model | data | method | " + " | ".join(header) + " |")
        lines.append("|---|---|---|" + "---|" * len(header))
        rows = dict.fromkeys((g.model, g.subsample, g.method) for g in gains)
        for model, rate, method in rows:
            by_metric = {g.metric: g for g in gains if (g.model, g.subsample, g.method) == (model, rate, method)}
            score = by_metric.get(SCORE)
            cells = [_gain_text(score), f"{score.relative:+.1f}%" if score and score.relative is not None else "–"]
            cells += [_gain_text(by_metric.get(k)) for k in report.metric_keys]
            lines.append(f"| {model} | {_percent(rate)} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += tuned_markdown(report)
    return "\n".join(lines)


def tuned_markdown(report: Report) -> list[str]:
    """The "Tuned" section (lines): per model and data fraction, each method at its chosen (lr, ρ)
    point (:func:`tuned_groups`) and its gain in score over the tuned baseline, paired by seed.
    Empty unless some method ran at more than one point."""
    points = Counter((g.model, g.subsample, g.family) for g in report.groups)
    if max(points.values(), default=0) < 2:
        return []
    chosen = tuned_groups(report)
    score = report.score_name
    lines = [
        "## Tuned: each method at its best (lr, ρ)",
        "",
        f"For each model, data fraction and method, the (lr, ρ) point whose {score} (each run at its best "
        f"checkpoint) is highest on average over its seeds, with that {score} (mean ± std over seeds); Δ: its "
        "gain over the tuned baseline at the same seed (mean ± std over seed pairs, n = pairs). points: the "
        "(lr, ρ) points the method ran (every one is in the tables above).",
        "",
        "Selection and reporting both use the best-checkpoint protocol, on the same split: selected and "
        f"reported on {split_text(r for g in chosen.values() for r in g.runs)}. The tuned numbers are "
        "therefore optimistic (a maximum over points and checkpoints, measured on the data that chose them), "
        "as in Bahri et al. (2022), who also select on validation.",
        "",
        f"| model | data | method | points | chosen lr | chosen ρ | seeds | {score} (best checkpoint) | "
        f"Δ {score} vs tuned baseline (paired) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, rate, family), g in chosen.items():
        baseline = report.baselines.get(model)
        ref = chosen.get((model, rate, baseline.family)) if baseline is not None else None
        if ref is None:
            delta = "–"
        elif g is ref:
            delta = "(reference)"
        else:
            gain = _gain(g, ref, "best", SCORE)
            delta = _gain_text(gain) + ((f" (n={len(gain.diffs)})" if gain.paired else " (unpaired)") if gain else "")
        cells = [
            model,
            _percent(rate),
            family,
            str(points[(model, rate, family)]),
            value_text(g.lr),
            value_text(g.rho),
            str(len(g.runs)),
            g.cell("best", SCORE).text(),
            delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def split_text(runs: Iterable[RunRecord]) -> str:
    """The evaluation split(s) the runs were scored on, from their summaries: ``superglue/wic
    validation (638 examples)``, comma-separated over tasks."""
    examples: dict[tuple[str, str], set] = {}
    for r in runs:
        for key, info in r.eval_sets.items():
            counts = examples.setdefault((key, str(info.get("split"))), set())
            if isinstance(info.get("examples"), int):
                counts.add(info["examples"])
    if not examples:
        return "the runs' evaluation split (their summaries do not name it)"
    # Several counts for one split: runs that capped it differently (--eval-examples).
    return ", ".join(
        f"{key} {split}" + (f" ({'/'.join(map(str, sorted(counts)))} examples)" if counts else "")
        for (key, split), counts in examples.items()
    )


def _gain_text(gain: Gain | None) -> str:
    if gain is None or gain.mean is None:
        return "–"
    std = gain.std
    return f"{gain.mean:+.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


def _results_csv(report: Report) -> str:
    rows = []
    for selection in SELECTIONS:
        for g in report.groups:
            r0 = g.runs[0]
            for key in [*report.metric_keys, SCORE]:
                cell = g.cell(selection, key)
                rows.append(
                    [
                        selection,
                        g.model,
                        g.subsample,
                        g.method,
                        r0.optimizer,
                        r0.base,
                        r0.rho,
                        r0.lr,
                        report.score_name if key == SCORE else key,
                        cell.n,
                        cell.mean,
                        cell.std,
                        " ".join(f"{v:.6g}" for v in cell.values),
                        " ".join(str(s) for s in g.seeds),
                    ]
                )
    return _csv_text(
        [
            "selection",
            "model",
            "subsample",
            "method",
            "optimizer",
            "base",
            "rho",
            "lr",
            "metric",
            "n",
            "mean",
            "std",
            "values",
            "seeds",
        ],
        rows,
    )


def _gains_csv(report: Report) -> str:
    rows = [
        [
            g.selection,
            g.model,
            g.subsample,
            g.method,
            report.score_name if g.metric == SCORE else g.metric,
            len(g.diffs),
            g.paired,
            g.mean,
            g.std,
            g.baseline_mean,
            g.relative,
        ]
        for g in report.gains
    ]
    return _csv_text(
        [
            "selection",
            "model",
            "subsample",
            "method",
            "metric",
            "n",
            "paired",
            "gain",
            "gain_std",
            "baseline",
            "relative_gain_pct",
        ],
        rows,
    )


def plot_gain(report: Report) -> bytes:
    """PNG: SAM's score gain over the baseline (best checkpoints) against the data fraction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    absolute, relative = fig.subplots(1, 2, sharex=True)
    series: dict[tuple[str, str], list[Gain]] = {}
    for g in report.gains:
        if g.selection == "best" and g.metric == SCORE and g.mean is not None:
            series.setdefault((g.model, g.method), []).append(g)
    rates = sorted({g.subsample for gains in series.values() for g in gains})
    for (model, method), gains in series.items():
        gains = sorted(gains, key=lambda g: g.subsample)
        xs = [g.subsample for g in gains]
        label = method if len({m for m, _ in series}) == 1 else f"{model} {method}"
        absolute.errorbar(
            xs, [g.mean for g in gains], yerr=[g.std or 0.0 for g in gains], marker="o", capsize=3, label=label
        )
        relative.plot(xs, [g.relative if g.relative is not None else math.nan for g in gains], marker="o", label=label)
    for ax, ylabel in ((absolute, f"Δ {report.score_name} (points)"), (relative, f"Δ {report.score_name} (%)")):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        if rates and rates[-1] / rates[0] >= 10:
            ax.set_xscale("log")
        if rates:
            ax.set_xticks(rates)
            ax.set_xticklabels([_percent(r) for r in rates])
            ax.minorticks_off()
        ax.set_xlabel("training data (fraction of the training set)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if series:
        absolute.legend(fontsize=8)
    else:
        absolute.text(0.5, 0.5, "no baseline/SAM pairs", ha="center", va="center", transform=absolute.transAxes)
    fig.suptitle("SAM gain over the baseline (best checkpoint per task-metric)")
    fig.tight_layout()
    buffer = _stdio.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


__all__ = [
    "compare_runs",
    "find_run_dirs",
    "load_run",
    "render_markdown",
    "tuned_markdown",
    "tuned_groups",
    "split_text",
    "plot_gain",
    "Baseline",
    "FinetuneGrid",
    "FinetuneGridSettings",
    "run_grid",
    "Report",
    "RunRecord",
    "Group",
    "Gain",
    "Cell",
]
