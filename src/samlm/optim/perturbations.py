"""Perturbation rules: how SAM's ascent step ε is computed from the gradient.

Every rule has the form

    ε = ρ · direction(w, g) / ‖scaled_gradient(w, g)‖₂        (norms global over all tensors)

and is a small frozen object, so a rule can be swapped or written by a user (in the spirit
of optax's gradient transformations). ``P`` is the base optimizer's preconditioner
√v̂ + eps for the parameter, given only to rules with ``needs_preconditioner = True``.

| rule | scaled_gradient | direction | ε |
|---|---|---|---|
| Euclidean (Foret et al.) | g | g | ρ g/‖g‖ |
| Adaptive (ASAM, Kwon et al.) | T g | T² g | ρ T²g/‖Tg‖, T = |w| + η |
| Preconditioned (Singh et al.) | g/P | g/P | ρ u/‖u‖, u = g/P |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class PerturbationRule(Protocol):
    rho: float
    needs_preconditioner: bool

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Optional[Tensor]) -> Tensor: ...

    def direction(self, param: Tensor, grad: Tensor, precond: Optional[Tensor]) -> Tensor: ...


def _check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and rho >= 0 and rho == rho and rho != float("inf")):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


@dataclass(frozen=True)
class Euclidean:
    """Foret et al. (2021): ε = ρ g / ‖g‖."""

    rho: float = 0.05
    needs_preconditioner = False

    def __post_init__(self):
        _check_rho(self.rho)

    def scaled_gradient(self, param, grad, precond):
        return grad

    def direction(self, param, grad, precond):
        return grad


@dataclass(frozen=True)
class Adaptive:
    """ASAM, Kwon et al. (2021): ε = ρ T²g / ‖Tg‖ with T = |w| + η (scale-invariant sharpness)."""

    rho: float = 0.5
    eta: float = 0.01
    needs_preconditioner = False

    def __post_init__(self):
        _check_rho(self.rho)
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    def _t(self, param):
        return param.abs().add_(self.eta)

    def scaled_gradient(self, param, grad, precond):
        return self._t(param).mul_(grad)

    def direction(self, param, grad, precond):
        return self._t(param).square_().mul_(grad)


@dataclass(frozen=True)
class Preconditioned:
    """Singh et al. (2025): u = g / (√v̂ + eps), ε = ρ u / ‖u‖, with v̂ the base optimizer's
    bias-corrected second moment. Without a preconditioner (before the first base step) the
    driver passes ``precond=None`` and this is plain SAM."""

    rho: float = 0.05
    needs_preconditioner = True

    def __post_init__(self):
        _check_rho(self.rho)

    def scaled_gradient(self, param, grad, precond):
        return grad if precond is None else grad / precond

    def direction(self, param, grad, precond):
        return self.scaled_gradient(param, grad, precond)


def squared_norm(t: Tensor) -> Tensor:
    """‖t‖², accumulated in at least float32 (float64 stays float64)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=acc).square()


def perturbation_norm(rule: PerturbationRule, params, grads, precond) -> Tensor:
    """‖scaled_gradient‖₂ over all local tensors.

    ``precond(param)`` gives P or None; it is called per tensor so no set of
    parameter-sized temporaries is held at once.
    """
    squares = [squared_norm(rule.scaled_gradient(p, g, precond(p))) for p, g in zip(params, grads)]
    dtype = torch.promote_types(torch.float32, squares[0].dtype)
    return torch.stack([s.to(dtype) for s in squares]).sum().sqrt()
