"""Sharpness diagnostics: Hessian, Gauss-Newton and functional-Hessian spectra, and the SAM path split.

Notation (methods.md §1). z = F(w) are the model outputs (logits), L(w) = ℓ(F(w)) the mean loss,
J = ∂z/∂w, r = ∂ℓ/∂z and H_z = ∂²ℓ/∂z². The Hessian splits as

    ∇²L = H_O + H_F,   H_O = Jᵀ H_z J          (outer-product / Gauss-Newton term, PSD for convex ℓ)
                       H_F = Σ_k r_k ∇²F_k      (functional Hessian, indefinite)

and, with ε = ρ g/‖g‖, SAM's change of gradient splits exactly into a logit and a functional path:

    g_SAM − g = δ_logit + δ_func,   δ_logit = J(w+ε)ᵀ [r(w+ε) − r(w)]  ≈ ρ H_O ĝ
                                     δ_func  = [J(w+ε) − J(w)]ᵀ r(w)    ≈ ρ H_F ĝ

For Adam-type training the curvature that sets stability is the *preconditioned* one (Cohen et al.
2022, adaptive edge of stability): with P = √v̂ + eps the denominator of the base optimizer's update,
λ_max(P⁻¹H) = λ_max(P^{-1/2} H P^{-1/2}) (similar matrices), which Adam with β₁ = 0.9 drives to about
38/lr. P is diagonal, so the symmetric form is two elementwise scalings around the Hessian-vector product.

Conventions (docs/design.md): ``forward(batch) -> outputs`` (a tensor, batch dimension first) and
``loss(outputs, batch) -> scalar mean loss``. ``params`` is a list of tensors with requires_grad.
``batches`` is one batch (tensor / tuple / dict) or a Python ``list`` of batches; over a list, every
operator here is the *average of the per-batch operators* (each batch weighs the same, whatever its
number of rows). Vectors ("v") are lists of tensors shaped like ``params``.

The low-level functions use the model as it is (train-mode dropout makes them stochastic, autocast
makes them low precision); :func:`measure_sharpness` sets up eval mode, float32 and no autocast.
Nothing here touches ``p.grad``, the global RNG, or (after returning) the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor

from samlm.diagnostics.eigen import EigenResult, MatVec, top_eigenvalue
from samlm.optim.preconditioners import FrozenMuon, Preconditioners
from samlm.optim.split import PathGradients, path_gradients
from samlm.optim.types import Batch, ForwardFn, LossFn

__all__ = [
    "EigenResult",
    "SamPathSplit",
    "functional_hessian_top_eigenvalue",
    "functional_hessian_vector_product",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "measure_sharpness",
    "preconditioned_vector_product",
    "preconditioner_tensors",
    "sam_path_norms",
    "sam_path_split",
    "top_eigenvalue",
    "trainable_parameters",
]

# one(params, batch, forward, loss, v): a curvature matrix-vector product on one batch
BatchMatVec = Callable[[Sequence[Tensor], Batch, ForwardFn, LossFn, Sequence[Tensor]], list[Tensor]]


# --------------------------------------------------------------------------------------------------
# small autograd helpers


def trainable_parameters(model: torch.nn.Module) -> list[Tensor]:
    """The parameters that get gradients: ``[p for p in model.parameters() if p.requires_grad]``."""
    return [p for p in model.parameters() if p.requires_grad]


def _as_batch_list(batches: Batch) -> list[Batch]:
    """A Python list is a list of batches; anything else (tensor, tuple, dict) is one batch."""
    if isinstance(batches, list):
        if not batches:
            raise ValueError("batches is an empty list")
        return batches
    return [batches]


def _outputs(forward: ForwardFn, batch: Batch) -> Tensor:
    z = forward(batch)
    if not isinstance(z, Tensor):
        raise TypeError(f"forward(batch) must return a tensor of outputs, got {type(z).__name__}")
    return z


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor | None] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[Tensor]:
    """Σ_i ∂⟨outputs_i, grad_outputs_i⟩/∂inputs, zeros where there is no dependence.

    Outputs that do not require grad (constant in the inputs) contribute nothing and are skipped.
    """
    outputs = list(outputs)
    grad_outputs = [None] * len(outputs) if grad_outputs is None else list(grad_outputs)
    pairs = [(o, go) for o, go in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        list(inputs),
        [go for _, go in pairs],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]


def _output_grad(z: Tensor, batch: Batch, loss: LossFn, *, create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """r = ∂ℓ/∂z at the outputs z (cut from the model's graph). Returns (r, ℓ, the leaf z)."""
    z_leaf = z.detach().requires_grad_(True)
    value = loss(z_leaf, batch)
    (r,) = _grad([value], [z_leaf], create_graph=create_graph)
    return r, value.detach(), z_leaf


def _vjp(
    z: Tensor,
    params: Sequence[Tensor],
    cotangent: Tensor,
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """Jᵀ u: the vector-Jacobian product of the outputs z = F(w) with the cotangent u."""
    return _grad([z], params, [cotangent], retain_graph=retain_graph, create_graph=create_graph)


def _jvp(z: Tensor, params: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """J v by the double-backward trick: J v = ∂/∂u ⟨Jᵀu, v⟩ for a dummy cotangent u.

    The graph of z is kept (``retain_graph``) so a VJP can follow.
    """
    u = torch.zeros_like(z, requires_grad=True)
    jtu = _vjp(z, params, u, create_graph=True)
    (jv,) = _grad(jtu, [u], v, retain_graph=True)
    return jv


def _output_hvp(z: Tensor, batch: Batch, loss: LossFn, t: Tensor) -> Tensor:
    """H_z t: Hessian of the loss w.r.t. the outputs times t, exact for any loss (double backward)."""
    r, _, z_leaf = _output_grad(z, batch, loss, create_graph=True)
    (hz_t,) = _grad([r], [z_leaf], [t])
    return hz_t


# --------------------------------------------------------------------------------------------------
# curvature matrix-vector products (one batch each, then averaged)


def _hvp_one(
    params: Sequence[Tensor], batch: Batch, forward: ForwardFn, loss: LossFn, v: Sequence[Tensor]
) -> list[Tensor]:
    """H v = ∂/∂w ⟨∇L(w), v⟩ (Pearlmutter / double backward)."""
    value = loss(_outputs(forward, batch), batch)
    g = _grad([value], params, create_graph=True)
    return _grad(g, params, v)


def _gnvp_one(
    params: Sequence[Tensor], batch: Batch, forward: ForwardFn, loss: LossFn, v: Sequence[Tensor]
) -> list[Tensor]:
    """H_O v = Jᵀ H_z J v: J v by double backward, H_z(J v) on the outputs, then a VJP."""
    z = _outputs(forward, batch)
    jv = _jvp(z, params, v)
    return _vjp(z, params, _output_hvp(z, batch, loss, jv))


def _fhvp_one(
    params: Sequence[Tensor], batch: Batch, forward: ForwardFn, loss: LossFn, v: Sequence[Tensor]
) -> list[Tensor]:
    """H_F v = Σ_k r_k ∇²F_k v = ∂/∂w ⟨J(w)ᵀ r̄, v⟩ with r̄ = ∂ℓ/∂z held fixed."""
    z = _outputs(forward, batch)
    r, _, _ = _output_grad(z, batch, loss)
    jtr = _vjp(z, params, r, create_graph=True)
    return _grad(jtr, params, v)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Route scaled_dot_product_attention to the math kernel: fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _averaged(one: BatchMatVec, params: Sequence[Tensor], batches: Batch, forward: ForwardFn, loss: LossFn) -> MatVec:
    """v ↦ (1/B) Σ_b one(params, batch_b, forward, loss, v): the average of per-batch operators."""
    params = list(params)
    batches = _as_batch_list(batches)

    def matvec(v: Sequence[Tensor]) -> list[Tensor]:
        v = list(v)
        if len(v) != len(params) or any(vi.shape != p.shape for vi, p in zip(v, params)):
            raise ValueError("vector must be a list of tensors shaped like params")
        with torch.enable_grad(), _math_attention():
            total: list[Tensor] | None = None
            for batch in batches:
                out = [o.detach() for o in one(params, batch, forward, loss, v)]
                total = out if total is None else [t.add_(o) for t, o in zip(total, out)]
        assert total is not None  # batches is never empty
        return [t.div_(len(batches)) for t in total]

    return matvec


def hessian_vector_product(params: Sequence[Tensor], batches: Batch, forward: ForwardFn, loss: LossFn) -> MatVec:
    """v ↦ H v with H = ∇²L(w), by double backward; averaged over the batches."""
    return _averaged(_hvp_one, params, batches, forward, loss)


def gauss_newton_vector_product(params: Sequence[Tensor], batches: Batch, forward: ForwardFn, loss: LossFn) -> MatVec:
    """v ↦ H_O v = Jᵀ H_z J v (Gauss-Newton / outer-product term); averaged over the batches.

    No loss is assumed: H_z is the exact Hessian of ``loss`` w.r.t. the outputs, applied by autograd.
    """
    return _averaged(_gnvp_one, params, batches, forward, loss)


def functional_hessian_vector_product(
    params: Sequence[Tensor], batches: Batch, forward: ForwardFn, loss: LossFn
) -> MatVec:
    """v ↦ H_F v = (H − H_O) v = Σ_k r_k ∇²F_k v; averaged over the batches.

    Computed directly (one double backward of Jᵀr̄ with r̄ fixed) rather than as Hv − Gv: the same
    operator, at half the cost and without the cancellation of two large terms.
    """
    return _averaged(_fhvp_one, params, batches, forward, loss)


def preconditioned_vector_product(matvec: MatVec, preconditioner: Sequence[Tensor | FrozenMuon]) -> MatVec:
    """v ↦ P^{-1/2} A P^{-1/2} v for the operator A of ``matvec`` and a block-diagonal P > 0.

    ``preconditioner`` holds, per parameter, P's diagonal as a tensor shaped like (and on the device
    and dtype of) the vectors, or a Kronecker-factored block (``FrozenMuon``: Muon's map frozen at its
    momentum). The result is symmetric when A is, and has the eigenvalues of P⁻¹A.
    """
    scales = [p.rsqrt() if isinstance(p, Tensor) else p.apply_inverse_sqrt for p in preconditioner]

    def scaled(v: Sequence[Tensor]) -> list[Tensor]:
        return [s * vi if isinstance(s, Tensor) else s(vi) for s, vi in zip(scales, v)]

    return lambda v: scaled(matvec(scaled(v)))


def preconditioner_tensors(
    preconditioner: Callable[[Tensor], Tensor | FrozenMuon | None] | torch.optim.Optimizer, params: Sequence[Tensor]
) -> list[Tensor | FrozenMuon] | None:
    """P for each of ``params``, from a callable ``param -> P`` (same shape) or an optimizer.

    An optimizer's P is read by ``samlm.optim.preconditioners`` (Adam/AdamW: √v̂ + eps; Adafactor:
    its factored v̂; a SAM-family wrapper: its base optimizer's; Muon's matrices: its Newton–Schulz
    map frozen at the current momentum, ``Orthogonalized.frozen``). None when a parameter has no P:
    before the optimizer's first step, or for one without second moments (SGD). Raises
    ``ValueError`` for a P of the wrong shape, or not positive and finite.
    """
    params = list(params)
    if isinstance(preconditioner, torch.optim.Optimizer):
        preconditioner = Preconditioners(getattr(preconditioner, "base_optimizer", preconditioner), params).frozen
    tensors: list[Tensor | FrozenMuon] = []
    for param in params:
        p = preconditioner(param)
        if p is None:
            return None
        if isinstance(p, FrozenMuon):
            if not bool(torch.isfinite(p.inverse_sqrt).all()):
                raise ValueError("the preconditioner P must be positive and finite")
            tensors.append(p)
            continue
        if p.shape != param.shape:
            raise ValueError(f"P of a parameter of shape {tuple(param.shape)} has shape {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all() and (p > 0).all()):
            raise ValueError("the preconditioner P must be positive and finite")
        tensors.append(p.detach())
    return tensors


def functional_hessian_top_eigenvalue(
    params: Sequence[Tensor],
    batches: Batch,
    forward: ForwardFn,
    loss: LossFn,
    *,
    iters: int = 20,
    tol: float = 1e-5,
    seed: int = 0,
    method: str = "lanczos",
    k: int = 1,
) -> EigenResult:
    """λ_max(H_F), the largest *algebraic* eigenvalue of the functional Hessian H_F = H − H_O.

    H_F is indefinite. We report the largest algebraic eigenvalue (not the largest magnitude) so it
    sits on the same scale as λ_max(H) and λ_max(H_O), with Weyl's bound λ_max(H) ≤ λ_max(H_O) +
    λ_max(H_F). With Lanczos, ``result.smallest`` is λ_min(H_F) from the same Krylov space, so the
    largest magnitude is ``max(|result.value|, |result.smallest|)``.
    """
    matvec = functional_hessian_vector_product(params, batches, forward, loss)
    return top_eigenvalue(matvec, params, iters=iters, tol=tol, seed=seed, method=method, k=k)


# --------------------------------------------------------------------------------------------------
# SAM path split


# g, g_sam = J(w+ε)ᵀ r(w+ε), g_func = J(w+ε)ᵀ r(w), ε, and the losses (floats here): the optimizer
# core's split, which train_step(..., split=True) measures too.
SamPathSplit = PathGradients


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """⟨a, b⟩ over lists of tensors, accumulated in float64."""
    return sum((x.double() * y.double()).sum().item() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """cos∠(a, b); nan when either is zero."""
    denominator = _norm(a) * _norm(b)
    return _dot(a, b) / denominator if denominator > 0 else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


def sam_path_split(
    params: Sequence[Tensor], batch: Batch, forward: ForwardFn, loss: LossFn, rho: float
) -> SamPathSplit:
    """g, g_SAM = J(w+ε)ᵀ r(w+ε) and g_F = J(w+ε)ᵀ r(w) at ε = ρ g/‖g‖ (0 when g = 0).

    Over a list of batches every gradient is the average of per-batch gradients and ε uses the
    averaged g. The weights are restored bitwise (copied back, never w + ε − ε).
    """
    batches = _as_batch_list(batches=batch)

    def eps(g: list[Tensor]) -> list[Tensor]:
        g_norm = _norm(g)
        return [gi * (rho / g_norm) if g_norm > 0 else torch.zeros_like(gi) for gi in g]

    split = path_gradients(
        params, batches, lambda b: _outputs(forward, b), loss, eps, [1 / len(batches)] * len(batches)
    )
    split.loss, split.loss_perturbed = float(split.loss), float(split.loss_perturbed)
    return split


def sam_path_norms(
    params: Sequence[Tensor], batch: Batch, forward: ForwardFn, loss: LossFn, rho: float
) -> dict[str, float]:
    """‖δ_logit‖, ‖δ_func‖, their ratio and cosines with g_SAM − g = δ_logit + δ_func (see module doc).

    Keys: ``logit_path_norm`` = ‖δ_logit‖, ``functional_path_norm`` = ‖δ_func‖,
    ``logit_functional_ratio`` = ‖δ_logit‖/‖δ_func‖ (inf if only δ_func = 0, nan if both are),
    ``logit_path_cosine`` = cos∠(δ_logit, g_SAM − g), ``functional_path_cosine`` = cos∠(δ_func, g_SAM − g),
    ``sam_shift_norm`` = ‖g_SAM − g‖, ``grad_norm`` = ‖g‖, ``sam_grad_norm`` = ‖g_SAM‖,
    ``loss`` = L(w), ``loss_perturbed`` = L(w+ε).
    """
    split = sam_path_split(params, batch, forward, loss, rho)
    delta_logit, delta_func = split.delta_logit, split.delta_func
    shift = [a - b for a, b in zip(split.g_sam, split.g)]
    logit_norm, func_norm = _norm(delta_logit), _norm(delta_func)
    return {
        "logit_path_norm": logit_norm,
        "functional_path_norm": func_norm,
        "logit_functional_ratio": _ratio(logit_norm, func_norm),
        "logit_path_cosine": _cosine(delta_logit, shift),
        "functional_path_cosine": _cosine(delta_func, shift),
        "sam_shift_norm": _norm(shift),
        "grad_norm": _norm(split.g),
        "sam_grad_norm": _norm(split.g_sam),
        "loss": split.loss,
        "loss_perturbed": split.loss_perturbed,
    }


# --------------------------------------------------------------------------------------------------
# everything at once, on a model


class _SolveOptions(TypedDict):
    iters: int
    tol: float
    seed: int
    method: str


@contextlib.contextmanager
def _measurement_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, float32 (half-precision tensors upcast), autocast off, math attention, grad on.

    On exit every module's own ``training`` flag is restored and upcast tensors get their original
    storage back (bitwise; float32/float64 tensors are never touched).
    """
    modes = [(m, m.training) for m in model.modules()]
    upcast = []
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    try:
        with contextlib.ExitStack() as stack:
            model.eval()
            for t in tensors:
                if t.is_floating_point() and t.element_size() < 4:
                    upcast.append((t, t.data))
                    t.data = t.data.float()
            stack.enter_context(torch.enable_grad())
            for device_type in sorted({t.device.type for t in tensors}):
                with contextlib.suppress(RuntimeError, ValueError):
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            stack.enter_context(_math_attention())
            yield
    finally:
        for t, data in upcast:
            t.data = data
        for m, training in modes:
            m.training = training


def measure_sharpness(
    model: torch.nn.Module,
    batches: Batch,
    forward: ForwardFn,
    loss: LossFn,
    *,
    iters: int = 20,
    seed: int = 0,
    rho: float = 0.05,
    tol: float = 1e-5,
    method: str = "lanczos",
    k: int = 1,
    preconditioner: Callable[[Tensor], Tensor | None] | torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """λ_max(H), λ_max(H_O), λ(H_F), λ_max(P⁻¹H) and the SAM path split, in float32 and eval mode.

    Over the trainable parameters (requires_grad=False ones are excluded) and the average of the
    per-batch operators. The model's train/eval modes, weights (bitwise), dtypes, ``.grad`` and the
    global RNG are left as they were. Keys:

    - ``hessian_lambda_max`` λ_max(H); ``hessian_top_k`` (k largest, descending)
    - ``gauss_newton_lambda_max`` λ_max(H_O = JᵀH_zJ)
    - ``functional_lambda`` λ_max(H_F), largest *algebraic* (H_F is indefinite);
      ``functional_lambda_min`` λ_min(H_F) (Lanczos; nan with power iteration)
    - ``preconditioned_lambda_max`` λ_max(P^{-1/2} H P^{-1/2}) = λ_max(P⁻¹H), and
      ``preconditioned_iters``: only when ``preconditioner`` (a callable ``param -> P`` or the run's
      optimizer, see :func:`preconditioner_tensors`) gives P for every parameter; an optimizer has
      none before its first step (and SGD none at all), and then both keys are left out
    - ``hessian_iters``, ``gauss_newton_iters``, ``functional_iters``; ``iters`` (the largest of the
      eigensolves); ``converged`` (all of them met ``tol``)
    - from :func:`sam_path_norms` at ``rho``: ``logit_path_norm``, ``functional_path_norm``,
      ``logit_functional_ratio``, ``logit_path_cosine``, ``functional_path_cosine``, ``sam_shift_norm``,
      ``grad_norm``, ``sam_grad_norm``, ``loss``, ``loss_perturbed``; and ``rho``.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True")
    batches = _as_batch_list(batches)
    p_diag = None if preconditioner is None else preconditioner_tensors(preconditioner, params)
    solve: _SolveOptions = dict(iters=iters, tol=tol, seed=seed, method=method)
    with _measurement_mode(model):
        hvp = hessian_vector_product(params, batches, forward, loss)
        hessian = top_eigenvalue(hvp, params, k=k, **solve)
        gauss_newton = top_eigenvalue(gauss_newton_vector_product(params, batches, forward, loss), params, **solve)
        functional = functional_hessian_top_eigenvalue(params, batches, forward, loss, **solve)
        preconditioned = None
        if p_diag is not None:  # cast to the measurement dtype (float32 for a half-precision model)
            p_diag = [p.to(device=w.device, dtype=w.dtype) for p, w in zip(p_diag, params)]
            preconditioned = top_eigenvalue(preconditioned_vector_product(hvp, p_diag), params, **solve)
        paths = sam_path_norms(params, batches, forward, loss, rho)
    solved = [r for r in (hessian, gauss_newton, functional, preconditioned) if r is not None]
    return {
        "hessian_lambda_max": hessian.value,
        "hessian_top_k": list(hessian.top_k),
        "gauss_newton_lambda_max": gauss_newton.value,
        "functional_lambda": functional.value,
        "functional_lambda_min": functional.smallest,
        **(
            {}
            if preconditioned is None
            else {"preconditioned_lambda_max": preconditioned.value, "preconditioned_iters": preconditioned.iters}
        ),
        "hessian_iters": hessian.iters,
        "gauss_newton_iters": gauss_newton.iters,
        "functional_iters": functional.iters,
        "iters": max(r.iters for r in solved),
        "converged": all(r.converged for r in solved),
        **paths,
        "rho": rho,
    }
