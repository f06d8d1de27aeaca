"""Statistics over seeds and how they read in a table, for every report of the studies.

A group of runs is summarised by the mean ± the *sample* standard deviation (n − 1 in the
denominator) of the finite values it has, with their number; a method is compared to a reference
*paired by seed* (the seed fixes the initial weights and the data order for every method), as the
mean ± std of the per-seed differences over the seeds both have, with the Student-t 95% interval of
their mean (:func:`t_interval`). A method is ahead or behind the reference only when that interval
excludes 0 (:func:`verdict`); with one seed pair there is no interval. Wall-clock numbers, whose
noise is one-sided (a busy core only slows a run), are summarised by the median and the range
(:func:`median_range`).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Stat = tuple[float | None, float | None, int]  # (mean, sample std, n): std None when n < 2, mean None when n = 0
Spread = tuple[float | None, float | None, float | None, int]  # (median, min, max, n): None when n = 0
CONFIDENCE = 0.95
AHEAD, BEHIND, WITHIN_NOISE = "ahead", "behind", "within noise"


def finite_number(value: Any) -> float | None:
    """A finite float, or None (missing, null, "nan", booleans, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean_std(values: Iterable[Any]) -> Stat:
    """(mean, sample std, n) of the finite numbers among ``values``; std is None when n < 2."""
    numbers = [v for v in (finite_number(x) for x in values) if v is not None]
    if not numbers:
        return None, None, 0
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None, len(numbers)


def paired_differences(mine: Iterable[tuple[Any, Any]], theirs: Iterable[tuple[Any, Any]]) -> list[float]:
    """``value − the reference's value at the same seed`` for each ``(seed, value)`` of ``mine`` whose
    seed the reference (``theirs``, ``(seed, value)`` pairs) has, where both values are finite."""
    by_seed = {seed: finite_number(value) for seed, value in theirs}
    differences = []
    for seed, value in mine:
        value, other = finite_number(value), by_seed.get(seed)
        if value is not None and other is not None:
            differences.append(value - other)
    return differences


def paired_delta(mine: Iterable[tuple[Any, Any]], theirs: Iterable[tuple[Any, Any]]) -> Stat:
    """(mean, sample std, number of seed pairs) of :func:`paired_differences`."""
    return mean_std(paired_differences(mine, theirs))


def t_interval(delta: Stat, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Student-t interval of a mean from its (mean, sample std, n): mean ± t(1 − α/2, n − 1) · std / √n
    (for a paired delta, the interval of the mean per-seed difference); None when n < 2."""
    mean, std, n = delta
    if mean is None or std is None or n < 2:
        return None
    from scipy.stats import t  # scipy is slow to import and only the reports need it

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def verdict(delta: Stat, *, higher_is_better: bool = False, confidence: float = CONFIDENCE) -> str:
    """``ahead`` or ``behind`` the reference when the delta's :func:`t_interval` excludes 0, else
    ``within noise``; ``undecided (n=1)`` with one pair (no interval), ``n/a`` with none."""
    interval = t_interval(delta, confidence)
    if interval is None:
        return "undecided (n=1)" if delta[2] == 1 else "n/a"
    low, high = interval
    if low <= 0 <= high:
        return WITHIN_NOISE
    return AHEAD if (low > 0) == higher_is_better else BEHIND


def format_interval(delta: Stat, fmt: str = "+.4f", confidence: float = CONFIDENCE) -> str:
    """``"[-0.0800, -0.0200]"`` (:func:`t_interval`); ``"no interval (n=1)"``; ``"n/a"`` without pairs."""
    interval = t_interval(delta, confidence)
    if interval is None:
        return "no interval (n=1)" if delta[2] == 1 else "n/a"
    return f"[{format(interval[0], fmt)}, {format(interval[1], fmt)}]"


def median_range(values: Iterable[Any]) -> Spread:
    """(median, min, max, n) of the finite numbers among ``values``."""
    numbers = sorted(v for v in (finite_number(x) for x in values) if v is not None)
    if not numbers:
        return None, None, None, 0
    return statistics.median(numbers), numbers[0], numbers[-1], len(numbers)


def format_median_range(spread: Spread, fmt: str = ".1f", scale: float = 1.0) -> str:
    """``"15.5 (13.2–17.0)"``: the median and the range; ``"15.5"`` for one value; ``"n/a"`` for none."""
    median, low, high, n = spread
    if median is None or low is None or high is None:
        return "n/a"
    text = format(median * scale, fmt)
    return text if n < 2 else f"{text} ({format(low * scale, fmt)}–{format(high * scale, fmt)})"


def format_mean_std(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    """``"1.2345 ± 0.0123"``; ``"1.2345"`` without a std; ``"n/a"`` without a mean."""
    if mean is None:
        return "n/a"
    text = format(mean, fmt)
    return text if std is None else f"{text} ± {format(std, fmt)}"


def format_delta(delta: Stat, show_n: bool = True, fmt: str = "+.4f") -> str:
    """A signed difference (mean, std, pairs): ``"-0.0500 ± 0.0100 (n=2)"``; ``"n/a"`` without pairs."""
    mean, std, n = delta
    if n == 0:
        return "n/a"
    return format_mean_std(mean, std, fmt).replace("± +", "± ") + (f" (n={n})" if show_n else "")


def value_text(value: float | None) -> str:
    """A setting's value in a table (``–``: none)."""
    return "–" if value is None else f"{value:g}"


def edge_mark(value: float | None, values: Iterable[float | None] | None) -> str:
    """``" (edge)"`` when ``value`` is the smallest or largest of a grid of 3 or more ``values``: a
    tuned choice there may have its optimum beyond the grid."""
    grid = sorted({v for v in (values or []) if v is not None})
    return " (edge)" if value is not None and len(grid) >= 3 and value in (grid[0], grid[-1]) else ""


def percent(rate: float) -> str:
    """A fraction as a percentage in a table: ``0.05`` -> ``5%``."""
    return f"{100 * rate:g}%"


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The rows as CSV text under ``header`` (None: an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()
