"""How a harness runs on one or many processes: device, DDP/FSDP wrapping, SAM settings, AMP.

Both harnesses (``samlm pretrain``, ``samlm finetune``) call :func:`setup` before loading the
model (so it lands on this process's device) and :func:`parallelize` before building the
optimizer (FSDP2 replaces the parameters with sharded ones)::

    info = parallel.setup(device_flag)                    # torchrun / accelerate launch / one process
    model = load(...).to(info.device)
    par = parallel.parallelize(model, info, strategy=..., sync_ascent=..., mixed_precision=...)
    optimizer = build_optimizer(..., par.module.parameters(), sam_kwargs=par.sam_kwargs)
    train(par.model, optimizer, shard_batches(batches), scaler=par.scaler,
          step_kwargs=par.step_kwargs, ...)

``--batch`` stays the *global* batch: each of N processes trains on its N-th of every batch's
rows, so N processes with ``--sync-ascent`` (exact global SAM) follow the single-process run,
and without it each replica perturbs with its own ε (m-sharpness, m = N; Foret et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from samlm.errors import UserError
from samlm.integrations import distributed


def resolve_device(spec: str) -> torch.device | None:
    """``--device`` → a device, or None for "auto" (the launcher's local rank decides)."""
    if spec == "auto":
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {spec!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec}: only cpu and cuda are supported")
    return device


def setup(device: str = "auto") -> distributed.DistInfo:
    """Join the launcher's process group (if any) and pick this process's device."""
    wanted = resolve_device(device)
    try:
        info = distributed.setup_distributed(device=wanted)
    except ValueError as exc:  # e.g. DeepSpeed, or an unknown accelerate mixed-precision mode
        raise UserError(str(exc)) from None
    if info.device.type == "cpu":
        keep_freed_memory()
    return info


# glibc's mallopt parameters (malloc.h); the largest mmap threshold it accepts on 64-bit Linux.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD = -1, -3, 32 * 2**20


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed activation buffers instead of unmapping them.

    A CPU training step frees and allocates the same activations every step. By default glibc
    serves each block above its mmap threshold (128 KB, rising with use) with a fresh ``mmap`` and
    unmaps it at ``free``, so every step page-faults in zeroed pages again. Raising the threshold to
    its maximum and not trimming the heap keeps them: the same numbers, fewer page faults
    (docs/benchmarks.md). A no-op where glibc is not the allocator. Returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))


@dataclass
class Parallel:
    """What :func:`parallelize` gives a harness."""

    prepared: distributed.Prepared
    mixed_precision: str
    autocast_dtype: torch.dtype | None
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    sam_kwargs: dict  # for build_optimizer(sam_kwargs=...)

    @property
    def model(self) -> nn.Module:  # run forward on this, pass it to train()
        return self.prepared.model

    @property
    def module(self) -> nn.Module:  # the model itself: parameters, state_dict, generate
        return self.prepared.module

    @property
    def world_size(self) -> int:
        return self.prepared.world_size

    @property
    def strategy(self) -> str:
        return self.prepared.strategy

    @property
    def step_kwargs(self) -> dict | None:
        return {"autocast_dtype": self.autocast_dtype} if self.autocast_dtype is not None else None

    def describe(self) -> dict:
        """The settings a resumed run must share (recorded in the run's config)."""
        return {
            "world_size": self.world_size,
            "strategy": self.strategy,
            "mixed_precision": self.mixed_precision,
            "sync_ascent": bool(self.sam_kwargs.get("sync_ascent", False)),
        }


def parallelize(
    model: nn.Module,
    info: distributed.DistInfo,
    *,
    strategy: str = "auto",
    sync_ascent: bool = False,
    mixed_precision: str | None = None,
    sam: bool = True,
) -> Parallel:
    """Wrap ``model`` for this launch and choose the SAM and mixed-precision settings."""
    if strategy not in distributed.STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(distributed.STRATEGIES)}, got '{strategy}'")
    mixed = mixed_precision or info.mixed_precision
    if mixed not in distributed.MIXED_PRECISION:
        raise UserError(f"--mixed-precision must be one of {', '.join(distributed.MIXED_PRECISION)}, got '{mixed}'")
    if mixed == "fp16" and info.device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a CUDA device (use bf16 on the CPU)")
    if strategy == "fsdp" and not info.is_distributed:
        strategy = "none"  # one process: nothing to shard
    prepared = distributed.prepare(model, strategy=strategy, info=info)
    autocast_dtype, scaler = distributed.amp_settings(mixed, info.device)
    sam_kwargs = dict(prepared.sam_kwargs) if sam else {}
    if sam and sync_ascent:
        sam_kwargs["sync_ascent"] = True
    return Parallel(
        prepared=prepared, mixed_precision=mixed, autocast_dtype=autocast_dtype, scaler=scaler, sam_kwargs=sam_kwargs
    )
