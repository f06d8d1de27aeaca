"""SAM's change of gradient, split into its logit and functional paths (methods.md §1).

With outputs z = F(w), r = ∂ℓ/∂z, J = ∂z/∂w and a perturbation ε:

    g     = J(w)ᵀ r(w)          the clean gradient
    g_SAM = J(w+ε)ᵀ r(w+ε)      SAM's descent gradient
    g_F   = J(w+ε)ᵀ r(w)        Functional-SAM's descent gradient

    g_SAM − g = δ_logit + δ_func,   δ_logit = g_SAM − g_F,   δ_func = g_F − g

One implementation for ``train_step(..., split=True)`` (the step's rows and ε) and for
``samlm.diagnostics.sharpness`` (ε = ρ g/‖g‖).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from .batching import GroupPlan, Piece
from .descents import at_least_fp32
from .running_stats import frozen_running_stats
from .types import Batch, ForwardFn, LossFn


@dataclass
class PathGradients:
    """g, g_SAM, g_F and ε as lists of tensors shaped like params; L(w) and L(w+ε)."""

    g: list[Tensor]
    g_sam: list[Tensor]
    g_func: list[Tensor]
    eps: list[Tensor]
    loss: Any
    loss_perturbed: Any

    @property
    def delta_logit(self) -> list[Tensor]:
        """δ_logit = g_SAM − g_F = J(w+ε)ᵀ [r(w+ε) − r(w)]: the loss derivative moves, J is held."""
        return [a - b for a, b in zip(self.g_sam, self.g_func)]

    @property
    def delta_func(self) -> list[Tensor]:
        """δ_func = g_F − g = [J(w+ε) − J(w)]ᵀ r(w): the Jacobian moves, r is held."""
        return [a - b for a, b in zip(self.g_func, self.g)]


@contextlib.contextmanager
def perturbed(params: Sequence[Tensor], eps: Sequence[Tensor]) -> Iterator[None]:
    """w ← w + ε for the duration; afterwards w is copied back bitwise from a saved copy."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def path_gradients(
    params: Sequence[Tensor],
    batches: Sequence[Batch],
    forward: ForwardFn,
    loss: LossFn,
    eps: Sequence[Tensor] | Callable[[list[Tensor]], list[Tensor]],
    weights: Sequence[float],
) -> PathGradients:
    """g, g_SAM and g_F over ``batches``, each batch's term weighted by ``weights``:

        g = Σ_b c_b J_b(w)ᵀ r_b(w),   g_SAM = Σ_b c_b J_b(w+ε)ᵀ r_b(w+ε),   g_F = Σ_b c_b J_b(w+ε)ᵀ r_b(w)

    ``eps``: ε (shaped like params), or a function g ↦ ε. Sweep 1 at w keeps each r_b(w); sweep 2
    at w+ε takes two VJPs of one graph. ``loss`` returns a batch's mean loss. The weights are
    restored bitwise; ``p.grad`` is not touched. Losses are Σ_b c_b L_b (tensors).
    """
    params = list(params)
    g, g_sam, g_func = ([torch.zeros_like(at_least_fp32(p)) for p in params] for _ in range(3))
    with torch.enable_grad():
        residuals: list[Tensor] = []
        loss_w: Tensor | int = 0
        for batch, c in zip(batches, weights):
            z = forward(batch)
            r, value = _output_grad(z, batch, loss)
            _add(g, _vjp(z, params, r), c)
            residuals.append(r)
            loss_w = loss_w + at_least_fp32(value) * c
        eps = eps(g) if callable(eps) else list(eps)
        loss_eps: Tensor | int = 0
        with perturbed(params, eps):
            for batch, c, r in zip(batches, weights, residuals):
                z = forward(batch)
                r_eps, value = _output_grad(z, batch, loss)
                _add(g_sam, _vjp(z, params, r_eps, retain_graph=True), c)
                _add(g_func, _vjp(z, params, r), c)
                loss_eps = loss_eps + at_least_fp32(value) * c
    return PathGradients(g=g, g_sam=g_sam, g_func=g_func, eps=eps, loss=loss_w, loss_perturbed=loss_eps)


def _output_grad(z: Tensor, batch: Batch, loss: LossFn) -> tuple[Tensor, Tensor]:
    """r = ∂ℓ/∂z at the outputs z (cut from the model's graph), and ℓ."""
    if not isinstance(z, Tensor):
        raise TypeError(f"forward(batch) must return a tensor of outputs, got {type(z).__name__}")
    leaf = z.detach().requires_grad_(True)
    value = loss(leaf, batch)
    if not value.requires_grad:  # ℓ constant in z
        return torch.zeros_like(leaf), value.detach()
    (r,) = torch.autograd.grad(value, leaf)
    return r, value.detach()


def _vjp(z: Tensor, params: list[Tensor], cotangent: Tensor, retain_graph: bool = False) -> Sequence[Tensor | None]:
    """J(w)ᵀ u; None for a parameter z does not depend on."""
    if not z.requires_grad:
        return [None] * len(params)
    return torch.autograd.grad(z, params, cotangent.to(z.dtype), retain_graph=retain_graph, allow_unused=True)


def _add(buffers: list[Tensor], grads: Sequence[Tensor | None], weight: float) -> None:
    for b, g in zip(buffers, grads):
        if g is not None:
            b.add_(g, alpha=weight)


class SplitPasses(Protocol):
    """The step's passes as the split measures them (the driver's)."""

    def no_sync(self, skip_sync: bool = True) -> AbstractContextManager[object]: ...

    def rows(self, piece: Piece) -> Batch: ...

    def outputs(self, batch: Batch) -> Tensor: ...

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor: ...


def measure_split(
    passes: SplitPasses,
    plans: list[GroupPlan],
    total: int,
    epsilons: list[dict[int, Tensor]],
    params: list[Tensor],
    stats_layers: list[nn.Module],
) -> list[Tensor]:
    """``train_step(split=True)``: (‖g_SAM − g_F‖, ‖g_F − g‖) over the step's rows, each group at w
    with its own ε (by id of its parameter), in extra passes that leave the RNG and the running
    statistics as they were."""
    device = params[0].device
    rng_devices = [] if device.type == "cpu" else [device]
    g: list[Tensor] | None = None
    g_sam: list[Tensor] | None = None
    g_func: list[Tensor] | None = None
    with (
        torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"),
        frozen_running_stats(stats_layers) if stats_layers else contextlib.nullcontext(),
        passes.no_sync(),
    ):
        for plan, eps_of in zip(plans, epsilons):
            eps = [eps_of[id(p)] if id(p) in eps_of else torch.zeros_like(p) for p in params]
            pieces = plan.descent
            paths = path_gradients(
                params,
                [passes.rows(piece) for piece in pieces],
                passes.outputs,
                passes.loss,
                eps,
                [piece.rows / total for piece in pieces],
            )
            g, g_sam, g_func = (
                new if old is None else [a + b for a, b in zip(old, new)]
                for old, new in ((g, paths.g), (g_sam, paths.g_sam), (g_func, paths.g_func))
            )
    assert g is not None and g_sam is not None and g_func is not None  # there is a group
    return [_norm_of_difference(g_sam, g_func), _norm_of_difference(g_func, g)]


def _norm_of_difference(a: list[Tensor], b: list[Tensor]) -> Tensor:
    # Tensor.norm is unannotated in torch
    return cast(Tensor, torch.stack([torch.linalg.vector_norm(x - y) for x, y in zip(a, b)]).norm())
