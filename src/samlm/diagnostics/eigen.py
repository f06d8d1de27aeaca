"""Extreme eigenvalues of a symmetric operator given only by its matrix-vector product: Lanczos with
full reorthogonalization (the k largest Ritz values and the smallest) or power iteration. The
curvature operators of :mod:`samlm.diagnostics.sharpness` are measured with :func:`top_eigenvalue`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

__all__ = ["EigenResult", "MatVec", "top_eigenvalue"]

MatVec = Callable[[Sequence[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class EigenResult:
    """Largest algebraic eigenvalue of a symmetric operator, and what it took to get it.

    ``value`` = λ_max; ``top_k`` = the k largest Ritz values, descending (``top_k[0] == value``);
    ``smallest`` = the smallest Ritz value of the same Krylov space (Lanczos; nan for power);
    ``iters`` = matrix-vector products used; ``residual`` = ‖A y − λ y‖ for the top pair;
    ``converged`` = every requested pair met ``residual <= tol * max|λ|``.
    """

    value: float
    iters: int
    top_k: tuple[float, ...]
    smallest: float
    residual: float
    converged: bool
    method: str


def _flat_dtype(params: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    chunks = flat.split([p.numel() for p in params])  # type: ignore[no-untyped-call]  # untyped in torch
    return [c.view(p.shape).to(p.dtype) for c, p in zip(chunks, params)]


def _random_unit(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """A unit Gaussian vector, drawn on the CPU so the same seed gives the same vector on any device."""
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
    return v / cast(Tensor, v.norm())  # Tensor.norm: untyped in torch


def _orthogonalize_(w: Tensor, basis: Sequence[Tensor]) -> Tensor:
    """w ← (I − QQᵀ) w, done twice (full reorthogonalization, "twice is enough")."""
    for _ in range(2):
        for q in basis:
            w.sub_(torch.dot(q, w) * q)
    return w


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Lanczos matrix T = tridiag(β, α, β), ascending, in float64."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return cast("tuple[Tensor, Tensor]", torch.linalg.eigh(t))  # torch.linalg: untyped


def _lanczos(
    matvec: Callable[[Tensor], Tensor], n: int, like: Tensor, generator: torch.Generator, iters: int, tol: float, k: int
) -> EigenResult:
    """Lanczos with full reorthogonalization: Ritz values of A on the Krylov space span{q, Aq, A²q, …}.

    The residual of a Ritz pair (θ_i, y_i) is ‖A y_i − θ_i y_i‖ = β_m |s_{m,i}|. On breakdown (β ≈ 0:
    the Krylov space is invariant, every residual is 0 but a single Krylov space holds each distinct
    eigenvalue once) it restarts with a fresh random vector orthogonal to the basis and goes on, so
    small problems get their multiplicities. Without breakdown, a repeated eigenvalue may appear
    once in ``top_k`` (the usual Lanczos limitation; ``value`` is unaffected).
    """
    eps = torch.finfo(like.dtype).eps
    last = min(iters, n)
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    q = _random_unit(n, generator, like)
    for step in range(1, last + 1):
        basis.append(q)
        w = matvec(q)
        alphas.append(torch.dot(q, w).item())
        beta = _orthogonalize_(w, basis).norm().item()
        theta, s = _tridiagonal_eigh(alphas, betas)
        residuals = beta * s[-1].abs()
        scale = max(theta.abs().max().item(), torch.finfo(torch.float64).tiny)
        top = min(k, len(alphas))
        converged = len(alphas) >= k and bool((residuals[-top:] <= tol * scale).all())
        if step == last:
            break
        if beta > math.sqrt(eps) * scale:  # dropping a smaller β moves the Ritz values by O(β²)
            if converged:
                break
            q = w / beta
            betas.append(beta)
            continue
        q = _orthogonalize_(_random_unit(n, generator, like), basis)  # breakdown: restart
        q_norm = q.norm().item()
        if q_norm <= 10 * eps:
            break  # the whole space is spanned
        q = q / q_norm
        betas.append(0.0)
    values = theta.flip(0)
    return EigenResult(
        value=values[0].item(),
        iters=len(alphas),
        top_k=tuple(values[:top].tolist()),
        smallest=values[-1].item(),
        residual=residuals[-1].item(),
        converged=converged,
        method="lanczos",
    )


def _power_dominant(
    matvec: Callable[[Tensor], Tensor], v: Tensor, iters: int, tol: float
) -> tuple[float, float, int, bool]:
    """Power iteration v ← Av/‖Av‖, λ = vᵀAv: the largest-magnitude eigenvalue.

    Returns (λ, residual ‖Av − λv‖, matvecs, converged).
    """
    lam, residual = 0.0, math.inf
    for step in range(1, iters + 1):
        w = matvec(v)
        lam = torch.dot(v, w).item()
        residual = (w - lam * v).norm().item()
        w_norm = w.norm().item()
        if residual <= tol * abs(lam) or w_norm == 0.0:
            return lam, residual, step, True
        v = w / w_norm
    return lam, residual, iters, False


def _power(
    matvec: Callable[[Tensor], Tensor], n: int, like: Tensor, generator: torch.Generator, iters: int, tol: float
) -> EigenResult:
    """Largest algebraic eigenvalue by power iteration, shifting when the dominant one is negative.

    Power iteration finds λ_dom (largest |λ|). If λ_dom ≥ 0 it is λ_max. Otherwise λ_dom = λ_min and
    A − λ_dom I ⪰ 0 has dominant eigenvalue λ_max − λ_dom, so a second run on it gives λ_max.
    ``iters`` caps each run.
    """
    lam, residual, used, converged = _power_dominant(matvec, _random_unit(n, generator, like), iters, tol)
    if lam < 0:
        shift = lam
        mu, residual, used2, converged = _power_dominant(
            lambda v: matvec(v) - shift * v, _random_unit(n, generator, like), iters, tol
        )
        lam, used = mu + shift, used + used2
    return EigenResult(
        value=lam, iters=used, top_k=(lam,), smallest=math.nan, residual=residual, converged=converged, method="power"
    )


def top_eigenvalue(
    matvec: MatVec,
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-5,
    seed: int = 0,
    method: str = "lanczos",
    k: int = 1,
) -> EigenResult:
    """λ_max(A), the largest *algebraic* eigenvalue of the symmetric operator A given by ``matvec``.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalization, which also gives the k
    largest Ritz values and the smallest one for free; it keeps ``iters + 1`` parameter-sized vectors
    (in the parameters' dtype, at least float32). ``method="power"``: power iteration (a few parameter-
    sized vectors, slower convergence, k must be 1); when the dominant eigenvalue is negative a
    second, shifted run on A − λ_dom I finds λ_max (``iters`` caps each run). Stops after ``iters``
    matvecs or once the residual of each requested pair is ≤ ``tol`` · max|λ|. Deterministic given ``seed``: the start
    vector comes from a private CPU generator, never the global RNG.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if method == "power" and k != 1:
        raise ValueError("power iteration gives only the top eigenvalue; use method='lanczos' for k > 1")
    n = sum(p.numel() for p in params)
    like = torch.empty(0, dtype=_flat_dtype(params), device=params[0].device)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def flat_matvec(v: Tensor) -> Tensor:
        return _flatten(matvec(_unflatten(v, params)), like.dtype)

    if method == "power":
        return _power(flat_matvec, n, like, generator, iters, tol)
    return _lanczos(flat_matvec, n, like, generator, iters, tol, k)
