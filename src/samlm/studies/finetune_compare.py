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

This module renders; the grid is :mod:`samlm.studies.finetune_grid`, the runs read back and
aggregated (groups, gains, tuned points) :mod:`samlm.studies.finetune_runs`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from samlm import io
from samlm.studies.finetune_runs import (
    SCORE,
    SELECTIONS,
    Gain,
    Report,
    RunRecord,
    build_report,
    gain_over,
    tuned_groups,
)
from samlm.studies.grid import BUDGET_HEADERS
from samlm.studies.plots import png_bytes
from samlm.studies.stats import csv_text, format_delta, format_interval, percent, value_text


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


def budget_markdown(reports: Mapping[str, Report]) -> str:
    """Each method's gain in score over the baseline (best checkpoints), paired by seed, at equal
    steps and at equal compute, side by side."""
    cells: dict[tuple, dict[str, str]] = {}
    for budget, report in reports.items():
        for g in report.gains:
            if g.selection == "best" and g.metric == SCORE:
                method = g.method
                n = f" (n={len(g.diffs)})" if g.paired else " (unpaired)"
                cells.setdefault((g.model, g.subsample, method), {})[budget] = " | ".join(
                    [gain_text(g) + n, interval_text(g), g.verdict]
                )
    lines = [
        "## Gain over the baseline at equal steps and at equal compute (best checkpoints, score)",
        "",
        "Paired by seed: mean ± std of (method − baseline) over seeds, n seed pairs; 95% CI: the Student-t "
        "interval of the mean gain; verdict: ahead or behind only when it excludes 0. **Equal steps**: every method "
        "the same number of steps. **Equal compute**: every method the forward+backward compute of the costliest "
        "method (a backward counted as 2 forwards; cheaper methods run proportionally more steps, with warmup, "
        "evaluation and checkpoint cadence stretched), so one baseline run per seed serves every method. Each "
        "budget's full tables: this file (equal steps) and equal-compute/results.md.",
        "",
        "| model | data | method | " + " | ".join(f"{BUDGET_HEADERS[b]} | 95% CI | verdict" for b in reports) + " |",
        "|---|---:|---|" + "---:|" * 3 * len(reports),
    ]
    for (model, rate, method), by_budget in cells.items():
        lines.append(
            f"| {model} | {percent(rate)} | {method} | "
            + " | ".join(by_budget.get(b, "– | – | –") for b in reports)
            + " |"
        )
    return "\n".join(lines) + "\n"


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
                f"| {g.model} | {percent(g.subsample)} | {g.method} | {len(g.runs)} | " + " | ".join(cells) + " |"
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
            f"of the baseline's score; 95% CI: the Student-t interval of the mean gain in {report.score_name} "
            "over the seed pairs (none with one pair or unpaired seeds), and the verdict: ahead or behind the "
            "baseline only when it excludes 0, within noise otherwise."
            + (
                " The baseline ran at several (lr, ρ) points: the reference is its tuned point at each data "
                "fraction (see Tuned)."
                if tuned_baseline
                else ""
            )
        )
        lines.append("")
        header = ["Δ " + report.score_name, "Δ% " + report.score_name] + ["Δ " + _short(k) for k in report.metric_keys]
        header += [f"95% CI Δ {report.score_name}", "verdict"]
        lines.append("| model | data | method | " + " | ".join(header) + " |")
        lines.append("|---|---|---|" + "---|" * len(header))
        rows = dict.fromkeys((g.model, g.subsample, g.method) for g in gains)
        for model, rate, method in rows:
            by_metric = {g.metric: g for g in gains if (g.model, g.subsample, g.method) == (model, rate, method)}
            score = by_metric.get(SCORE)
            cells = [gain_text(score), f"{score.relative:+.1f}%" if score and score.relative is not None else "–"]
            cells += [gain_text(by_metric.get(k)) for k in report.metric_keys]
            cells += [interval_text(score), score.verdict if score else "–"]
            lines.append(f"| {model} | {percent(rate)} | {method} | " + " | ".join(cells) + " |")
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
        f"Δ {score} vs tuned baseline (paired) | 95% CI | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, rate, family), g in chosen.items():
        baseline = report.baselines.get(model)
        ref = chosen.get((model, rate, baseline.family)) if baseline is not None else None
        if ref is None:
            delta = ["–"] * 3
        elif g is ref:
            delta = ["(reference)"] * 3
        else:
            gain = gain_over(g, ref, "best", SCORE)
            n = (f" (n={len(gain.diffs)})" if gain.paired else " (unpaired)") if gain else ""
            delta = [gain_text(gain) + n, interval_text(gain), gain.verdict if gain else "–"]
        cells = [
            model,
            percent(rate),
            family,
            str(points[(model, rate, family)]),
            value_text(g.lr),
            value_text(g.rho),
            str(len(g.runs)),
            g.cell("best", SCORE).text(),
            *delta,
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


def gain_text(gain: Gain | None) -> str:
    """A gain's cell: ``+1.2 ± 0.3`` (mean ± std over seed pairs; no std unpaired); ``–`` without one."""
    if gain is None or gain.mean is None:
        return "–"
    return format_delta((gain.mean, gain.std, len(gain.diffs)), show_n=False, fmt="+.1f")


def interval_text(gain: Gain | None) -> str:
    """A gain's 95% interval cell: ``[+0.5, +5.5]``; ``no interval (n=1)`` / ``(unpaired)``; ``–`` without one."""
    if gain is None or gain.mean is None:
        return "–"
    return format_interval(gain.delta, fmt="+.1f") if gain.paired else "no interval (unpaired)"


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
    return csv_text(
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
            *(g.interval or (None, None)),
            g.verdict,
        ]
        for g in report.gains
    ]
    return csv_text(
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
            "gain_ci95_low",
            "gain_ci95_high",
            "verdict",
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
            ax.set_xticklabels([percent(r) for r in rates])
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
    return png_bytes(fig)
