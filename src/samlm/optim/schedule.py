"""Which steps of a SAM-family optimizer are SAM steps: the cheap schedules (``sam_every``, ``sam_start``).

Step ``n`` (optimizer steps so far, taken or skipped) is a SAM step when ``n >= start`` and
``(n - start) % every == 0``; the others are plain base-optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamSchedule:
    every: int = 1
    start: int = 0

    @classmethod
    def of(cls, sam_every: int = 1, sam_start: int | float = 0, total_steps: int | None = None) -> SamSchedule:
        """From the wrapper's arguments: ``sam_start`` a step index, or a fraction in (0, 1) of
        ``total_steps``."""
        if not (_is_int(sam_every) and sam_every >= 1):
            raise ValueError(f"sam_every must be an integer >= 1, got {sam_every!r}")
        if total_steps is not None and not (_is_int(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        return cls(every=sam_every, start=start_step(sam_start, total_steps))

    def is_sam_step(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0


def start_step(sam_start: int | float, total_steps: int | None) -> int:
    """The first step index of the SAM phase: ``sam_start`` itself, or ⌈fraction · total_steps⌉."""
    if _is_int(sam_start) and sam_start >= 0:
        return sam_start
    if isinstance(sam_start, float) and sam_start == 0:
        return 0
    if not (isinstance(sam_start, float) and 0 < sam_start < 1):
        raise ValueError(
            f"sam_start must be a step index (int >= 0) or a fraction of the run in (0, 1), got {sam_start!r}"
        )
    if total_steps is None:
        raise ValueError(
            f"sam_start={sam_start} is a fraction of the run: pass total_steps= (the run's "
            f"optimizer steps), or give sam_start as a step index"
        )
    return math.ceil(sam_start * total_steps - 1e-9)
