"""What in a comparison's runs could mislead a reader of its report, said in the report itself: how
each run's step time was measured, the step-time outliers left out of the timing columns and the
cost ratio, runs with too few evaluations to draw a curve, an empty report slice; and the list of
runs, the equal-compute ones marked as such."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from samlm.studies.runs import RECORDED_MEDIAN_KEY, Outlier, Run, distinct, equal_compute_only, step_time
from samlm.studies.stats import finite_number

MIN_EVALUATIONS = 5  # fewer evaluations than this per run: the val-loss curves are a few dots


def every_run(runs: Sequence[Run], budgets: Mapping[str, Sequence[Run]] | None = None) -> list[Run]:
    """Each run of the comparison once: the report's ``runs`` and every budget's."""
    return distinct([*runs, *(r for group in (budgets or {}).values() for r in group)])


def evaluations(run: Run) -> int:
    """How many times the run measured its validation loss (its metrics lines with one)."""
    return len({record.get("step") for record in run.metrics if finite_number(record.get("val_loss")) is not None})


def report_batches(run: Run) -> int | None:
    """The batches of the run's report slice (``resolved.report_batches``), None if it does not say."""
    value = (run.summary.get("resolved") or {}).get("report_batches", run.summary.get("report_batches"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _names(runs: Sequence[Run] | Sequence[str], limit: int = 6) -> str:
    names = [f"`{r if isinstance(r, str) else r.name}`" for r in runs]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def timing_note(runs: Sequence[Run], outliers: Sequence[Outlier]) -> str:
    """How the step-time columns and the step-time ratio were measured, and what they leave out."""
    sources: dict[str, list[Run]] = {}
    for run in runs:
        sources.setdefault(step_time(run).source, []).append(run)
    how = {
        "recorded": f"the median over its timed steps after warm-up (summary.json's `{RECORDED_MEDIAN_KEY}`)",
        "windows": "the median over its timing windows after the first (each metrics.jsonl line's `step_s` is "
        "the mean step time since the previous line; the first window, with start-up in it, is left out)",
        "mean": "its mean step time over every step, start-up included (summary.json's `step_s`: it logged a "
        "single timing window)",
    }
    parts = [
        text + ("" if len(sources) == 1 else f" ({len(sources[source])} runs)")
        for source, text in how.items()
        if source in sources
    ]
    text = (
        "step (ms) and tokens/s: each run's step time is "
        + "; ".join(parts or ["n/a"])
        + ", excluding evaluation and sharpness measurements; over seeds, the median (min–max)."
    )
    if outliers:
        text += (
            f" Step-time outliers (over twice the median of their point's other runs) are left out of these "
            f"columns and of the step-time ratio: {_names([o.run for o in outliers])}."
        )
    return text


def warnings(runs: Sequence[Run], outliers: Sequence[Outlier]) -> list[str]:
    """The report's warnings (Markdown bullet lines), one per kind of problem; empty when none."""
    found = []
    for o in outliers:
        found.append(
            f"- **Step-time outlier**: `{o.run}` took {o.seconds * 1000:.1f} ms/step, over twice the median of "
            f"{o.label}'s other runs ({o.others * 1000:.1f} ms): a start-up or a busy core, not the method's cost. "
            "It is left out of the step time, tokens/s and the step-time ratio (its losses are kept)."
        )
    by_mean = [r for r in runs if step_time(r).source == "mean"]
    if by_mean:
        found.append(
            f"- **Step time includes start-up** for {_names(by_mean)}: each logged one timing window, so its step "
            "time is the mean over every step. Evaluate more often (`--eval-every`) for a median after warm-up."
        )
    thin = [r for r in runs if evaluations(r) < MIN_EVALUATIONS]
    if thin:
        counts = sorted({evaluations(r) for r in thin})
        found.append(
            f"- **Few evaluations**: {_names(thin)} measured the validation loss "
            f"{'/'.join(map(str, counts))} time(s) (fewer than {MIN_EVALUATIONS}): the val-loss curves are a few "
            "points, not a trajectory. Evaluate more often (`--eval-every`)."
        )
    empty = [r for r in runs if report_batches(r) == 0]
    if empty:
        found.append(
            f"- **Empty report slice** in {_names(empty)} (`report_batches: 0`: `--val-batches 0` measures every "
            "validation batch for tuning, or the validation split ends before a report slice): report loss is "
            "n/a, and a tuned choice is reported on the data that chose it."
        )
    return found


def run_list(
    runs: Sequence[Run], budgets: Mapping[str, Sequence[Run]] | None, outliers: Sequence[Outlier]
) -> list[str]:
    """The report's last lines: its runs, then the equal-compute ones, each marked as such."""
    slow = {o.run for o in outliers}

    def name(run: Run, extra: str = "") -> str:
        marks = [extra] if extra else []
        marks += ["step-time outlier"] if run.name in slow else []
        return f"`{run.name}`" + (f" ({', '.join(marks)})" if marks else "")

    by_clock = {r.name for r in (budgets or {}).get("time", ())}

    def budget_of(run: Run) -> str:
        return "equal compute (clock)" if run.name in by_clock else "equal compute (model)"

    lines = ["Runs: " + ", ".join(name(r) for r in runs), ""]
    longer = equal_compute_only(budgets or {})
    if longer:
        lines += [
            "Equal-compute runs (given the costliest method's compute as extra steps; in the equal-compute "
            "columns, dashed in the plots): "
            + ", ".join(name(r, f"{budget_of(r)}, {r.summary.get('steps', '?')} steps") for r in longer),
            "",
        ]
    return lines
