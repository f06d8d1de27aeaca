"""Tables and plots of finished runs, from their ``summary.json`` and ``metrics.jsonl`` files.

Pure functions (no training, no model): ``samlm compare`` and ``samlm demo`` call
:func:`write_report`, and the pieces are usable on their own::

    runs = [load_run(d) for d in run_dirs]
    rows = aggregate(runs)                 # one row per (optimizer, rho, lr): mean ± std over seeds
    print(markdown_table(rows))
    print(tuned_table(runs))               # each method's best (lr, rho) on the tuning slice, on the report slice

Numbers are the mean ± the *sample* standard deviation (n − 1 in the denominator) over the
seeds of a group; the ``seeds`` column says how many runs stand behind each row, and a value
that only some runs have says ``(n=k)``. A single run shows its value without ``±``; a value no
run has shows ``n/a``. Plots use matplotlib's Agg backend (no display needed) and, like
every other file here, are written atomically (:mod:`samlm.io`).
"""

from __future__ import annotations

import csv
import io as _stdio
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness.rundir import METRICS_FILE, SUMMARY_FILE
from samlm.studies.grid import start_fraction

REPORT_FILE = "report.md"
RESULTS_FILE = "results.csv"
VAL_LOSS_PLOT = "val_loss.png"
SHARPNESS_PLOT = "sharpness.png"


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

CSV_FIELDS = (
    "run",
    "optimizer",
    "rho",
    "lr",
    "seed",
    "completed",
    "step",
    "steps",
    "val_loss",
    "val_ppl",
    "report_loss",
    "report_ppl",
    "best_val_loss",
    "best_val_loss_step",
    "train_loss",
    "hessian_lambda_max",
    "gauss_newton_lambda_max",
    "functional_lambda",
    "preconditioned_lambda_max",
    "logit_path_norm",
    "functional_path_norm",
    "logit_functional_ratio",
    "step_s",
    "tokens_per_s",
    "train_seconds",
    "wall_seconds",
    "tokens",
    "params",
    "non_embedding_params",
    "nonfinite_steps",
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


def _several_lrs(keys: Iterable[tuple]) -> bool:
    """Whether the points differ in lr (only then do tables and legends name it)."""
    return len({key[2] for key in keys}) > 1


def _point_cells(key: tuple, with_lr: bool) -> list[str]:
    optimizer, rho, lr = key
    return [optimizer, value_text(rho)] + ([value_text(lr)] if with_lr else [])


def value_text(value: float | None) -> str:
    """A setting's value in a table (``–``: none)."""
    return "–" if value is None else f"{value:g}"


def load_run(path: str | Path) -> Run:
    """Read ``summary.json`` (required) and ``metrics.jsonl`` (optional) of a run directory."""
    path = Path(path)
    summary_file = path / SUMMARY_FILE
    if not summary_file.is_file():
        raise UserError(f"{path} has no {SUMMARY_FILE} (not a finished samlm run)")
    try:
        import json

        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{summary_file} is unreadable ({exc})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{summary_file} does not hold a JSON object")
    return Run(name=path.name, path=path, summary=summary, metrics=io.read_jsonl(path / METRICS_FILE))


# --------------------------------------------------------------------------- statistics


def finite_number(value: Any) -> float | None:
    """A finite float, or None (missing, null, "nan", booleans, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the finite numbers among ``values``; std is None when n < 2."""
    numbers = [v for v in (finite_number(x) for x in values) if v is not None]
    n = len(numbers)
    if n == 0:
        return None, None, 0
    mean = math.fsum(numbers) / n
    if n < 2:
        return mean, None, n
    variance = math.fsum((x - mean) ** 2 for x in numbers) / (n - 1)
    return mean, math.sqrt(variance), n


def format_mean_std(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    """``"1.2345 ± 0.0123"``; ``"1.2345"`` without a std; ``"n/a"`` without a mean."""
    if mean is None:
        return "n/a"
    text = format(mean, fmt)
    return text if std is None else f"{text} ± {format(std, fmt)}"


def format_delta(delta: tuple[float | None, float | None, int], show_n: bool = True) -> str:
    """A paired difference (mean, std, pairs): ``"-0.0500 ± 0.0100 (n=2)"``; ``"n/a"`` without pairs."""
    mean, std, n = delta
    if n == 0:
        return "n/a"
    return format_mean_std(mean, std, "+.4f").replace("± +", "± ") + (f" (n={n})" if show_n else "")


@dataclass
class Row:
    """One (optimizer, rho, lr) group: per column (mean, std, n) over its runs."""

    optimizer: str
    rho: float | None
    lr: float | None
    runs: list[Run]
    stats: dict[str, tuple[float | None, float | None, int]]
    # val loss minus the reference's (AdamW's) at the same seed: (mean, std, number of seed pairs)
    delta: tuple[float | None, float | None, int] | None = None
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


def group_runs(runs: Sequence[Run]) -> OrderedDict[tuple[str, float | None, float | None], list[Run]]:
    """Runs by (optimizer, rho, lr), in order of first appearance."""
    groups: OrderedDict[tuple[str, float | None, float | None], list[Run]] = OrderedDict()
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


TUNING_KEY = "val_loss"  # measured on the tuning slice: what the tuned tables select by
REPORT_KEY = "report_loss"  # measured on the disjoint report slice: what they report


def tuned_point(groups: Mapping[tuple, Sequence[Run]], optimizer: str) -> tuple | None:
    """The key of ``optimizer``'s (ρ, lr) point with the lowest mean tuning-slice val loss over its
    seeds (the first such point on a tie; points without a val loss come last), or None."""

    def score(key):
        mean = mean_std(r.summary.get(TUNING_KEY) for r in groups[key])[0]
        return math.inf if mean is None else mean

    return min((key for key in groups if key[0] == optimizer), key=score, default=None)


REFERENCE_OPTIMIZER = "adamw"
DELTA_HEADER = "Δ val loss vs adamw (paired)"


def paired_delta(members: Sequence[Run], reference: Sequence[Run], key: str = "val_loss"):
    """(mean, sample std, n) over seeds of ``key(run) − key(reference run with the same seed)``."""
    by_seed = {r.summary.get("seed"): finite_number(r.summary.get(key)) for r in reference}
    differences = []
    for run in members:
        mine, theirs = finite_number(run.summary.get(key)), by_seed.get(run.summary.get("seed"))
        if mine is not None and theirs is not None:
            differences.append(mine - theirs)
    return mean_std(differences)


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
            row.delta = None if row.is_reference else paired_delta(members, reference_runs)
        rows.append(row)
    return rows


def _table_cells(rows: Sequence[Row], columns: Sequence[Column]) -> tuple[list[str], list[list[str]], int]:
    with_delta = any(r.is_reference for r in rows)
    with_lr = _several_lrs((r.optimizer, r.rho, r.lr) for r in rows)
    headers = ["optimizer", "ρ"] + ["lr"] * with_lr + ["seeds"] + [c.header for c in columns[:1]]
    headers += [DELTA_HEADER] if with_delta else []
    headers += [c.header for c in columns[1:]]
    body = []
    for row in rows:
        cells = _point_cells((row.optimizer, row.rho, row.lr), with_lr) + [str(row.n), row.cell(columns[0])]
        cells += [row.delta_cell()] if with_delta else []
        cells += [row.cell(c) for c in columns[1:]]
        body.append(cells)
    return headers, body, 3 + with_lr


def markdown_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """The aggregated table in Markdown (a Δ-to-AdamW column when AdamW is among the rows)."""
    headers, body, text_columns = _table_cells(rows, columns)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """The same table aligned for a terminal."""
    headers, body, text_columns = _table_cells(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    fmt_line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([fmt_line(headers)] + [fmt_line(r) for r in body])


def results_csv(runs: Sequence[Run], budgets: Mapping[str, Sequence[Run]] | None = None) -> str:
    """One line per run with its headline numbers (CSV text); ``budget``: the comparisons a run
    belongs to (equal steps, equal compute, or both)."""
    from samlm.studies import robustness_report

    robust: list[str] = []
    if robustness_report.measured(runs):  # --robustness: each σ's, int8's, int4's Δloss and the forgetting
        level = robustness_report.matched_level(runs)  # x*, matched over every run in the file
        runs = [robustness_report.flatten(r, level) for r in runs]
        robust = [f"robust_noise_{s:g}" for s in robustness_report.sigmas(runs)] + ["robust_int8", "robust_int4"]
        if level is not None:
            robust += [robustness_report.FORGET_KEY, "robust_forgetting_level"]
            runs = [replace(r, summary={**r.summary, "robust_forgetting_level": level}) for r in runs]
    fields = (*CSV_FIELDS, *robust)
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=(*fields, "budget"), lineterminator="\n")
    writer.writeheader()
    for run in runs:
        kinds = [kind for kind, group in (budgets or {}).items() if any(r.name == run.name for r in group)]
        values = {"run": run.name, "budget": "+".join(kinds) or "steps"}
        for key in fields[1:]:
            value = run.summary.get(key)
            values[key] = "" if value is None else value
        writer.writerow(values)
    return buffer.getvalue()


# --------------------------------------------------------------------------- curves and plots


def metric_series(run: Run, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` over a run's metrics lines; ``sharpness.KEY`` reads the sharpness dict."""
    points = []
    for record in run.metrics:
        if metric.startswith("sharpness."):
            value = (record.get("sharpness") or {}).get(metric.split(".", 1)[1])
        else:
            value = record.get(metric)
        value = finite_number(value)
        if value is not None and isinstance(record.get("step"), int):
            points.append((record["step"], value))
    deduped = dict(points)  # a step measured twice keeps its last value
    return sorted(deduped.items())


def mean_curve(runs: Sequence[Run], metric: str) -> tuple[list[int], list[float], list[float | None]]:
    """Steps where every run has ``metric``, with the mean and sample std across runs."""
    series = [dict(metric_series(r, metric)) for r in runs]
    series = [s for s in series if s]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    means, stds = [], []
    for step in steps:
        mean, std, _ = mean_std(s[step] for s in series)
        means.append(mean)
        stds.append(std)
    return steps, means, stds


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = _stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    io.atomic_write_bytes(path, buffer.getvalue())


def _draw(ax, runs_by_group, metric: str, colors: dict, *, from_step: int = 0) -> bool:
    drew = False
    with_lr = _several_lrs(runs_by_group)
    for key, members in runs_by_group.items():
        steps, means, stds = mean_curve(members, metric)
        keep = [i for i, s in enumerate(steps) if s >= from_step]
        if not keep:
            continue
        x = [steps[i] for i in keep]
        y = [means[i] for i in keep]
        label = f"{group_label(*(key if with_lr else key[:2]))} (n={len(members)})"
        ax.plot(x, y, marker="o" if len(x) < 12 else None, markersize=3, color=colors[key], label=label)
        s = [stds[i] for i in keep]
        if all(v is not None for v in s) and len(x) > 1:
            ax.fill_between(
                x,
                [a - b for a, b in zip(y, s)],
                [a + b for a, b in zip(y, s)],
                color=colors[key],
                alpha=0.15,
                linewidth=0,
            )
        drew = True
    return drew


def _colors(groups) -> dict:
    palette = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#9467bd",
        "#ff7f0e",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return {key: palette[i % len(palette)] for i, key in enumerate(groups)}


def plot_val_loss(runs: Sequence[Run], path: str | Path, *, title: str = "") -> Path | None:
    """Validation loss vs step, one line per (optimizer, rho, lr) (mean over seeds, ±std band);
    the right panel zooms into the second half of training. None if no run has val_loss."""
    groups = group_runs(runs)
    if not any(metric_series(r, "val_loss") for r in runs):
        return None
    plt = _pyplot()
    colors = _colors(groups)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4))
    _draw(full, groups, "val_loss", colors)
    last = max(s for r in runs for s, _ in metric_series(r, "val_loss"))
    if not _draw(zoom, groups, "val_loss", colors, from_step=last // 2 or 1):
        _draw(zoom, groups, "val_loss", colors)
    full.set_title("validation loss")
    zoom.set_title(f"validation loss, steps ≥ {last // 2}")
    for ax in (full, zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
    zoom.legend(fontsize=8)
    return _finish_figure(plt, fig, path, title)


def _finish_figure(plt, fig, path, title: str) -> Path:
    """Title, atomic save and close: the common end of every plot."""
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


SHARPNESS_PANELS = (
    ("sharpness.hessian_lambda_max", "λ_max(H)"),
    ("sharpness.gauss_newton_lambda_max", "λ_max(GN)"),
    ("sharpness.preconditioned_lambda_max", "λ_max(P⁻¹H)"),
    ("sharpness.logit_functional_ratio", "‖δ_logit‖ / ‖δ_func‖"),
)


def plot_sharpness(runs: Sequence[Run], path: str | Path, *, title: str = "") -> Path | None:
    """λ_max(H), λ_max(GN), λ_max(P⁻¹H) and the logit/functional path ratio vs step (mean over seeds)."""
    groups = group_runs(runs)
    if not any(metric_series(r, SHARPNESS_PANELS[0][0]) for r in runs):
        return None
    plt = _pyplot()
    colors = _colors(groups)
    fig, axes = plt.subplots(1, len(SHARPNESS_PANELS), figsize=(4.3 * len(SHARPNESS_PANELS), 3.8))
    for ax, (metric, name) in zip(axes, SHARPNESS_PANELS):
        _draw(ax, groups, metric, colors)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _finish_figure(plt, fig, path, title)


# --------------------------------------------------------------------------- the report


def describe_setup(summary: Mapping[str, Any], several_lrs: bool = False) -> str:
    """One paragraph on the shared setup of a comparison, from one run's summary (missing fields: "?";
    ``several_lrs``: the runs differ in peak lr)."""
    config = summary.get("config", {}) or {}
    resolved = summary.get("resolved", {}) or {}

    def get(source: Mapping, key: str, fmt: str = "") -> str:
        value = source.get(key)
        if value is None:
            return "?"
        try:
            return format(value, fmt)
        except (TypeError, ValueError):
            return str(value)

    if config.get("model"):
        model = f"`{config['model']}`"
    else:
        model = f"{get(config, 'arch')} {get(config, 'layers')} layers × {get(config, 'width')} wide, {get(config, 'heads')} heads"
    parts = [
        f"Model: {model} ({get(resolved, 'params', ',')} parameters, {get(resolved, 'non_embedding_params', ',')} "
        "non-embedding)",
        f"data: `{get(config, 'data')}` ({get(resolved, 'tokenizer')} tokenizer, context {get(config, 'context')}, "
        f"{get(resolved, 'train_tokens', ',')} training / {get(resolved, 'val_tokens', ',')} validation tokens)",
        f"budget: {get(resolved, 'total_steps')} steps × {get(resolved, 'tokens_per_step')} tokens "
        f"(batch {get(config, 'batch')} × grad-accum {get(config, 'grad_accum')}), the same for every optimizer",
        ("peak lr per run (the lr column), AdamW" if several_lrs else f"AdamW peak lr {get(config, 'lr', 'g')},")
        + f" β=({', '.join(map(str, config.get('betas') or ('?', '?')))}), eps "
        f"{get(config, 'adam_eps', 'g')}, weight decay {get(config, 'weight_decay')}, {get(resolved, 'warmup_steps')} "
        f"warmup steps, then cosine to {get(config, 'min_lr_ratio')}× peak",
        f"SAM family: ascent on {get(config, 'ascent_fraction')} of each batch, m={get(config, 'm')}",
        f"machine: {summary.get('machine', '?')}, torch {summary.get('torch_version', '?')} on {summary.get('device', '?')}",
    ]
    return "; ".join(parts) + "."


BUDGET_HEADERS = {"steps": "equal steps", "compute": "equal compute"}


def budget_table(budgets: Mapping[str, Sequence[Run]], reference: str = REFERENCE_OPTIMIZER) -> str | None:
    """Markdown: each method's val-loss Δ to ``reference``, paired by seed, at equal steps and at
    equal compute (mean ± std over seed pairs, and their number), beside the step cost the
    compute budget assumed and the step-time ratio measured. None without the reference."""
    from samlm.optim.registry import METHODS

    groups = {kind: group_runs(runs) for kind, runs in budgets.items()}
    references = {kind: tuned_point(g, reference) for kind, g in groups.items()}
    if not any(references.values()):
        return None
    order = list(dict.fromkeys(key for g in groups.values() for key in g))
    with_lr = _several_lrs(order)
    timing_kind = "steps" if "steps" in groups else "compute"
    timing, timing_reference = groups[timing_kind], references[timing_kind]
    ref_step = mean_std(r.summary.get("step_s") for r in timing.get(timing_reference, []))[0]
    headers = ["optimizer", "ρ"] + ["lr"] * with_lr + ["step cost (model)", "step time (measured)"]
    for kind in budgets:
        headers += [f"steps ({BUDGET_HEADERS[kind]})", BUDGET_HEADERS[kind]]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---|" * with_lr + "---:|" * (len(headers) - 2 - with_lr)]
    for key in order:
        sample = next(g[key][0] for g in groups.values() if key in g)
        config = sample.summary.get("config", {})
        fraction = float(config.get("ascent_fraction", 0.25))
        # the schedule the run used: a SAM step every k-th step, plain steps before --sam-start
        start = start_fraction(float(config.get("sam_start") or 0), sample.summary.get("steps") or config.get("steps"))
        cost = (
            METHODS[key[0]].step_cost(fraction, sam_every=int(config.get("sam_every") or 1), sam_start_fraction=start)
            if key[0] in METHODS
            else None
        )
        step = mean_std(r.summary.get("step_s") for r in timing.get(key, []))[0]
        measured = f"{step / ref_step:.2f}x" if step and ref_step else "n/a"
        cells = _point_cells(key, with_lr) + ["n/a" if cost is None else f"{cost:.3g}x", measured]
        for kind, g in groups.items():
            members = g.get(key, [])
            steps = sorted({r.summary.get("steps") for r in members})
            cells.append(", ".join(map(str, steps)) or "–")
            if key == references[kind]:
                cells.append("(reference)")
            elif not members or references[kind] is None:
                cells.append("n/a")
            else:
                cells.append(format_delta(paired_delta(members, g[references[kind]])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slices_text(summary: Mapping[str, Any]) -> str:
    """Which validation batches the tuning and the report slice are, from a run's ``resolved``."""
    resolved = summary.get("resolved") or {}
    tuning, held_out = resolved.get("tuning_batches"), resolved.get("report_batches")
    if not (tuning and held_out):
        return "the tuning slice (the validation batches val loss is measured on), reported on the report slice"
    return (
        f"the tuning slice (validation batches 1-{tuning}), reported on the report slice "
        f"(batches {tuning + 1}-{tuning + held_out})"
    )


def tuned_table(runs: Sequence[Run], reference: str = REFERENCE_OPTIMIZER) -> str | None:
    """Markdown: each method's (lr, ρ) point chosen by its mean val loss over seeds on the tuning
    slice (:func:`tuned_point`), with that choice's loss on the disjoint report slice and its
    difference to the tuned ``reference``'s at the same seed. None unless some method ran at more
    than one point."""
    groups = group_runs(runs)
    methods = list(dict.fromkeys(key[0] for key in groups))
    points = {m: sum(key[0] == m for key in groups) for m in methods}
    if max(points.values(), default=0) < 2:
        return None
    chosen = {m: tuned_point(groups, m) for m in methods}
    reference_runs = groups[chosen[reference]] if reference in chosen else None
    headers = [
        "method",
        "points",
        "chosen lr",
        "chosen ρ",
        "seeds",
        "val loss (tuning slice)",
        "report loss (report slice)",
        f"Δ report loss vs tuned {reference} (paired)",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        key, members = chosen[method], groups[chosen[method]]
        if reference_runs is None:
            delta = "n/a"
        elif method == reference:
            delta = "(reference)"
        else:
            delta = format_delta(paired_delta(members, reference_runs, REPORT_KEY))
        cells = [
            method,
            str(points[method]),
            value_text(key[2]),
            value_text(key[1]),
            str(len(members)),
            format_mean_std(*mean_std(r.summary.get(TUNING_KEY) for r in members)[:2]),
            format_mean_std(*mean_std(r.summary.get(REPORT_KEY) for r in members)[:2]),
            delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(
    runs: Sequence[Run],
    *,
    title: str = "samlm compare",
    notes: str = "",
    unfinished: Sequence[str] = (),
    plots: Sequence[str] = (),
    budgets: Mapping[str, Sequence[Run]] | None = None,
) -> str:
    rows = aggregate(runs)
    lines = [f"# {title}", ""]
    if runs:
        lines += [describe_setup(runs[0].summary, _several_lrs(r.group for r in runs)), ""]
        config = runs[0].summary.get("config", {})
        sharp = runs[0].summary.get("sharpness") or {}
        lines += [
            "Mean ± sample standard deviation over seeds; **seeds** is the number of runs behind each row "
            "(one run: no ±). val loss/ppl: the final validation loss (nats per token) and perplexity on the "
            "tuning slice of the validation split; report loss: on the disjoint report slice after it; "
            "train loss: mean over the last evaluation window; step time and tokens/s exclude evaluation "
            "and sharpness measurements.",
            "",
        ]
        if config.get("sharpness", True):
            lines += [
                f"Sharpness at the end of training, fp32, eval mode, on {config.get('sharpness_batches')} fixed "
                f"validation batch(es) of {config.get('sharpness_batch_size')} sequences: λ_max of the Hessian (H) "
                f"and of the Gauss-Newton matrix (GN) by Lanczos ({config.get('sharpness_iters')} iterations), "
                "λ_max(P⁻¹H) = λ_max(P^-1/2 H P^-1/2) with P = √v̂ + eps from each run's own Adam/Adafactor state "
                "(Cohen et al. 2022's preconditioned sharpness; n/a for SGD; for Muon's matrices P⁻¹ is its "
                "Newton–Schulz map frozen at the momentum, docs/optimizers.md), and "
                f"logit/func = ‖δ_logit‖/‖δ_func‖, the two paths of SAM's gradient change at "
                f"ρ={sharp.get('rho', config.get('sharpness_rho'))} (the same ρ for every optimizer).",
                "",
            ]
        if any(r.is_reference for r in rows):
            tuned = (
                "; AdamW ran at several learning rates: its point with the lowest mean val loss is the reference"
                if sum(r.optimizer == REFERENCE_OPTIMIZER for r in rows) > 1
                else ""
            )
            lines += [
                f"{DELTA_HEADER}: mean ± std over seeds of (val loss − AdamW's val loss at the same seed{tuned}). "
                "The "
                "seed fixes the initial weights and the order of the training batches for every optimizer, so "
                "this paired difference is free of most seed-to-seed variation; a difference smaller than "
                "about twice its std/√n is within noise.",
                "",
            ]
        lines += [markdown_table(rows), ""]
        lines += _tuned_section(budgets or {"steps": runs})
        compute = budget_table(budgets) if budgets and "compute" in budgets else None
        if compute is not None:
            lines += [
                "## Equal steps and equal compute",
                "",
                "Δ val loss vs AdamW, paired by seed (mean ± std over seed pairs, n = pairs). **Equal steps**: every "
                "method runs the same number of steps (the SAM family then spends more compute). **Equal compute**: "
                "every method gets the forward+backward compute of the costliest method in the comparison, so "
                "cheaper methods (AdamW first) run proportionally more steps, with their warmup, schedule and "
                "evaluation cadence stretched to their own length; one AdamW run per seed serves every method. "
                "Step cost (model): a step's passes over the batch counted with a backward as 2 forwards, relative "
                "to AdamW (SAM: + the ascent rows; Functional-SAM: + a forward of the other rows), from the method "
                "registry; step time (measured): this comparison's mean step time over AdamW's (wall clock, noisy "
                "on a shared machine; `samlm bench` measures it side by side).",
                "",
                compute,
                "",
            ]
        from samlm.studies import robustness_report

        frontier = next((p for p in plots if Path(p).name == robustness_report.FRONTIER_PLOT), None)
        lines += robustness_report.section(budgets or {"steps": runs}, plot=frontier)
    else:
        lines += ["No finished runs yet.", ""]
    if notes:
        lines += [notes.strip(), ""]
    from samlm.studies.robustness_report import FRONTIER_PLOT

    for plot in plots:
        if Path(plot).name == FRONTIER_PLOT:
            continue  # in the robustness section
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    if unfinished:
        lines += ["Unfinished runs (not in the table): " + ", ".join(unfinished), ""]
    if runs:
        lines += ["Runs: " + ", ".join(f"`{r.name}`" for r in runs), ""]
    return "\n".join(lines)


def _tuned_section(budgets: Mapping[str, Sequence[Run]]) -> list[str]:
    """The "Tuned" table(s) of the report: one per budget, each chosen under its own budget."""
    tables = {kind: table for kind, runs in budgets.items() if (table := tuned_table(runs)) is not None}
    if not tables:
        return []
    sample = budgets[next(iter(tables))][0].summary
    per_budget = (
        " The choice is made separately under each budget, among that budget's runs." if len(budgets) > 1 else ""
    )
    lines = [
        "## Tuned",
        "",
        f"For each method, the (lr, ρ) point chosen by mean val loss (over seeds) on {slices_text(sample)}, "
        "which the choice did not see, so the reported loss is free of the selection's optimism. points: the "
        f"(lr, ρ) points the method ran (every one is in the table above); Δ: report loss minus the tuned "
        f"{REFERENCE_OPTIMIZER}'s at the same seed (mean ± std over seed pairs, n = pairs).{per_budget}",
        "",
    ]
    for kind, table in tables.items():
        lines += [f"At {BUDGET_HEADERS[kind]}:", "", table, ""]
    return lines


def write_report(
    out_dir: str | Path,
    runs: Sequence[Run],
    *,
    title: str = "samlm compare",
    notes: str = "",
    unfinished: Sequence[str] = (),
    budgets: Mapping[str, Sequence[Run]] | None = None,
) -> dict[str, Path]:
    """``report.md``, ``results.csv``, ``val_loss.png`` and ``sharpness.png`` in ``out_dir``; with runs
    measured by ``--robustness``, a robustness section and ``forgetting.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_title = title
    for key, plot in (("val_loss", plot_val_loss), ("sharpness", plot_sharpness)):
        path = plot(runs, out_dir / (VAL_LOSS_PLOT if key == "val_loss" else SHARPNESS_PLOT), title=plot_title)
        if path is not None:
            written[key] = path
    from samlm.studies import robustness_report

    frontier = robustness_report.plot_frontier(
        budgets or {"steps": runs}, out_dir / robustness_report.FRONTIER_PLOT, title=plot_title
    )
    if frontier is not None:
        written["forgetting"] = frontier
    every = list({r.name: r for group in (budgets or {}).values() for r in group}.values()) or runs
    io.atomic_write_text(out_dir / RESULTS_FILE, results_csv(every, budgets))
    written["csv"] = out_dir / RESULTS_FILE
    text = report_markdown(
        runs,
        title=title,
        notes=notes,
        unfinished=unfinished,
        plots=[p.name for k, p in written.items() if k != "csv"],
        budgets=budgets,
    )
    io.atomic_write_text(out_dir / REPORT_FILE, text)
    written["report"] = out_dir / REPORT_FILE
    return written
