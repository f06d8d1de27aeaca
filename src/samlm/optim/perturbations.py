"""Perturbation rules: how SAM's ascent step ε is computed from the gradient.

Every rule has the form

    ε = ρ · direction(w, g) / ‖scaled_gradient(w, g)‖₂        (norms global over all tensors)

and is a small frozen object, so a rule can be swapped or written by a user (in the spirit
of optax's gradient transformations). ``P`` is the base optimizer's geometry for the parameter
(preconditioners.py), given only to rules with ``needs_preconditioner = True``: a diagonal
preconditioner √v̂ + eps (u = g/P), or Muon's orthogonalization for its matrices
(u = s·NS(g), s = Muon's lr adjustment). A rule with ``normalize = False`` takes its radius per
tensor: ε = ρ · direction(w, g), no global norm.

| rule | scaled_gradient | direction | ε |
|---|---|---|---|
| Euclidean (Foret et al.) | g | g | ρ g/‖g‖ |
| Adaptive (ASAM, Kwon et al.) | T g | T² g | ρ T²g/‖Tg‖, T = |w| + η |
| Preconditioned (Singh et al.) | u = g/P, or s·NS(g) | u | ρ u/‖u‖ (one joint Frobenius radius) |
| Spectral (Zhong et al. 2026) | g | NS(G) on Muon's matrices, 0 elsewhere | ρ NS(G) per matrix |

Momentum-SAM's rules (``Momentum``, ``PreconditionedMomentum``: momentum.py) take the base
optimizer's momentum in place of g and declare ``needs_ascent_gradient = False``.

Radii: ``Preconditioned`` keeps ‖ε‖₂ = ρ over all parameters, as SAM. ``Spectral`` puts each of
Muon's matrices in its own operator-norm ball, ‖ε_i‖₂→₂ ≈ ρ, so its Frobenius size is about
ρ·√rank(G_i) per matrix (ρ·√(Σ rank) over all): at the same nominal ρ it is 5–20× larger than a
Frobenius-ball ε on transformer-sized matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import Tensor

from .preconditioners import Precond, PrecondOf

_T = TypeVar("_T")


@runtime_checkable
class PerturbationRule(Protocol):
    @property
    def rho(self) -> float: ...

    @property
    def needs_preconditioner(self) -> bool: ...

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor: ...

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor: ...


def check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and rho >= 0 and rho == rho and rho != float("inf")):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


@dataclass(frozen=True)
class Euclidean:
    """Foret et al. (2021): ε = ρ g / ‖g‖."""

    rho: float
    needs_preconditioner = False

    def __post_init__(self) -> None:
        check_rho(self.rho)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return grad

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return grad


@dataclass(frozen=True)
class Adaptive:
    """ASAM, Kwon et al. (2021): ε = ρ T²g / ‖Tg‖ with T = |w| + η (scale-invariant sharpness)."""

    rho: float
    eta: float = 0.01
    needs_preconditioner = False

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    def _t(self, param: Tensor) -> Tensor:
        return param.abs().add_(self.eta)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return self._t(param).mul_(grad)

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return self._t(param).square_().mul_(grad)


def precondition(grad: Tensor, precond: Precond) -> Tensor:
    """u: g itself without a geometry, g/P for a diagonal P, the geometry's direction otherwise."""
    if precond is None:
        return grad
    if isinstance(precond, Tensor):
        return grad / precond
    return precond(grad)


@dataclass(frozen=True)
class Preconditioned:
    """Singh et al. (2025): u = g / (√v̂ + eps), ε = ρ u / ‖u‖, with v̂ the base optimizer's
    bias-corrected second moment; for Muon's matrices u = s·NS(g), the direction of Muon's own
    step (its Newton–Schulz orthogonalization, scaled by its lr adjustment s). Without a
    preconditioner (before the first base step) the driver passes ``precond=None`` and this is
    plain SAM."""

    rho: float
    needs_preconditioner = True

    def __post_init__(self) -> None:
        check_rho(self.rho)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return precondition(grad, precond)

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return precondition(grad, precond)


@dataclass(frozen=True)
class Spectral:
    """Zhong, Milsom and Murray (2026): each of Muon's matrices in its own spectral-norm ball,
    ε_i = ρ · NS(G_i) (Muon's orthogonalization: operator norm ≈ ρ, Frobenius ≈ ρ·√rank);
    the other parameters (AdamW's) are not perturbed. Needs a Muon base optimizer; before
    anything is known of it (``precond=None``) nothing is perturbed."""

    rho: float
    needs_preconditioner = True
    normalize = False  # a radius per matrix, no global norm

    def __post_init__(self) -> None:
        check_rho(self.rho)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return grad

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        orthogonalize: Callable[[Tensor], Tensor] | None = getattr(precond, "orthogonalize", None)
        return orthogonalize(grad) if orthogonalize is not None else torch.zeros_like(grad)


def local_tensor(t: _T) -> _T:
    """This process's shard of a DTensor (FSDP2 parameters, gradients, optimizer state), else
    ``t`` itself. Under no_grad it is the DTensor's own storage: in-place ops act on it."""
    to_local = getattr(t, "to_local", None)
    return cast(_T, to_local()) if callable(to_local) else t


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_norm(t: Tensor) -> Tensor:
    """‖t‖², accumulated in at least float32 (float64 stays float64)."""
    return cast(Tensor, torch.linalg.vector_norm(t, dtype=_accumulator(t.dtype))).square()  # torch.linalg: untyped


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Σ ‖t‖² over a list of tensors (one foreach norm per accumulator dtype), accumulated in
    at least float32."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(_accumulator(t.dtype), []).append(t)
    dtype = torch.float64 if torch.float64 in by_dtype else torch.float32
    norms = [n.to(dtype) for acc, ts in by_dtype.items() for n in torch._foreach_norm(ts, 2, dtype=acc)]
    return torch.stack(norms).square().sum()


# The perturbation is computed a chunk of tensors at a time, with foreach ops over the chunk:
# temporaries (ε, and the scaled gradients of rules other than Euclidean) exist for one chunk
# of at most this many elements, never for every parameter at once.
CHUNK_ELEMENTS = 1 << 25


def _chunks(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Iterator[list[tuple[Tensor, Tensor]]]:
    chunk: list[tuple[Tensor, Tensor]] = []
    size = 0
    for p, g in zip(params, grads):
        if chunk and size + p.numel() > CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append((p, g))
        size += p.numel()
    if chunk:
        yield chunk


def perturbation_norm(
    rule: PerturbationRule, params: Sequence[Tensor], grads: Sequence[Tensor], precond: PrecondOf
) -> Tensor:
    """‖scaled_gradient‖₂ over all local tensors. (Euclidean: ‖g‖, with no copies of g.)"""
    squares = (
        sum_of_squares([rule.scaled_gradient(p, g, precond(p)) for p, g in chunk]) for chunk in _chunks(params, grads)
    )
    return cast(Tensor, sum(squares)).sqrt()  # params is never empty: a tensor


@torch.no_grad()
def add_perturbation_(
    rule: PerturbationRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    precond: PrecondOf,
    scale: Tensor,
    ok: Tensor,
) -> Tensor:
    """w ← w + ε in place, ε = scale · direction(w, g), or ε = 0 where ``ok`` is False.

    ``scale`` (ρ/‖scaled_gradient‖) and ``ok`` are 0-dim tensors on the gradients' device.
    Returns ‖ε‖² over these local tensors.
    """
    eps_sq: Tensor | int = 0
    for chunk in _chunks(params, grads):
        # out of place: direction() may return p.grad itself (Euclidean does)
        eps = torch._foreach_mul([rule.direction(p, g, precond(p)) for p, g in chunk], scale)
        _zero_unless(ok, eps)
        eps_sq = eps_sq + sum_of_squares(eps)
        torch._foreach_add_([p for p, _ in chunk], [e.to(p.dtype) for e, (p, _) in zip(eps, chunk)])
    return cast(Tensor, eps_sq)  # params is never empty: a tensor


def _zero_unless(ok: Tensor, tensors: list[Tensor] | tuple[Tensor, ...]) -> None:
    """Zero ``tensors`` in place unless ``ok`` (a 0-dim bool tensor)."""
    if _readable_without_sync(ok):
        if not bool(ok):
            torch._foreach_zero_(tensors)
    else:  # decided on the device: one masked fill per tensor, no host sync
        not_ok = ~ok
        for t in tensors:
            t.masked_fill_(not_ok, 0.0)


def _readable_without_sync(t: Tensor) -> bool:
    """Reading a CPU tensor's value is free; an accelerator's would wait for its queued work."""
    return t.device.type == "cpu"
