"""Diagnostics: sharpness of a model (Hessian, Gauss-Newton, functional-Hessian and preconditioned
spectra, SAM's logit/functional path split). Torch only."""

from samlm.diagnostics import sharpness
from samlm.diagnostics.sharpness import *  # noqa: F403 (its public names, listed once in sharpness.__all__)

__all__ = list(sharpness.__all__)
