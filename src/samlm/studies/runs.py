"""Finished pretraining runs read back from their files, grouped by their point of the grid
(optimizer, ρ, peak lr) and aggregated over seeds (:mod:`samlm.studies.stats`): what the tables and
plots of a comparison are made of. A value only some runs of a group have says ``(n=k)``; a value no
run has shows ``n/a``."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness.rundir import METRICS_FILE, SUMMARY_FILE
from samlm.studies.stats import Stat, finite_number, format_delta, format_mean_std, mean_std, paired_delta, value_text

REFERENCE_OPTIMIZER = "adamw"
TUNING_KEY = "val_loss"  # measured on the tuning slice: what the tuned tables select by
REPORT_KEY = "report_loss"  # measured on the disjoint report slice: what they report


@dataclass(frozen=True)
class Column:
    key: str  # summary.json key
    header: str  # table header
    fmt: str  # format spec of mean and std
    scale: float = 1.0


COLUMNS = (
    Column("val_loss", "val loss", ".4f"),
    Column("val_ppl", "val ppl", ".3f"),
    Column("report_loss", "report loss", ".4f"),
    Column("train_loss", "train loss", ".4f"),
    Column("hessian_lambda_max", "λ_max(H)", ".3g"),
    Column("gauss_newton_lambda_max", "λ_max(GN)", ".3g"),
    Column("preconditioned_lambda_max", "λ_max(P⁻¹H)", ".3g"),
    Column("logit_functional_ratio", "logit/func", ".3g"),
    Column("step_s", "step (ms)", ".1f", 1000.0),
    Column("tokens_per_s", "tokens/s", ".0f"),
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
        """The run's point of the grid: (optimizer, ρ, peak lr)."""
        lr = self.summary.get("lr", (self.summary.get("config") or {}).get("lr"))  # older summaries: config's
        return (self.summary.get("optimizer", "?"), finite_number(self.summary.get("rho")), finite_number(lr))

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


def aggregate(
    runs: Sequence[Run], columns: Sequence[Column] = COLUMNS, reference: str | None = REFERENCE_OPTIMIZER
) -> list[Row]:
    """One :class:`Row` per (optimizer, rho, lr) group with mean ± std of each column over its seeds,
    and (when ``reference`` ran) the val-loss difference to it paired by seed (to its tuned point,
    :func:`tuned_point`, when it ran at several learning rates)."""
    groups = group_runs(runs)
    reference_key = tuned_point(groups, reference) if reference else None
    reference_runs = groups[reference_key] if reference_key else None
    rows = []
    for (optimizer, rho, lr), members in groups.items():
        stats = {c.key: mean_std(r.summary.get(c.key) for r in members) for c in columns}
        row = Row(optimizer, rho, lr, members, stats)
        if reference_runs:
            row.is_reference = members is reference_runs
            if not row.is_reference:
                row.delta = paired_delta(seed_values(members, "val_loss"), seed_values(reference_runs, "val_loss"))
        rows.append(row)
    return rows
