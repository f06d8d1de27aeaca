"""Finished pretraining runs read back from their files, grouped by their point of the grid
(optimizer, ρ, peak lr) and aggregated over seeds (:mod:`samlm.studies.stats`): what the tables and
plots of a comparison are made of. A value only some runs of a group have says ``(n=k)``; a value no
run has shows ``n/a``.

A run's step time is a median after warm-up, not its mean (which holds start-up and any moment a
busy core slowed it): :func:`step_time`. Over seeds the step-time columns give the median and the
range, and a run more than twice as slow as the median of its point's other runs is a step-time
outlier (:func:`step_time_outliers`), left out of them."""

from __future__ import annotations

import json
import math
import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness.rundir import METRICS_FILE, SUMMARY_FILE
from samlm.studies.grid import VARIANT_SEPARATOR
from samlm.studies.stats import (
    Spread,
    Stat,
    finite_number,
    format_delta,
    format_interval,
    format_mean_std,
    format_median_range,
    mean_std,
    median_range,
    paired_delta,
    value_text,
    verdict,
)

REFERENCE_OPTIMIZER = "adamw"
TUNING_KEY = "val_loss"  # measured on the tuning slice: what the tuned tables select by
REPORT_KEY = "report_loss"  # measured on the disjoint report slice: what they report


# summary.json's median step time after warm-up, where the harness records it (seconds)
RECORDED_MEDIAN_KEY = "step_time_median_ms"  # written by the training loop, in milliseconds
OUTLIER_FACTOR = 2.0  # a run this many times slower than its point's other runs' median is an outlier


@dataclass(frozen=True)
class Column:
    key: str  # summary.json key
    header: str  # table header
    fmt: str  # format spec of mean and std
    scale: float = 1.0
    # wall clock: each run's robust value (step_time), the median (min–max) over seeds, outliers left out
    timing: bool = False


COLUMNS = (
    Column("val_loss", "val loss", ".4f"),
    Column("val_ppl", "val ppl", ".3f"),
    Column("report_loss", "report loss", ".4f"),
    Column("train_loss", "train loss", ".4f"),
    Column("hessian_lambda_max", "λ_max(H)", ".3g"),
    Column("gauss_newton_lambda_max", "λ_max(GN)", ".3g"),
    Column("preconditioned_lambda_max", "λ_max(P⁻¹H)", ".3g"),
    Column("logit_functional_ratio", "logit/func", ".3g"),
    Column("step_s", "step (ms)", ".1f", 1000.0, timing=True),
    Column("tokens_per_s", "tokens/s", ".0f", timing=True),
)


@dataclass
class Run:
    """One run directory: its summary and its metrics lines."""

    name: str
    path: Path
    summary: dict
    metrics: list[dict] = field(default_factory=list)

    @property
    def group(self) -> tuple[str, float | None, float | None]:
        """The run's point of the grid: (method, ρ, peak lr); the method is the optimizer, or the
        variant the comparison named the run after (``sam@every5-rho0.1-seed0``: ``sam@every5``)."""
        lr = self.summary.get("lr", (self.summary.get("config") or {}).get("lr"))  # older summaries: config's
        return (self.method, finite_number(self.summary.get("rho")), finite_number(lr))

    @property
    def method(self) -> str:
        """The optimizer, or its variant in the comparison (:data:`VARIANT_SEPARATOR` in the run's name)."""
        optimizer = self.summary.get("optimizer", "?")
        first = self.name.split("-", 1)[0]
        return first if first.startswith(optimizer + VARIANT_SEPARATOR) else optimizer

    @property
    def label(self) -> str:
        return group_label(*self.group)


def group_label(optimizer: str, rho: float | None, lr: float | None = None) -> str:
    return optimizer + ("" if rho is None else f" ρ={rho:g}") + ("" if lr is None else f" lr={lr:g}")


def several_lrs(keys: Iterable[tuple]) -> bool:
    """Whether the points differ in lr (only then do tables and legends name it)."""
    return len({key[2] for key in keys}) > 1


def point_cells(key: tuple, with_lr: bool) -> list[str]:
    """The first cells of a point's table row: optimizer, ρ and (``with_lr``) lr."""
    optimizer, rho, lr = key
    return [optimizer, value_text(rho)] + ([value_text(lr)] if with_lr else [])


def load_run(path: str | Path) -> Run:
    """Read ``summary.json`` (required) and ``metrics.jsonl`` (optional) of a run directory."""
    path = Path(path)
    summary_file = path / SUMMARY_FILE
    if not summary_file.is_file():
        raise UserError(f"{path} has no {SUMMARY_FILE} (not a finished samlm run)")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{summary_file} is unreadable ({exc})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{summary_file} does not hold a JSON object")
    return Run(name=path.name, path=path, summary=summary, metrics=io.read_jsonl(path / METRICS_FILE))


@dataclass(frozen=True)
class StepTime:
    """A run's step time in seconds and where it came from: ``recorded`` (summary.json's
    ``step_time_median_ms``, the median over its timed steps after warm-up), ``windows`` (the median of
    metrics.jsonl's timing windows after the first, which holds start-up: each line's ``step_s`` is
    the mean over the steps since the previous line) or ``mean`` (summary.json's ``step_s``, the mean
    over every step, start-up included: the run logged one timing window)."""

    seconds: float | None
    source: str  # "recorded", "windows", "mean" or "none"
    windows: int = 0  # the windows the median is over (source "windows")


def step_time(run: Run) -> StepTime:
    """The run's step time (:class:`StepTime`): the recorded median, else the windows' median, else the mean."""
    recorded_ms = finite_number(run.summary.get(RECORDED_MEDIAN_KEY))
    if recorded_ms is not None:
        return StepTime(recorded_ms / 1000, "recorded")
    windows = [
        seconds
        for record in run.metrics
        if isinstance(record.get("step"), int) and (seconds := finite_number(record.get("step_s"))) is not None
    ]
    if len(windows) > 1:
        return StepTime(statistics.median(windows[1:]), "windows", len(windows) - 1)
    mean = finite_number(run.summary.get("step_s"))
    return StepTime(mean, "none" if mean is None else "mean")


def tokens_per_second(run: Run) -> float | None:
    """Training tokens per second at the run's :func:`step_time`."""
    seconds = step_time(run).seconds
    steps, tokens = finite_number(run.summary.get("step")), finite_number(run.summary.get("tokens"))
    per_step = (
        tokens / steps
        if steps and tokens
        else finite_number((run.summary.get("resolved") or {}).get("tokens_per_step"))
    )
    if seconds and per_step:
        return per_step / seconds
    return finite_number(run.summary.get("tokens_per_s"))


def column_value(run: Run, column: Column) -> Any:
    """The run's value in ``column``: its summary's, the step time and tokens/s from :func:`step_time`."""
    if column.key == "step_s":
        return step_time(run).seconds
    if column.key == "tokens_per_s":
        return tokens_per_second(run)
    return run.summary.get(column.key)


@dataclass(frozen=True)
class Outlier:
    """A run whose step time is over :data:`OUTLIER_FACTOR` × the median of its point's other runs."""

    run: str
    label: str  # its point
    seconds: float
    others: float  # the median of the point's other runs


def distinct(runs: Iterable[Run]) -> list[Run]:
    """Each run once (by name), in order: a run serving both budgets is in both lists."""
    return list({r.name: r for r in runs}.values())


def equal_compute_only(budgets: Mapping[str, Sequence[Run]]) -> list[Run]:
    """The runs that serve only an equal-compute comparison, by the model or by the clock (the
    cheaper methods given the costliest one's compute or time as extra steps), when there is an
    equal-steps one beside it; else none."""
    if "steps" not in budgets:
        return []
    at_steps = {r.name for r in budgets["steps"]}
    return distinct(r for kind in ("compute", "time") for r in budgets.get(kind, ()) if r.name not in at_steps)


def step_time_outliers(runs: Iterable[Run], factor: float = OUTLIER_FACTOR) -> list[Outlier]:
    """The runs more than ``factor`` times slower per step than the median of the other runs of
    their point (optimizer, ρ, lr; its runs at every budget take the same steps). The median of the
    *others*, so that with two seeds the slow one is measured against the normal one."""
    found = []
    for key, members in group_runs(distinct(runs)).items():
        times = {r.name: step_time(r).seconds for r in members}
        for name, seconds in times.items():
            others = [t for other, t in times.items() if other != name and t is not None]
            if seconds is not None and others and seconds > factor * statistics.median(others):
                found.append(Outlier(name, group_label(*key), seconds, statistics.median(others)))
    return found


def typical_step_time(runs: Iterable[Run], left_out: Iterable[str] = ()) -> float | None:
    """The median step time over ``runs`` but those named in ``left_out`` (the outliers)."""
    skip = set(left_out)
    return median_range(step_time(r).seconds for r in distinct(runs) if r.name not in skip)[0]


def seed_values(runs: Iterable[Run], key: str) -> list[tuple[Any, Any]]:
    """``(seed, summary[key])`` of each run: what :func:`samlm.studies.stats.paired_delta` pairs."""
    return [(r.summary.get("seed"), r.summary.get(key)) for r in runs]


def group_runs(runs: Sequence[Run]) -> OrderedDict[tuple[str, float | None, float | None], list[Run]]:
    """Runs by (optimizer, rho, lr), in order of first appearance."""
    groups: OrderedDict[tuple[str, float | None, float | None], list[Run]] = OrderedDict()
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def tuned_point(groups: Mapping[tuple, Sequence[Run]], optimizer: str) -> tuple | None:
    """The key of ``optimizer``'s (ρ, lr) point with the lowest mean tuning-slice val loss over its
    seeds (the first such point on a tie; points without a val loss come last), or None."""

    def score(key):
        mean = mean_std(r.summary.get(TUNING_KEY) for r in groups[key])[0]
        return math.inf if mean is None else mean

    return min((key for key in groups if key[0] == optimizer), key=score, default=None)


@dataclass
class Row:
    """One (optimizer, rho, lr) group: per column (mean, std, n) over its runs."""

    optimizer: str
    rho: float | None
    lr: float | None
    runs: list[Run]
    stats: dict[str, Stat]
    # val loss minus the reference's (AdamW's) at the same seed: (mean, std, number of seed pairs)
    delta: Stat | None = None
    is_reference: bool = False
    timing: dict[str, Spread] = field(default_factory=dict)  # median (min–max) of the timing columns
    left_out: list[str] = field(default_factory=list)  # step-time outliers kept out of the timing columns

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list:
        return [r.summary.get("seed") for r in self.runs]

    @property
    def label(self) -> str:
        return group_label(self.optimizer, self.rho, self.lr)

    def cell(self, column: Column) -> str:
        if column.timing:
            spread = self.timing[column.key]
            text = format_median_range(spread, column.fmt, column.scale)
            return text + (f" (n={spread[3]})" if 0 < spread[3] < self.n else "")
        mean, std, n = self.stats[column.key]
        scale = column.scale
        text = format_mean_std(None if mean is None else mean * scale, None if std is None else std * scale, column.fmt)
        if 0 < n < self.n:
            text += f" (n={n})"
        return text

    def delta_cell(self) -> str:
        if self.is_reference:
            return "(reference)"
        if self.delta is None:
            return "n/a"
        return format_delta(self.delta, show_n=self.delta[2] < self.n)

    def interval_cell(self) -> str:
        """The delta's 95% interval (:func:`samlm.studies.stats.t_interval`)."""
        if self.is_reference:
            return "(reference)"
        return "n/a" if self.delta is None else format_interval(self.delta)

    def verdict_cell(self) -> str:
        """ahead / behind (the interval excludes 0) / within noise."""
        if self.is_reference:
            return "(reference)"
        return "n/a" if self.delta is None else verdict(self.delta)


def aggregate(
    runs: Sequence[Run],
    columns: Sequence[Column] = COLUMNS,
    reference: str | None = REFERENCE_OPTIMIZER,
    outliers: Iterable[str] | None = None,
) -> list[Row]:
    """One :class:`Row` per (optimizer, rho, lr) group with mean ± std of each column over its seeds
    (the timing columns: median and range, the step-time ``outliers`` left out; by default those of
    :func:`step_time_outliers` over ``runs``), and (when ``reference`` ran) the val-loss difference
    to it paired by seed (to its tuned point, :func:`tuned_point`, when it ran at several learning rates)."""
    skip = {o.run for o in step_time_outliers(runs)} if outliers is None else set(outliers)
    groups = group_runs(runs)
    reference_key = tuned_point(groups, reference) if reference else None
    reference_runs = groups[reference_key] if reference_key else None
    rows = []
    for (optimizer, rho, lr), members in groups.items():
        stats = {c.key: mean_std(r.summary.get(c.key) for r in members) for c in columns if not c.timing}
        kept = [r for r in members if r.name not in skip]
        timing = {c.key: median_range(column_value(r, c) for r in kept) for c in columns if c.timing}
        row = Row(
            optimizer, rho, lr, members, stats, timing=timing, left_out=[r.name for r in members if r.name in skip]
        )
        if reference_runs:
            row.is_reference = members is reference_runs
            if not row.is_reference:
                row.delta = paired_delta(seed_values(members, "val_loss"), seed_values(reference_runs, "val_loss"))
        rows.append(row)
    return rows
