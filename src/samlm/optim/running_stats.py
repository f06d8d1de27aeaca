"""Norm layers' running statistics across SAM's passes.

A SAM step runs the model more than once on the same data. Left alone, every train-mode
forward moves BatchNorm's ``running_mean``/``running_var`` and its ``num_batches_tracked``
counter, so one step counts its data several times, partly at the perturbed weights w+ε
(peers.md, problem 6). The usual workaround, setting the momentum to 0 for the second pass,
still counts the batch, and for ``momentum=None`` (a cumulative average) it is not a freeze
at all. Here the buffers are snapshotted and copied back in place, bitwise, around the passes
that must not count; the in-place copy keeps DDP's buffer references valid.

Which pass counts is the optimizer's ``running_stats`` policy:

    "ascent"   the ascent pass at the clean weights w (default; Foret et al.'s reference keeps
               the first pass's state, and davda54/sam's example freezes the second pass)
    "descent"  the descent pass at w+ε, which sees every row of the batch once
    "all"      every pass, what naive two-pass code does
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.nn.modules.batchnorm import _NormBase

RUNNING_STATS = ("ascent", "descent", "all")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that keep running statistics (BatchNorm*, SyncBatchNorm,
    InstanceNorm* with ``track_running_stats=True``)."""
    return [
        m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
    ]


def _tensors(layers: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for layer in layers for name in _BUFFERS if (t := getattr(layer, name, None)) is not None]


@contextlib.contextmanager
def frozen_running_stats(model: torch.nn.Module | list[torch.nn.Module] | None) -> Iterator[None]:
    """Leave the running statistics of ``model``'s norm layers bitwise as they were before
    the block, whatever forwards run inside it. ``model``: a module, a list of norm layers
    (``norm_layers(model)``), or None (nothing to freeze).

    For the davda54-style surface::

        loss_fn(model(x)).backward(); opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            loss_fn(model(x)).backward()
        opt.second_step(zero_grad=True)
    """
    layers = model if isinstance(model, list) else norm_layers(model) if model is not None else []
    buffers = _tensors(layers)
    if not buffers:
        yield
        return
    with torch.no_grad():
        saved = [t.clone() for t in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(buffers, saved):
                t.copy_(s)


def check_policy(running_stats: str) -> str:
    if running_stats not in RUNNING_STATS:
        raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {running_stats!r}")
    return running_stats
