"""The studies' plots: matplotlib through its Agg backend (no display needed), one palette, PNGs
written atomically (:mod:`samlm.io`); and the comparison's figures (:func:`write_plots`):

* ``val_loss.png``: the validation loss over training, mean over seeds with a ±std band, and a zoom
  into the second half when it holds enough evaluations to be more than a dot; with a single
  evaluation per run, the final loss per method instead of a "curve" of one point;
* ``sharpness.png``: the end-of-run sharpness per method, each run a point and the mean ± std over
  seeds (a per-method chart: measured once, at the end, it has no step axis);
* ``sharpness_curves.png``: sharpness over training, only when runs measured it along the way
  (``--sharpness-every``) at least :data:`MIN_CURVE_POINTS` times.

Equal-compute runs (the cheaper methods given the costliest one's compute as extra steps) are drawn
beside the others in their method's color, dashed (hollow squares per method), labelled as such.
Legends sit outside the axes."""

from __future__ import annotations

import io as _stdio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from samlm import io
from samlm.studies.runs import Run, equal_compute_only, group_label, group_runs, several_lrs
from samlm.studies.stats import finite_number, mean_std

VAL_LOSS_PLOT = "val_loss.png"
SHARPNESS_PLOT = "sharpness.png"
SHARPNESS_CURVES_PLOT = "sharpness_curves.png"
MIN_ZOOM_POINTS = 3  # fewer evaluations past the zoom's start: no zoom panel (it would repeat a dot)
MIN_CURVE_POINTS = 3  # sharpness measured fewer times along training: no curves
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def colors(groups: Iterable) -> dict:
    """One palette color per group, in order."""
    return {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(groups)}


def png_bytes(fig, **savefig) -> bytes:
    """The figure as PNG bytes (``savefig``: matplotlib's ``savefig`` options)."""
    buffer = _stdio.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


def finish_figure(plt, fig, path, title: str) -> Path:
    """Title, atomic save and close: the common end of every plot."""
    if title:  # just above the axes' titles (the tight bounding box takes it in)
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    path = Path(path)
    io.atomic_write_bytes(path, png_bytes(fig, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def point_label(key: tuple, members: Sequence, with_lr: bool, note: str = "") -> str:
    """A group's legend entry: its point (with its lr only when the points differ in lr), a ``note``
    (``equal compute, 90 steps``) and its runs."""
    return f"{group_label(*(key if with_lr else key[:2]))}{f', {note}' if note else ''} (n={len(members)})"


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
        means.append(float("nan") if mean is None else mean)  # every step has a value: never nan
        stds.append(std)
    return steps, means, stds


@dataclass(frozen=True)
class Series:
    """One line (or one column of a per-method chart): a point's runs under one budget."""

    key: tuple  # (optimizer, ρ, lr)
    runs: Sequence[Run]
    label: str
    color: str
    equal_compute: bool = False

    @property
    def linestyle(self) -> str:
        return "--" if self.equal_compute else "-"

    @property
    def short(self) -> str:
        """Its tick label on a per-method chart."""
        point = self.label.rsplit(" (n=", 1)[0].split(", equal compute")[0]
        return point + "\n(equal compute)" if self.equal_compute else point


def series(runs: Sequence[Run], equal_compute: Sequence[Run] = ()) -> list[Series]:
    """One :class:`Series` per point of ``runs``, then one per point of the ``equal_compute`` runs
    (marked, in their point's color)."""
    groups, longer = group_runs(runs), group_runs(equal_compute)
    palette = colors(dict.fromkeys([*groups, *longer]))
    with_lr = several_lrs([*groups, *longer])
    out = [Series(key, members, point_label(key, members, with_lr), palette[key]) for key, members in groups.items()]
    for key, members in longer.items():
        steps = "/".join(map(str, sorted({r.summary.get("steps", "?") for r in members})))
        label = point_label(key, members, with_lr, f"equal compute, {steps} steps")
        out.append(Series(key, members, label, palette[key], equal_compute=True))
    return out


def _curve(ax, line: Series, metric: str, from_step: int = 0) -> bool:
    steps, means, stds = mean_curve(line.runs, metric)
    keep = [i for i, s in enumerate(steps) if s >= from_step]
    if not keep:
        return False
    x, y, s = [steps[i] for i in keep], [means[i] for i in keep], [stds[i] for i in keep]
    marker = None if len(x) >= 12 else ("s" if line.equal_compute else "o")
    ax.plot(x, y, marker=marker, markersize=3, color=line.color, linestyle=line.linestyle, label=line.label)
    if len(x) > 1 and all(v is not None for v in s):
        lower, upper = [a - (b or 0.0) for a, b in zip(y, s)], [a + (b or 0.0) for a, b in zip(y, s)]
        ax.fill_between(x, lower, upper, color=line.color, alpha=0.12 if line.equal_compute else 0.18, linewidth=0)
    return True


def _log_if_wide(ax, values: Iterable[float | None]) -> None:
    """A log y axis when positive values span over two decades (an early λ_max spike flattens the rest)."""
    positive = [v for v in values if v is not None]
    if positive and min(positive) > 0 and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def _legend_outside(ax) -> None:
    """The legend right of the axes, off the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _per_method(ax, lines: Sequence[Series], key: str) -> bool:
    """One column per series: each run's ``summary[key]`` (hollow) and the mean ± std over seeds."""
    drew = False
    for i, line in enumerate(lines):
        values = [v for r in line.runs if (v := finite_number(r.summary.get(key))) is not None]
        if not values:
            continue
        # the runs left of the tick, their mean ± std right of it
        spread = 0.2 / max(len(values) - 1, 1)
        xs = [i - 0.25 + j * spread for j in range(len(values))] if len(values) > 1 else [i - 0.15]
        ax.scatter(xs, values, s=16, facecolors="none", edgecolors=line.color, linewidths=1.0, zorder=3)
        mean, std, _ = mean_std(values)
        ax.errorbar(
            i + 0.15,
            mean,
            yerr=std,
            fmt="s" if line.equal_compute else "o",
            color=line.color,
            markerfacecolor="white" if line.equal_compute else line.color,
            capsize=4,
            markersize=6,
            zorder=4,
        )
        drew = True
    ax.set_xticks(range(len(lines)))
    ax.set_xticklabels(
        [line.short for line in lines],
        fontsize=8,
        rotation=30 if len(lines) > 3 else 0,
        ha="right" if len(lines) > 3 else "center",
    )
    ax.set_xlim(-0.6, len(lines) - 0.4)
    ax.grid(alpha=0.3, axis="y")
    return drew


def _marker_legend(fig, equal_compute: bool) -> None:
    """The per-method charts' key, below the panels."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", color="grey", linestyle="none", markerfacecolor="none", label="one run (seed)"),
        Line2D([], [], marker="o", color="grey", linestyle="-", label="mean ± std over seeds"),
    ]
    if equal_compute:
        handles.append(
            Line2D([], [], marker="s", color="grey", markerfacecolor="white", linestyle="-", label="equal compute")
        )
    fig.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8, frameon=False
    )


def val_loss_figure(runs: Sequence[Run], *, equal_compute: Sequence[Run] = ()):
    """The validation-loss figure (module docstring), or None if no run has a val loss."""
    lines = series(runs, equal_compute)
    every = [r for line in lines for r in line.runs]
    measured = [[s for s, _ in metric_series(r, "val_loss")] for r in every]
    if not any(measured) and all(finite_number(r.summary.get("val_loss")) is None for r in every):
        return None
    plt = pyplot()
    if max(len(mean_curve(line.runs, "val_loss")[0]) for line in lines) < 2:
        fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(lines) + 2.5), 3.8))
        _per_method(ax, lines, "val_loss")
        ax.set_title("final validation loss (one evaluation per run: no curve)", fontsize=10)
        ax.set_ylabel("val loss (nats/token)")
        fig.tight_layout()
        _marker_legend(fig, any(line.equal_compute for line in lines))
        return fig
    last = max(s for steps in measured for s in steps)
    start = last // 2
    zoom = max(sum(s >= start for s in mean_curve(line.runs, "val_loss")[0]) for line in lines) >= MIN_ZOOM_POINTS
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11 if zoom else 6.5, 4), squeeze=False)
    axes = list(axes[0])
    for line in lines:
        _curve(axes[0], line, "val_loss")
        if zoom:
            _curve(axes[1], line, "val_loss", from_step=start)
    axes[0].set_title("validation loss")
    if zoom:
        axes[1].set_title(f"validation loss, steps ≥ {start}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
    _legend_outside(axes[-1])
    fig.tight_layout()
    return fig


SHARPNESS_PANELS = (
    ("hessian_lambda_max", "λ_max(H)"),
    ("gauss_newton_lambda_max", "λ_max(GN)"),
    ("preconditioned_lambda_max", "λ_max(P⁻¹H)"),
    ("logit_functional_ratio", "‖δ_logit‖ / ‖δ_func‖"),
)


def sharpness_figure(runs: Sequence[Run], *, equal_compute: Sequence[Run] = ()):
    """The end-of-run sharpness per method (module docstring), one panel per measure some run has;
    None if none has any."""
    lines = series(runs, equal_compute)
    every = [r for line in lines for r in line.runs]
    panels = [
        (k, name) for k, name in SHARPNESS_PANELS if any(finite_number(r.summary.get(k)) is not None for r in every)
    ]
    if not panels:
        return None
    plt = pyplot()
    width = max(3.2, 0.55 * len(lines) + 1.4)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        _per_method(ax, lines, key)
        _log_if_wide(ax, [finite_number(r.summary.get(key)) for r in every])
        ax.set_title(f"{name} at the end of training", fontsize=10)
    fig.tight_layout()
    _marker_legend(fig, any(line.equal_compute for line in lines))
    return fig


def sharpness_curves_figure(runs: Sequence[Run], *, equal_compute: Sequence[Run] = ()):
    """Sharpness over training (mean over seeds), when some point measured it at least
    :data:`MIN_CURVE_POINTS` times; else None."""
    lines = series(runs, equal_compute)
    first = f"sharpness.{SHARPNESS_PANELS[0][0]}"
    if max(len(mean_curve(line.runs, first)[0]) for line in lines) < MIN_CURVE_POINTS:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SHARPNESS_PANELS), figsize=(4.3 * len(SHARPNESS_PANELS), 3.8))
    for ax, (key, name) in zip(axes, SHARPNESS_PANELS):
        for line in lines:
            _curve(ax, line, f"sharpness.{key}")
        _log_if_wide(ax, [v for line in lines for v in mean_curve(line.runs, f"sharpness.{key}")[1]])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend_outside(axes[-1])
    fig.tight_layout()
    return fig


FIGURES = {
    "val_loss": (VAL_LOSS_PLOT, val_loss_figure),
    "sharpness": (SHARPNESS_PLOT, sharpness_figure),
    "sharpness_curves": (SHARPNESS_CURVES_PLOT, sharpness_curves_figure),
}


def write_plots(
    runs: Sequence[Run], out_dir: str | Path, *, title: str = "", budgets: Mapping[str, Sequence[Run]] | None = None
) -> dict[str, Path]:
    """Every figure of :data:`FIGURES` the runs have data for, written into ``out_dir`` (the
    equal-compute runs of ``budgets`` drawn beside ``runs``): {key: path}."""
    extra = equal_compute_only(budgets or {})
    written = {}
    for key, (name, figure) in FIGURES.items():
        fig = figure(runs, equal_compute=extra)
        if fig is not None:
            written[key] = finish_figure(pyplot(), fig, Path(out_dir) / name, title)
    return written


def plot_val_loss(
    runs: Sequence[Run], path: str | Path, *, title: str = "", equal_compute: Sequence[Run] = ()
) -> Path | None:
    """:func:`val_loss_figure` written to ``path`` (None: nothing to draw)."""
    fig = val_loss_figure(runs, equal_compute=equal_compute)
    return None if fig is None else finish_figure(pyplot(), fig, path, title)


def plot_sharpness(
    runs: Sequence[Run], path: str | Path, *, title: str = "", equal_compute: Sequence[Run] = ()
) -> Path | None:
    """:func:`sharpness_figure` written to ``path`` (None: nothing to draw)."""
    fig = sharpness_figure(runs, equal_compute=equal_compute)
    return None if fig is None else finish_figure(pyplot(), fig, path, title)
