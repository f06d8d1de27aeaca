"""Row slicing of batches, and the plan of which rows each pass of a step uses.

A batch is a tensor, a tuple of tensors or a dict of tensors with the batch dimension
first. A Python ``list`` of batches is a list of micro-batches that together form one
optimizer step; the step plan treats them as one virtual concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .types import Batch


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, tuple):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    raise ValueError(f"batch must be a tensor, a tuple of tensors or a dict of tensors, got {type(batch).__name__}")


def batch_rows(batch: Batch) -> int:
    """Size of the batch dimension, checked to agree across the batch's tensors."""
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if not sizes:
        raise ValueError("batch holds no tensor with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(f"batch tensors disagree on the batch dimension: sizes {sorted(sizes)}")
    return sizes.pop()


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every tensor in the batch (views, no copies)."""

    def cut(value: Any) -> Any:
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return tuple(cut(v) for v in batch)


def as_micro_batches(batch: Batch | list[Batch]) -> list[Batch]:
    if isinstance(batch, list):
        if not batch:
            raise ValueError("batch is an empty list of micro-batches")
        return batch
    return [batch]


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of micro-batch number ``micro``."""

    micro: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class GroupPlan:
    """One m-sharpness group: its ascent rows (a prefix) and its descent rows."""

    ascent: tuple[Piece, ...]
    descent: tuple[Piece, ...]

    @property
    def ascent_rows(self) -> int:
        return sum(p.rows for p in self.ascent)


def pieces_of(sizes: Sequence[int], lo: int, hi: int) -> tuple[Piece, ...]:
    """Rows [lo, hi) of the concatenated micro-batches, cut at micro-batch boundaries."""
    out, offset = [], 0
    for micro, size in enumerate(sizes):
        start, stop = max(lo, offset), min(hi, offset + size)
        if start < stop:
            out.append(Piece(micro, start - offset, stop - offset))
        offset += size
    return tuple(out)


def plan_step(sizes: Sequence[int], ascent_fraction: float, m: int) -> list[GroupPlan]:
    """Split the step's rows into m equal contiguous groups.

    Group i descends on all its rows and takes its ascent gradient on its first
    ⌈ascent_fraction · rows⌉ rows, as one data-parallel replica does with its local batch.
    """
    total = sum(sizes)
    if total % m:
        raise ValueError(f"m={m} must divide the batch size {total} (each of the m groups gets an equal share of rows)")
    group_rows = total // m
    ascent_rows = math.ceil(ascent_fraction * group_rows - 1e-9)
    if ascent_rows < 1:
        raise ValueError(
            f"batch too small: ascent_fraction={ascent_fraction} of {group_rows} rows per group leaves no ascent rows"
        )
    return [
        GroupPlan(
            ascent=pieces_of(sizes, g * group_rows, g * group_rows + ascent_rows),
            descent=pieces_of(sizes, g * group_rows, (g + 1) * group_rows),
        )
        for g in range(m)
    ]


def split_at_ascent_rows(plan: GroupPlan) -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """The group's descent rows as two runs of pieces: its ascent rows, then the others."""
    ascent_by_micro = {piece.micro: piece for piece in plan.ascent}
    rest = []
    for piece in plan.descent:
        done = ascent_by_micro.get(piece.micro)
        start = done.stop if done is not None else piece.start
        if start < piece.stop:
            rest.append(Piece(piece.micro, start, piece.stop))
    return plan.ascent, tuple(rest)
