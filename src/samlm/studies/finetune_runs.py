"""The runs of a fine-tuning comparison read back (their ``summary.json``), labelled by method
and point, grouped by (model, data fraction, method) and aggregated over seeds: each cell's mean ±
sample std, each method's gain over the baseline (paired by seed when the runs share seeds), and
each method's tuned (lr, ρ) point. :mod:`samlm.studies.finetune_compare` renders them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from samlm.errors import UserError
from samlm.harness.rundir import SUMMARY_FILE
from samlm.optim.registry import METHODS
from samlm.studies.stats import (
    Stat,
    finite_number,
    format_mean_std,
    mean_std,
    paired_differences,
    percent,
    t_interval,
    verdict,
)

SELECTIONS = ("best", "final")
SCORE = "score"


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


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]

    def text(self, digits: int = 1) -> str:
        return format_mean_std(self.mean, self.std, f".{digits}f") if self.values else "–"


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
        return mean_std(self.diffs)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.diffs)[1] if self.paired else None

    @property
    def delta(self) -> Stat:
        """(mean, std, seed pairs) of the paired differences; unpaired, no pairs (and no interval)."""
        return mean_std(self.diffs) if self.paired else (self.mean, None, 0)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Student-t interval of the mean paired difference (None: unpaired or one pair)."""
        return t_interval(self.delta)

    @property
    def verdict(self) -> str:
        """ahead / behind the baseline when :attr:`interval` excludes 0, else within noise."""
        if not self.paired:
            return "undecided (unpaired)"
        return verdict(self.delta, higher_is_better=True)  # scores and task metrics (losses are not reported)

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
                    f"{g.model} {percent(g.subsample)} data: {g.method} {g.mean:+.2f} {self.score_name}{rel} "
                    "over the baseline (best checkpoints)"
                )
        return lines


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
                f"two runs of {r.method} at {percent(r.subsample)} data with seed {r.seed}: "
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
                    if (gain := gain_over(g, ref, selection, key)) is not None
                ]
    return gains


def gain_over(group: Group, ref: Group, selection: str, key: str) -> Gain | None:
    """``group`` − ``ref`` in ``key`` at ``selection``: paired by seed over their common seeds, else
    the difference of the means (None when either has no value)."""
    mine, theirs = group.by_seed(selection, key), ref.by_seed(selection, key)
    if not mine or not theirs:
        return None
    diffs = paired_differences(sorted(mine.items()), theirs.items())
    paired, baseline_mean = bool(diffs), mean_std(theirs.values())[0]
    if not paired:
        own_mean = mean_std(mine.values())[0]
        if own_mean is None or baseline_mean is None:  # by_seed keeps finite values only: not reached
            return None
        diffs = [own_mean - baseline_mean]
    return Gain(group.model, group.subsample, group.method, selection, key, diffs, paired, baseline_mean)


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
