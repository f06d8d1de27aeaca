"""The SAM family as drop-in PyTorch optimizers (see docs/design.md for the contract)."""

from __future__ import annotations

import torch

from .driver import StepStats, plain_step, sharpness_aware_step, train_step
from .perturbations import Adaptive, Euclidean, PerturbationRule, Preconditioned
from .preconditioners import register_preconditioner
from .running_stats import RUNNING_STATS, frozen_running_stats, norm_layers
from .sam import (
    ASAM,
    SAM,
    FunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
    SharpnessAware,
)

BASE_OPTIMIZERS = ("adamw", "sgd", "adafactor")
SAM_METHODS = {
    "sam": SAM,
    "asam": ASAM,
    "fsam": FunctionalSAM,
    "psam": PreconditionedSAM,
    "pfsam": PreconditionedFunctionalSAM,
}
OPTIMIZER_NAMES = BASE_OPTIMIZERS[:1] + tuple(SAM_METHODS)  # what --optimizer accepts


def build_base_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                         betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0):
    """AdamW, SGD or Adafactor over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # Bahri et al.: Adafactor with a constant lr (1e-3), no relative step, no warmup init.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=weight_decay)
    raise ValueError(f"base optimizer must be one of {BASE_OPTIMIZERS}, got {name!r}")


def build_optimizer(name: str, params, *, base: str = "adamw", lr: float, rho=None,
                    ascent_fraction: float = 0.25, m: int = 1, sam_kwargs=None, **base_kwargs):
    """``adamw`` (or ``base``) alone, or a SAM-family method (sam|asam|fsam|psam|pfsam) around it.

    ``sam_kwargs``: further SharpnessAware arguments (``sync_ascent``, ``grad_norm_fn``; see
    ``samlm.distributed.Prepared.sam_kwargs``), ignored by a plain optimizer."""
    if name in BASE_OPTIMIZERS:
        return build_base_optimizer(name, params, lr=lr, **base_kwargs)
    if name not in SAM_METHODS:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES + BASE_OPTIMIZERS[1:]}, got {name!r}")
    inner = build_base_optimizer(base, params, lr=lr, **base_kwargs)
    kwargs = {} if rho is None else {"rho": rho}
    return SAM_METHODS[name](inner, ascent_fraction=ascent_fraction, m=m, **kwargs, **dict(sam_kwargs or {}))


__all__ = [
    "SAM", "ASAM", "FunctionalSAM", "PreconditionedSAM", "PreconditionedFunctionalSAM",
    "SharpnessAware", "Euclidean", "Adaptive", "Preconditioned", "PerturbationRule",
    "register_preconditioner", "frozen_running_stats", "norm_layers", "RUNNING_STATS", "StepStats", "train_step", "plain_step", "sharpness_aware_step",
    "build_optimizer", "build_base_optimizer", "OPTIMIZER_NAMES", "SAM_METHODS",
]
