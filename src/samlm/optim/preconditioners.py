"""Reading the base optimizer's geometry: a diagonal preconditioner P = √v̂ + eps, or Muon's
orthogonalization.

Preconditioned SAM scales its perturbation by the geometry the base optimizer steps in. For a
diagonal optimizer that is 1/P with P the denominator of its own update (Adam/AdamW/NAdam:
√v̂ + eps; RAdam: its rectified denominator; Adamax: its infinity norm; RMSprop: √(square_avg)
+ eps; Adagrad: √(sum) + eps; Adafactor: its factored √v̂). The moments are the ones the base
optimizer already keeps, so they are statistics of the SAM gradients it was fed. For Muon's
matrices it is the orthogonalized direction: Muon steps along NS(G), its Newton–Schulz
iteration (with its own coefficients) applied to the gradient, scaled by its lr adjustment.

A reader returns P (a tensor shaped like the parameter), a ``Geometry`` (a callable g → u, for
non-diagonal geometries such as Muon's), or None (no moments yet). A user with another optimizer
registers a reader with ``register_preconditioner``; transformers' Adafactor registers itself
when find_reader first meets it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, cast

import torch
from torch import Tensor

from .types import ParamGroup, ParamState


class Geometry(Protocol):
    """A non-diagonal geometry: ``geometry(g)`` is the direction u of a gradient g."""

    def __call__(self, g: Tensor, /) -> Tensor: ...


# A parameter's preconditioner: P (a tensor shaped like the parameter), a Geometry, or None (none yet)
Precond: TypeAlias = Tensor | Geometry | None
# param -> its preconditioner
PrecondOf: TypeAlias = Callable[[Tensor], Precond]
# reader(optimizer, group, param, state) -> P, a Geometry, or None (None: no moments yet)
PreconditionerReader: TypeAlias = Callable[[torch.optim.Optimizer, ParamGroup, Tensor, ParamState], Precond]

_READERS: dict[type, PreconditionerReader] = {}
_STATELESS: set[PreconditionerReader] = set()  # readers whose geometry needs no optimizer state (Muon's)


def register_preconditioner(optimizer_cls: type, reader: PreconditionerReader, *, stateless: bool = False) -> None:
    """Teach preconditioned SAM to read ``optimizer_cls``'s geometry. ``stateless``: the reader
    needs no optimizer state (it is ready before the first step)."""
    _READERS[optimizer_cls] = reader
    if stateless:
        _STATELESS.add(reader)


def find_reader(optimizer: torch.optim.Optimizer) -> PreconditionerReader | None:
    """The reader of ``optimizer``'s geometry; of several combined bases, a reader only if every
    base has one."""
    bases = getattr(optimizer, "optimizers", None)
    if isinstance(bases, tuple):  # CombinedOptimizer
        readers = [find_reader(b) for b in bases]
        return readers[0] if readers and all(r is not None for r in readers) else None
    cls = type(optimizer)
    reader = _lookup(cls)
    if reader is None and _register_hf_adafactor(cls):
        reader = _lookup(cls)
    return reader


def _lookup(optimizer_cls: type) -> PreconditionerReader | None:
    return next((_READERS[c] for c in optimizer_cls.__mro__ if c in _READERS), None)


def _register_hf_adafactor(optimizer_cls: type) -> bool:
    """Register transformers.Adafactor's reader on first sight of an optimizer from transformers:
    the core never imports transformers (the harness extra) itself."""
    if not any(c.__module__.partition(".")[0] == "transformers" for c in optimizer_cls.__mro__):
        return False
    adafactor = getattr(sys.modules.get("transformers.optimization"), "Adafactor", None)
    if adafactor is None or adafactor in _READERS:
        return False
    register_preconditioner(adafactor, hf_adafactor_preconditioner)
    return True


def _step_count(state: ParamState) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """Adam/AdamW: P = √(exp_avg_sq / (1 − β₂ᵏ)) + eps, the denominator of Adam's own update."""
    if "exp_avg_sq" not in state or _step_count(state) == 0:
        return None
    k = _step_count(state)
    beta2 = group["betas"][1]
    v_hat: Tensor = state["exp_avg_sq"] / (1 - beta2**k)
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        v_hat = state["max_exp_avg_sq"] / (1 - beta2**k)
    return v_hat.sqrt_().add_(group["eps"])


def torch_adafactor_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """torch.optim.Adafactor: v̂ = row_var·col_var / mean(row_var) (rank-1 factored), P = √v̂."""
    if _step_count(state) == 0:
        return None
    eps1 = group.get("eps1") or torch.finfo(param.dtype).eps
    if state.get("row_var") is not None and state.get("col_var") is not None:
        row, col = state["row_var"], state["col_var"]
        v_hat: Tensor = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
    elif state.get("variance") is not None:
        v_hat = state["variance"].clone()
    else:
        return None
    return v_hat.clamp_(min=eps1 * eps1).sqrt_()


def hf_adafactor_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """transformers.Adafactor: v̂ = (row / mean(row)) ⊗ col, P = √v̂ (its update is g/√v̂)."""
    if _step_count(state) == 0:
        return None
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        v_hat: Tensor = (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)
    elif "exp_avg_sq" in state:
        v_hat = state["exp_avg_sq"].clone()
    else:
        return None
    eps1 = group["eps"][0] if isinstance(group.get("eps"), (tuple, list)) else 1e-30
    return v_hat.add_(eps1).sqrt_().to(param.dtype)


def radam_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """RAdam: P = (√exp_avg_sq + eps)/√(1 − β₂ᵏ) once its rectification is on (ρ_k > 5); before
    that RAdam steps unpreconditioned (SGD with momentum): P = 1."""
    if "exp_avg_sq" not in state or _step_count(state) == 0:
        return None
    k = _step_count(state)
    beta2 = group["betas"][1]
    rho_inf = 2 / (1 - beta2) - 1
    rho_k = rho_inf - 2 * k * beta2**k / (1 - beta2**k)
    if rho_k <= 5.0:
        return torch.ones_like(state["exp_avg_sq"])
    return cast(Tensor, state["exp_avg_sq"]).sqrt().add_(group["eps"]).div_((1 - beta2**k) ** 0.5)


def adamax_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """Adamax: P = exp_inf, the running max of |g| (its eps is already inside)."""
    if "exp_inf" not in state or _step_count(state) == 0:
        return None
    return cast(Tensor, state["exp_inf"]).clone()


def rmsprop_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """RMSprop: P = √(square_avg − grad_avg² if centered) + eps."""
    if "square_avg" not in state or _step_count(state) == 0:
        return None
    avg: Tensor = state["square_avg"]
    if group.get("centered") and "grad_avg" in state:
        avg = avg.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
    return avg.sqrt().add_(group["eps"])


def adagrad_preconditioner(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Tensor | None:
    """Adagrad: P = √sum + eps."""
    if "sum" not in state or _step_count(state) == 0:
        return None
    return cast(Tensor, state["sum"]).sqrt().add_(group["eps"])


register_preconditioner(torch.optim.Adam, adam_preconditioner)
register_preconditioner(torch.optim.AdamW, adam_preconditioner)
register_preconditioner(torch.optim.NAdam, adam_preconditioner)  # its denominator is Adam's
register_preconditioner(torch.optim.RAdam, radam_preconditioner)
register_preconditioner(torch.optim.Adamax, adamax_preconditioner)
register_preconditioner(torch.optim.RMSprop, rmsprop_preconditioner)
register_preconditioner(torch.optim.Adagrad, adagrad_preconditioner)
if hasattr(torch.optim, "Adafactor"):
    register_preconditioner(torch.optim.Adafactor, torch_adafactor_preconditioner)


# -- Muon's geometry: Newton–Schulz orthogonalization ------------------------------------------

MUON_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults (Jordan et al. 2024)


def newton_schulz(
    g: Tensor,
    coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """orth(G) ≈ UVᵀ (G = USVᵀ), as torch.optim.Muon computes it (in bf16, its default):

        X ← G/‖G‖_F  (wide side first)
        repeat ``steps``:  A = XXᵀ;  X ← aX + (bA + cA²)X

    Muon's quintic coefficients trade exactness for speed: the singular values of the result lie
    near 1 (about 0.7–1.2), not at 1. Returns a tensor of ``g``'s dtype."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def muon_lr_ratio(adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """Muon's step per unit lr scales NS(G) by this (torch.optim.Muon's ``adjust_lr_fn``):
    "match_rms_adamw": 0.2·√max(A, B) (Liu et al. 2025: the update's RMS matches AdamW's, 0.2);
    None/"original": √max(1, A/B) (Jordan et al.)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    return 1.0


@dataclass(frozen=True)
class Orthogonalized:
    """Muon's geometry for one matrix: a gradient G steps along ``scale``·NS(G) per unit lr.

    ``orthogonalize(g)`` is NS(g) (spectral norm ≈ 1); ``self(g)`` = scale·NS(g), the direction of
    Muon's own step, comparable with an AdamW step g/P in a joint norm (same lr)."""

    coefficients: tuple[float, float, float] = MUON_COEFFICIENTS
    steps: int = 5
    eps: float = 1e-7
    scale: float = 1.0

    def orthogonalize(self, g: Tensor) -> Tensor:
        return newton_schulz(g, self.coefficients, self.steps, self.eps)

    def __call__(self, g: Tensor) -> Tensor:
        return self.orthogonalize(g).mul_(self.scale)

    def frozen(self, momentum: Tensor) -> FrozenMuon:
        """Muon's map at ``momentum`` M as a fixed linear P⁻¹ (for curvature measures, as λ_max(P⁻¹H)
        freezes Adam's v̂). Newton–Schulz is a matrix polynomial: NS(M) = q(XXᵀ)·X with X = M/‖M‖_F
        (wide side first), so Muon's step per unit lr is P⁻¹M with

            P⁻¹Δ = scale · q(XXᵀ) Δ / ‖M‖_F      (left-multiplied on the wide side)

        symmetric and positive definite (q > 0 on [0, 1] for Muon's coefficients). q is evaluated
        exactly (float64, on XXᵀ's eigenvalues), where torch.optim.Muon runs NS in bf16."""
        m = momentum.detach().to(torch.float64)
        tall = m.size(0) > m.size(1)
        x = m.T if tall else m
        norm = float(x.norm().clamp(min=self.eps))
        x = x / norm
        eigenvalues, vectors = torch.linalg.eigh(x @ x.T)
        sigma = eigenvalues.clamp(min=0).sqrt()
        phi = sigma.clone()
        a, b, c = self.coefficients
        for _ in range(self.steps):  # each NS step maps a singular value σ to aσ + bσ³ + cσ⁵
            phi = a * phi + b * phi**3 + c * phi**5
        gain = torch.where(sigma > 1e-12, phi / sigma.clamp(min=1e-12), torch.full_like(sigma, a**self.steps))
        if not bool((gain > 0).all()):
            raise ValueError("Muon's Newton–Schulz map is not positive definite at this momentum")
        inverse_sqrt = (vectors * (self.scale * gain / norm).sqrt()) @ vectors.T
        return FrozenMuon(inverse_sqrt, tall)


@dataclass(frozen=True)
class FrozenMuon:
    """P^{-1/2} of :meth:`Orthogonalized.frozen`: ``v ↦ L v`` (``v Lᵀ`` for a tall matrix), L = (P⁻¹)^{1/2}
    on the wide side (float64 as built; ``to`` casts it to the vectors' device and dtype)."""

    inverse_sqrt: Tensor
    tall: bool

    def to(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FrozenMuon:
        """The same block with its factor on ``device`` in ``dtype`` (as ``Tensor.to``)."""
        return FrozenMuon(self.inverse_sqrt.to(device=device, dtype=dtype), self.tall)

    def apply_inverse_sqrt(self, v: Tensor) -> Tensor:
        return v @ self.inverse_sqrt if self.tall else self.inverse_sqrt @ v


def muon_geometry(
    optimizer: torch.optim.Optimizer, group: ParamGroup, param: Tensor, state: ParamState
) -> Orthogonalized:
    """torch.optim.Muon: its orthogonalization with the group's coefficients, steps, eps and lr
    adjustment. Needs no state: ready at the first step."""
    return Orthogonalized(
        tuple(group["ns_coefficients"]),
        int(group["ns_steps"]),
        float(group["eps"]),
        muon_lr_ratio(group.get("adjust_lr_fn"), param.shape),
    )


if hasattr(torch.optim, "Muon"):
    register_preconditioner(torch.optim.Muon, muon_geometry, stateless=True)


class Preconditioners:
    """Lazy view of each parameter's geometry; ``available`` is False until every parameter has it.

    ``geometry(param)``: P (a tensor), a ``Geometry`` (Muon's matrices) or None. ``self(param)``:
    the diagonal P only (None for a non-diagonal geometry), what the sharpness diagnostics read.
    P is computed per tensor on demand, so no parameter-sized set of buffers is held at once;
    a non-diagonal direction is computed once per gradient (the perturbation asks twice: for its
    norm, then for ε) and held until the view is dropped.
    All-or-nothing (``joint``, for rules with one global radius) keeps ε on one scale: mixing 1/P for some tensors with 1 for others would
    make the perturbation's direction meaningless. Several combined base optimizers
    (``CombinedOptimizer``): each parameter is read by the reader of the base that steps it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[Tensor], *, joint: bool = True):
        self.optimizer = optimizer
        self.joint = joint  # False: each parameter's geometry as soon as it has one (per-tensor radii)
        bases = getattr(optimizer, "optimizers", None)
        bases = bases if isinstance(bases, tuple) else (optimizer,)
        self.reader = find_reader(optimizer)
        # id(param) -> (base, group, reader)
        self.where: dict[int, tuple[torch.optim.Optimizer, ParamGroup, PreconditionerReader | None]] = {}
        for base in bases:
            reader = find_reader(base)
            for g in base.param_groups:
                for p in g["params"]:
                    self.where[id(p)] = (base, g, reader)
        self.available = self.reader is not None and all(self._ready(p) for p in params)
        self._memo: dict[int, _Once] = {}

    def _ready(self, p: Tensor) -> bool:
        base, _, reader = self.where.get(id(p), (None, None, None))
        if reader is None:
            return False
        if reader in _STATELESS:
            return True
        assert base is not None  # p has an entry in ``where``: it has a reader
        state = base.state.get(p, {})
        return bool(state) and _step_count(state) > 0

    def geometry(self, param: Tensor) -> Precond:
        if not (self.available if self.joint else self._ready(param)):
            return None
        base, group, reader = self.where[id(param)]
        assert reader is not None  # available or ready: every base has a reader
        found = reader(base, group, param, base.state.get(param, {}))
        if found is None or isinstance(found, Tensor):
            return found
        return self._memo.setdefault(id(param), _Once(found))

    def __call__(self, param: Tensor) -> Tensor | None:
        found = self.geometry(param)
        return found if isinstance(found, Tensor) else None

    def frozen(self, param: Tensor) -> Tensor | FrozenMuon | None:
        """P as a fixed linear operator, for curvature measures: the diagonal P (a tensor), or for
        Muon's matrices its map at the current momentum (``FrozenMuon``); None when there is none
        (no moments or no momentum yet, or a geometry that cannot be frozen)."""
        found = self.geometry(param)
        if found is None or isinstance(found, Tensor):
            return found
        base = self.where[id(param)][0]
        momentum = base.state.get(param, {}).get("momentum_buffer")
        freeze = getattr(found, "frozen", None)
        return None if momentum is None or freeze is None else freeze(momentum)


class _Once:
    """A geometry's direction, computed once per gradient tensor (other attributes delegated)."""

    geometry: Geometry
    grad: Tensor | None
    value: Tensor | None

    def __init__(self, geometry: Geometry) -> None:
        self.geometry, self.grad, self.value = geometry, None, None

    def __call__(self, g: Tensor) -> Tensor:
        if self.grad is not g:
            self.grad, self.value = g, self.geometry(g)
        assert self.value is not None  # set with self.grad
        return self.value

    def __getattr__(self, name: str) -> Any:
        if name == "geometry":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.geometry, name)
