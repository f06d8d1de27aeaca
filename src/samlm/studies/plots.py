"""The studies' plots: matplotlib through its Agg backend (no display needed), one palette, PNGs
written atomically (:mod:`samlm.io`); and the comparison's curves over training, mean over seeds
with a ±std band (``val_loss.png``, ``sharpness.png``)."""

from __future__ import annotations

import io as _stdio
from collections.abc import Iterable, Sequence
from pathlib import Path

from samlm import io
from samlm.studies.runs import Run, group_label, group_runs, several_lrs
from samlm.studies.stats import finite_number, mean_std

VAL_LOSS_PLOT = "val_loss.png"
SHARPNESS_PLOT = "sharpness.png"
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
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    io.atomic_write_bytes(path, png_bytes(fig, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def point_label(key: tuple, members: Sequence, with_lr: bool) -> str:
    """A group's legend entry: its point (with its lr only when the points differ in lr) and its runs."""
    return f"{group_label(*(key if with_lr else key[:2]))} (n={len(members)})"


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


def _draw(ax, runs_by_group, metric: str, colors: dict, *, from_step: int = 0) -> bool:
    drew = False
    with_lr = several_lrs(runs_by_group)
    for key, members in runs_by_group.items():
        steps, means, stds = mean_curve(members, metric)
        keep = [i for i, s in enumerate(steps) if s >= from_step]
        if not keep:
            continue
        x = [steps[i] for i in keep]
        y = [means[i] for i in keep]
        label = point_label(key, members, with_lr)
        ax.plot(x, y, marker="o" if len(x) < 12 else None, markersize=3, color=colors[key], label=label)
        s = [stds[i] for i in keep]
        if all(v is not None for v in s) and len(x) > 1:
            lower, upper = [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)]
            ax.fill_between(x, lower, upper, color=colors[key], alpha=0.15, linewidth=0)
        drew = True
    return drew


def plot_val_loss(runs: Sequence[Run], path: str | Path, *, title: str = "") -> Path | None:
    """Validation loss vs step, one line per (optimizer, rho, lr) (mean over seeds, ±std band);
    the right panel zooms into the second half of training. None if no run has val_loss."""
    groups = group_runs(runs)
    if not any(metric_series(r, "val_loss") for r in runs):
        return None
    plt = pyplot()
    palette = colors(groups)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4))
    _draw(full, groups, "val_loss", palette)
    last = max(s for r in runs for s, _ in metric_series(r, "val_loss"))
    if not _draw(zoom, groups, "val_loss", palette, from_step=last // 2 or 1):
        _draw(zoom, groups, "val_loss", palette)
    full.set_title("validation loss")
    zoom.set_title(f"validation loss, steps ≥ {last // 2}")
    for ax in (full, zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
    zoom.legend(fontsize=8)
    return finish_figure(plt, fig, path, title)


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
    plt = pyplot()
    palette = colors(groups)
    fig, axes = plt.subplots(1, len(SHARPNESS_PANELS), figsize=(4.3 * len(SHARPNESS_PANELS), 3.8))
    for ax, (metric, name) in zip(axes, SHARPNESS_PANELS):
        _draw(ax, groups, metric, palette)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return finish_figure(plt, fig, path, title)
