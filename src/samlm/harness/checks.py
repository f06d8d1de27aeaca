"""What a run checks of its optimizer and batches before anything is trained or written: every
optimizer setting a finite float32 number, and a step a SAM-family optimizer can split into its
``m`` groups (from the settings before a run, :func:`step_split`; from the first step's batches in
the loop, :func:`step_plan`). Each failure is one ``UserError`` line."""

from __future__ import annotations

import math
from typing import Any

import torch

from samlm.errors import UserError
from samlm.harness.settings import FLOAT32_MAX
from samlm.optim import SharpnessAware
from samlm.optim.batching import batch_rows, plan_step
from samlm.optim.registry import method


def optimizer_settings(optimizer: torch.optim.Optimizer) -> None:
    """Every number an optimizer step multiplies with must be finite and fit in float32.

    torch applies ``lr``, ``weight_decay``, ``eps``, ... to fp32 weights; a value beyond
    float32's range (``lr=1e39``) fails inside the step with an overflow traceback, and NaN
    silently ruins the weights. Checked before anything is written.
    """

    def bad(value) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX)
        )

    settings: list[tuple[str, Any]] = []
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            settings.extend((key, v) for v in values)
    if isinstance(optimizer, SharpnessAware):
        settings.append(("rho", optimizer.rho))
    for key, value in settings:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if bad(value):
            name = "lr" if key == "initial_lr" else key
            raise UserError(
                f"optimizer setting {name}={value!r} is not a finite number within float32's range "
                f"(|x| <= {FLOAT32_MAX:.3g})"
            )


def step_plan(optimizer, micro_batches: list) -> None:
    """A SAM-family optimizer must be able to split a step's rows into its m groups.

    Checked on the first step of a run, so that a batch that ``m`` does not divide (or too small
    for any ascent row) is one ``UserError`` line before anything is trained or saved.
    """
    if not isinstance(optimizer, SharpnessAware):
        return
    try:
        sizes = [batch_rows(b) for b in micro_batches]
        plan_step(sizes, optimizer.ascent_fraction, optimizer.m)
    except ValueError as exc:
        rows = " + ".join(str(batch_rows(b)) for b in micro_batches) if micro_batches else "0"
        raise UserError(f"cannot split a training step of {rows} rows for SAM: {exc}") from None


def step_split(config, world_size: int = 1) -> None:
    """The same of a run's settings (``config``: its batch and optimizer settings), before anything is
    written: each process's rows of a step (micro-batch/processes × grad-accum) split into --m groups,
    each with an ascent row."""
    if not method(config.optimizer).is_sam:
        return
    rows = config.micro_batch // world_size
    try:
        plan_step([rows] * config.grad_accum, config.ascent_fraction, config.m)
    except ValueError as exc:
        per = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise UserError(
            f"cannot split a step of {rows * config.grad_accum} rows{per} for SAM "
            f"(--batch {config.batch}, --grad-accum {config.grad_accum}, --m {config.m}, "
            f"--ascent-fraction {config.ascent_fraction:g}): {exc}"
        ) from None
