"""The SAM family as drop-in PyTorch optimizers (see docs/design.md for the contract). Torch only."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .bases import CombinedOptimizer, muon_split, params_of
from .descents import DescentRule, Functional, Standard
from .driver import plain_step, sharpness_aware_step
from .looksam import LookSAM
from .momentum import Momentum, PreconditionedMomentum
from .perturbations import Adaptive, Euclidean, PerturbationRule, Preconditioned, Spectral
from .preconditioners import Orthogonalized, newton_schulz, register_preconditioner
from .registry import BASE_OPTIMIZERS, METHODS, SAM_FAMILY, Method, method, register, sam_family
from .running_stats import RUNNING_STATS, frozen_running_stats, norm_layers
from .sam import (
    ASAM,
    SAM,
    FunctionalSAM,
    MomentumSAM,
    PreconditionedFunctionalSAM,
    PreconditionedMomentumSAM,
    PreconditionedSAM,
    SharpnessAware,
    SpectralSAM,
    train_step,
)
from .schedule import SamSchedule
from .step_stats import StepStats
from .types import ParamGroup

# Derived from the registry, for existing callers.


def build_muon(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.95,
    no_decay: Collection[str] = (),
) -> CombinedOptimizer:
    """Muon (hidden matrices, lr matched to AdamW's RMS) + AdamW (everything else), as one optimizer.
    ``no_decay``: names (``model.named_parameters()``) of AdamW's parameters that take no weight
    decay (their own group; Hugging Face Trainer's decay rule)."""
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(
            f"base optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}"
        )
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            "base optimizer muon needs the model (build_optimizer(name, model, ...)) to split its "
            "hidden matrices from its embeddings, head, gains and biases"
        )
    if any(hasattr(p, "to_local") for p in model.parameters()):
        raise ValueError(
            "Muon orthogonalizes whole weight matrices, which FSDP shards across processes: "
            "use DDP (--strategy ddp) with --base muon / --optimizer muon"
        )
    others: list[Tensor] | list[ParamGroup]  # AdamW's: parameters, or groups by weight decay
    matrices, others = muon_split(model)
    muon = torch.optim.Muon(
        matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    if not others:
        return CombinedOptimizer([muon])
    if no_decay:
        undecayed = {id(p) for n, p in model.named_parameters() if n in set(no_decay)}
        groups = [
            {
                "params": [p for p in others if (id(p) in undecayed) == skip],
                "weight_decay": 0.0 if skip else weight_decay,
            }
            for skip in (False, True)
        ]
        others = [g for g in groups if g["params"]]
    adamw = torch.optim.AdamW(
        others, lr=lr, betas=cast("tuple[float, float]", tuple(betas)), eps=eps, weight_decay=weight_decay
    )
    return CombinedOptimizer([muon, adamw])


def build_base_optimizer(
    name: str,
    params: torch.nn.Module | Iterable[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW, SGD, Adafactor or Muon over ``params`` (a module, or an iterable of parameters).

    ``muon``: needs the module (``params`` = the model): ``torch.optim.Muon`` on its hidden 2-D
    matrices and AdamW on the rest (``muon_split``), combined into one optimizer. Both take the
    same ``lr`` and ``weight_decay``: Muon's ``adjust_lr_fn="match_rms_adamw"`` scales its update
    to AdamW's RMS (Liu et al. 2025), so one lr serves both; momentum 0.95 with Nesterov and 5
    Newton–Schulz steps are torch's (Jordan et al.'s) defaults."""
    if name == "muon":
        # build_muon raises a ValueError unless params is the model
        return build_muon(cast(torch.nn.Module, params), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    params = params_of(params)
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=cast("tuple[float, float]", tuple(betas)), eps=eps, weight_decay=weight_decay
        )
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        try:  # Hugging Face's Adafactor (Bahri et al.'s setup): the harness extra, asked for by name only
            from transformers.optimization import Adafactor
        except ImportError:
            raise ValueError("base optimizer adafactor needs transformers: pip install 'samlm[harness]'") from None

        # Bahri et al.: Adafactor with a constant lr (1e-3), no relative step, no warmup init.
        adafactor: torch.optim.Optimizer = Adafactor(
            params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=weight_decay
        )
        return adafactor
    raise ValueError(f"base optimizer must be one of {BASE_OPTIMIZERS}, got {name!r}")


def build_optimizer(
    name: str,
    params: torch.nn.Module | Iterable[Tensor],
    *,
    base: str = "adamw",
    lr: float,
    rho: float | None = None,
    ascent_fraction: float = 0.25,
    m: int = 1,
    sam_every: int = 1,
    sam_start: int | float = 0,
    total_steps: int | None = None,
    sam_kwargs: Mapping[str, Any] | None = None,
    **base_kwargs: Any,
) -> torch.optim.Optimizer:
    """A registered method: a base optimizer alone, or a SAM-family wrapper around ``base``.

    ``rho`` None: the method's registry default. ``sam_every``/``sam_start``/``total_steps``: the
    SAM schedule (SharpnessAware). ``sam_kwargs``: further SharpnessAware arguments
    (``sync_ascent``, ``grad_norm_fn``; see ``samlm.integrations.distributed.Prepared.sam_kwargs``).
    A plain optimizer ignores the SAM arguments."""
    entry = method(name)
    if not entry.is_sam:
        return build_base_optimizer(name, params, lr=lr, **base_kwargs)
    inner = build_base_optimizer(base, params, lr=lr, **base_kwargs)
    assert entry.cls is not None  # a SAM-family method
    optimizer: SharpnessAware = entry.cls(
        inner,
        rho=rho,
        ascent_fraction=ascent_fraction,
        m=m,
        sam_every=sam_every,
        sam_start=sam_start,
        total_steps=total_steps,
        **dict(sam_kwargs or {}),
    )
    return optimizer


__all__ = [
    "SAM",
    "ASAM",
    "FunctionalSAM",
    "PreconditionedSAM",
    "PreconditionedFunctionalSAM",
    "SpectralSAM",
    "MomentumSAM",
    "PreconditionedMomentumSAM",
    "LookSAM",
    "SharpnessAware",
    "Euclidean",
    "Adaptive",
    "Preconditioned",
    "Spectral",
    "Momentum",
    "PreconditionedMomentum",
    "PerturbationRule",
    "CombinedOptimizer",
    "muon_split",
    "build_muon",
    "newton_schulz",
    "Orthogonalized",
    "DescentRule",
    "Standard",
    "Functional",
    "register_preconditioner",
    "frozen_running_stats",
    "norm_layers",
    "RUNNING_STATS",
    "StepStats",
    "train_step",
    "plain_step",
    "sharpness_aware_step",
    "build_optimizer",
    "build_base_optimizer",
    "METHODS",
    "Method",
    "method",
    "register",
    "sam_family",
    "SAM_FAMILY",
    "BASE_OPTIMIZERS",
    "SamSchedule",
]
