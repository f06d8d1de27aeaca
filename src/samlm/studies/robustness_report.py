"""The robustness part of a comparison's report: paired Δ to the baseline under each budget, and
the learning–forgetting frontier plot (runs measured with ``--robustness``; docs/robustness.md).

Per run (its ``summary.json``): the weight-noise Δloss at each σ (mean over the draws), the int8
and int4 RTN Δloss, and the forgetting, read at one **matched learning level** x* for every run of
a budget: x* is the largest of the runs' most-learned second-corpus losses (the least-learned run's
best point), so every run's frontier reaches it; each run's original-loss increase at x* is
interpolated linearly on its own Pareto frontier (:func:`samlm.diagnostics.robustness.forgetting_summary`:
a fine-tuning point that learned less and forgot more than another is not on it). Each metric
is then shown as mean ± std over seeds and as the difference to the baseline's run with the same
seed (paired), the baseline being the tuned AdamW point as in the rest of the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from samlm.diagnostics.robustness import forgetting_summary
from samlm.studies.grid import budget_headers
from samlm.studies.plots import colors, finish_figure, point_label, pyplot
from samlm.studies.runs import REFERENCE_OPTIMIZER, Run, group_runs, point_cells, seed_values, several_lrs, tuned_point
from samlm.studies.stats import finite_number, format_delta, mean_std, paired_delta

FRONTIER_PLOT = "forgetting.png"
FORGET_KEY = "robust_forgetting"


def measured(runs: Sequence[Run]) -> bool:
    return any(isinstance(r.summary.get("weight_noise"), Mapping) for r in runs)


def _forgetting(run: Run) -> Mapping | None:
    forget = run.summary.get("forgetting")
    return forget if isinstance(forget, Mapping) and forget.get("points") else None


def matched_level(runs: Sequence[Run]) -> float | None:
    """x*: the largest of the runs' most-learned second-corpus losses (module docstring)."""
    lows = [min(float(p["learning"]) for p in forget["points"]) for r in runs if (forget := _forgetting(r))]
    return max(lows) if lows else None


def increase_at(run: Run, level: float) -> float | None:
    """The run's original-loss increase at learning level ``level``, on its frontier (recomputed from
    its points by :func:`samlm.diagnostics.robustness.forgetting_summary`)."""
    forget = _forgetting(run)
    if forget is None:
        return None
    before = forget.get("before") or {}
    return forgetting_summary(
        forget["points"], before_learning=before["learning"], before_original=before["original"], target=level
    )["increase"]


def sigmas(runs: Sequence[Run]) -> list[float]:
    found = []
    for run in runs:
        noise = run.summary.get("weight_noise")
        if isinstance(noise, Mapping):
            found += [float(s) for s in noise.get("sigmas", []) if float(s) > 0]
    return sorted(set(found))


def flatten(run: Run, level: float | None) -> Run:
    """``run`` with flat robustness keys in its summary (``robust_noise_<σ>``, ``robust_int8``,
    ``robust_int4``, ``robust_forgetting``)."""
    summary = dict(run.summary)
    noise = summary.get("weight_noise")
    if isinstance(noise, Mapping):
        for sigma, delta in zip(noise.get("sigmas", []), noise.get("delta_mean", [])):
            summary[f"robust_noise_{float(sigma):g}"] = delta
    quant = summary.get("quantization")
    if isinstance(quant, Mapping):
        for fmt in ("int8", "int4"):
            if isinstance(quant.get(fmt), Mapping):
                summary[f"robust_{fmt}"] = quant[fmt].get("delta")
    if level is not None:
        summary[FORGET_KEY] = increase_at(run, level)
    return replace(run, summary=summary)


def columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(flat key, header) of each robustness metric the runs have."""
    cols = [(f"robust_noise_{s:g}", f"noise σ={s:g}") for s in sigmas(runs)[-1:]]  # the largest σ
    cols += [("robust_int8", "int8"), ("robust_int4", "int4")]
    if matched_level(runs) is not None:
        cols.append((FORGET_KEY, "forgetting"))
    return cols


def budget_robustness_table(runs: Sequence[Run], reference: str = REFERENCE_OPTIMIZER) -> tuple[str, float | None]:
    """Markdown: per (optimizer, ρ, lr) group, each metric's mean ± std over seeds and its paired
    difference to the tuned ``reference``; and the matched learning level x*."""
    level = matched_level(runs)
    flat = [flatten(r, level) for r in runs]
    groups = group_runs(flat)
    reference_key = tuned_point(groups, reference)
    with_lr = several_lrs(groups)
    metric_columns = columns(runs)
    headers = ["optimizer", "ρ"] + ["lr"] * with_lr + ["seeds"]
    for _, header in metric_columns:
        headers += [f"{header} Δloss", f"{header}: Δ vs {reference}"]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---|" * with_lr + "---:|" * (len(headers) - 2 - with_lr)]
    for key, members in groups.items():
        cells = point_cells(key, with_lr) + [str(len(members))]
        for flat_key, _ in metric_columns:
            stat = mean_std(r.summary.get(flat_key) for r in members)
            cells.append(format_delta(stat, show_n=0 < stat[2] < len(members)))
            if reference_key is None:
                cells.append("n/a")
            elif key == reference_key:
                cells.append("(reference)")
            else:
                cells.append(
                    format_delta(
                        paired_delta(seed_values(members, flat_key), seed_values(groups[reference_key], flat_key))
                    )
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), level


def section(budgets: Mapping[str, Sequence[Run]], plot: str | None = None) -> list[str]:
    """The report's "Robustness" section (empty when no run was measured)."""
    budgets = {kind: runs for kind, runs in budgets.items() if measured(runs)}
    if not budgets:
        return []
    sample = next(r for runs in budgets.values() for r in runs if measured([r])).summary
    noise, quant = sample.get("weight_noise") or {}, sample.get("quantization") or {}
    forget = cast(Mapping[str, Any], sample.get("forgetting")) if isinstance(sample.get("forgetting"), Mapping) else {}
    lines = [
        "## Robustness",
        "",
        "Measured at the end of each run (`--robustness`, docs/robustness.md) on the run's tuning validation "
        f"batches. **noise σ**: Δloss under W + σ·rms(W)·z per tensor, mean over {noise.get('draws')} seeded draws, "
        "at the largest σ measured (every σ is in each run's summary.json). "
        f"**int8 / int4**: Δloss under weight-only round-to-nearest of the linear layers (int8 per output "
        f"channel, int4 in groups of {quant.get('group_size')}; embeddings and norms "
        f"{'quantized too' if quant.get('embeddings') else 'in full precision'}). **forgetting**: AdamW fine-tuning "
        f"on {forget.get('data', 'the second corpus')} for {forget.get('steps')} steps at lr "
        f"{', '.join(f'{x:g}' for x in forget.get('lrs', []))}; the original corpus's val-loss increase at the "
        "matched learning level x* (the second corpus's val loss every run's frontier reaches: the largest of the "
        "runs' most-learned losses), interpolated linearly on each run's learning–forgetting Pareto frontier (a "
        "fine-tuning lr that learned less and forgot more than another is not on it). Lower is more robust; "
        "Δ vs the baseline is paired by seed (mean ± std over seed pairs).",
        "",
    ]
    names = budget_headers(budgets)
    for kind, runs in budgets.items():
        table, level = budget_robustness_table(runs)
        at = f" (x* = {level:.4f})" if level is not None else ""
        lines += [f"At {names[kind]}{at}:", "", table, ""]
    if plot:
        lines += [f"![learning–forgetting frontier]({Path(plot).name})", ""]
    return lines


def mean_frontier(members: Sequence[Run]) -> tuple[list[float], list[float]]:
    """The start (before fine-tuning, no increase) and each lr's point, means over the seeds."""
    starts: list[float | None] = []
    by_lr: dict[float, list[tuple[Any, Any]]] = {}
    for run in members:
        if (forget := _forgetting(run)) is None:
            continue
        starts.append(finite_number((forget.get("before") or {}).get("learning")))
        for point in forget["points"]:
            by_lr.setdefault(float(point["lr"]), []).append((point.get("learning"), point.get("increase")))
    xs, ys = [], []
    start = mean_std(starts)[0]
    if start is not None:
        xs, ys = [start], [0.0]
    for lr in sorted(by_lr):
        x, y = mean_std(p[0] for p in by_lr[lr])[0], mean_std(p[1] for p in by_lr[lr])[0]
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_frontier(budgets: Mapping[str, Sequence[Run]], path: str | Path, *, title: str = "") -> Path | None:
    """The learning–forgetting frontier: the original corpus's val-loss increase against the second
    corpus's val loss, one curve per (optimizer, ρ, lr) group through its mean start point and its
    mean point at each fine-tuning lr (in lr order); one panel per budget; x* dotted."""
    budgets = {kind: runs for kind, runs in budgets.items() if any(_forgetting(r) is not None for r in runs)}
    if not budgets:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False)
    for ax, (kind, runs) in zip(axes[0], budgets.items()):
        groups = group_runs(runs)
        palette = colors(groups)
        with_lr = several_lrs(groups)
        for key, members in groups.items():
            xs, ys = mean_frontier(members)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=4, color=palette[key], label=point_label(key, members, with_lr))
        level = matched_level(runs)
        if level is not None:
            ax.axvline(level, color="#777777", linestyle=":", linewidth=1)
        ax.set_title(budget_headers(budgets)[kind])
        ax.set_xlabel("second corpus val loss after fine-tuning (learning)")
        ax.set_ylabel("original val loss increase (forgetting)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return finish_figure(plt, fig, path, title)
