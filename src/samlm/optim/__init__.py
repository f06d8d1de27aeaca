"""The SAM family as drop-in PyTorch optimizers (see docs/design.md for the contract). Torch only."""

from __future__ import annotations

import torch

from .descents import DescentRule, Functional, Standard
from .driver import StepStats, plain_step, sharpness_aware_step
from .perturbations import Adaptive, Euclidean, PerturbationRule, Preconditioned
from .preconditioners import register_preconditioner
from .registry import BASE_OPTIMIZERS, METHODS, SAM_FAMILY, Method, method, register, sam_family
from .running_stats import RUNNING_STATS, frozen_running_stats, norm_layers
from .schedule import SamSchedule
from .sam import (
    ASAM,
    SAM,
    FunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
    SharpnessAware,
    train_step,
)

# Derived from the registry, for existing callers.


def build_base_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                         betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0):
    """AdamW, SGD or Adafactor over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        try:  # Hugging Face's Adafactor (Bahri et al.'s setup): the harness extra, asked for by name only
            from transformers.optimization import Adafactor
        except ImportError:
            raise ValueError("base optimizer adafactor needs transformers: pip install 'samlm[harness]'") from None

        # Bahri et al.: Adafactor with a constant lr (1e-3), no relative step, no warmup init.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=weight_decay)
    raise ValueError(f"base optimizer must be one of {BASE_OPTIMIZERS}, got {name!r}")


def build_optimizer(name: str, params, *, base: str = "adamw", lr: float, rho=None,
                    ascent_fraction: float = 0.25, m: int = 1, sam_every: int = 1, sam_start=0,
                    total_steps=None, sam_kwargs=None, **base_kwargs):
    """A registered method: a base optimizer alone, or a SAM-family wrapper around ``base``.

    ``rho`` None: the method's registry default. ``sam_every``/``sam_start``/``total_steps``: the
    SAM schedule (SharpnessAware). ``sam_kwargs``: further SharpnessAware arguments
    (``sync_ascent``, ``grad_norm_fn``; see ``samlm.integrations.distributed.Prepared.sam_kwargs``).
    A plain optimizer ignores the SAM arguments."""
    entry = method(name)
    if not entry.is_sam:
        return build_base_optimizer(name, params, lr=lr, **base_kwargs)
    inner = build_base_optimizer(base, params, lr=lr, **base_kwargs)
    return entry.cls(inner, rho=rho, ascent_fraction=ascent_fraction, m=m, sam_every=sam_every,
                     sam_start=sam_start, total_steps=total_steps, **dict(sam_kwargs or {}))


__all__ = [
    "SAM", "ASAM", "FunctionalSAM", "PreconditionedSAM", "PreconditionedFunctionalSAM",
    "SharpnessAware", "Euclidean", "Adaptive", "Preconditioned", "PerturbationRule",
    "DescentRule", "Standard", "Functional",
    "register_preconditioner", "frozen_running_stats", "norm_layers", "RUNNING_STATS", "StepStats",
    "train_step", "plain_step", "sharpness_aware_step",
    "build_optimizer", "build_base_optimizer", "METHODS", "Method", "method", "register", "sam_family",
    "SAM_FAMILY", "BASE_OPTIMIZERS", "SamSchedule",
]
