"""Statistics over seeds and how they read in a table, for every report of the studies.

A group of runs is summarised by the mean ± the *sample* standard deviation (n − 1 in the
denominator) of the finite values it has, with their number; a method is compared to a reference
*paired by seed* (the seed fixes the initial weights and the data order for every method), as the
mean ± std of the per-seed differences over the seeds both have.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Stat = tuple[float | None, float | None, int]  # (mean, sample std, n): std None when n < 2, mean None when n = 0


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
