"""samlm: sharpness-aware optimization (SAM, ASAM, Functional-SAM, preconditioned SAM) for LMs."""

from .optim import (
    ASAM,
    SAM,
    Adaptive,
    CombinedOptimizer,
    Euclidean,
    FunctionalSAM,
    PerturbationRule,
    Preconditioned,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
    SharpnessAware,
    Spectral,
    SpectralSAM,
    StepStats,
    build_optimizer,
    frozen_running_stats,
    register_preconditioner,
    train_step,
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "ASAM",
    "FunctionalSAM",
    "PreconditionedSAM",
    "PreconditionedFunctionalSAM",
    "SharpnessAware",
    "Euclidean",
    "Adaptive",
    "Preconditioned",
    "PerturbationRule",
    "StepStats",
    "train_step",
    "build_optimizer",
    "register_preconditioner",
    "frozen_running_stats",
    "SpectralSAM",
    "Spectral",
    "CombinedOptimizer",
]
