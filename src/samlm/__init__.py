"""samlm: sharpness-aware optimization (SAM, ASAM, Functional-SAM, preconditioned SAM, Momentum-SAM,
LookSAM) for LMs. The package root re-exports the optimizer core, :mod:`samlm.optim`."""

from . import optim
from .optim import *  # noqa: F403 (the core's public names, listed once in samlm.optim.__all__)

__version__ = "0.1.0"

__all__ = list(optim.__all__)
