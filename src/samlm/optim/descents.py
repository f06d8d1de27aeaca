"""Descent rules: which gradient at w+ε the base optimizer steps with.

| rule | descent d | needs r(w) |
|---|---|---|
| Standard (SAM, Foret et al.) | ∇L(w+ε) = J(w+ε)ᵀ r(w+ε) | no |
| Functional (F-SAM, Singh et al.) | J(w+ε)ᵀ r(w) | yes |

r = ∂L/∂outputs. A rule is a small frozen object beside the perturbation rule; the driver asks it
``needs_clean_cotangent`` and calls ``backward`` once per descent piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .batching import Piece
from .types import Batch


class Passes(Protocol):
    """The step's passes over pieces of its micro-batches, as a descent rule runs them (driver.py)."""

    def forward(self, piece: Piece) -> tuple[Tensor, Batch]:
        """The outputs at the current weights, and the piece's rows."""
        ...

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor: ...

    def backward(self, loss: Tensor) -> None: ...


class Cotangents(Protocol):
    """A group's clean output cotangents r(w), one buffer per descent piece (driver.py)."""

    def take(self, piece: Piece) -> Tensor: ...


@runtime_checkable
class DescentRule(Protocol):
    name: str
    needs_clean_cotangent: bool

    def backward(self, passes: Passes, piece: Piece, weight: float, cotangents: Cotangents | None) -> Tensor:
        """Forward ``piece`` at w+ε and accumulate its descent gradient, weighted by ``weight``
        (its share of the step's rows), into p.grad. Returns the piece's mean loss L(w+ε)."""
        ...


@dataclass(frozen=True)
class Standard:
    """d = ∇L(w+ε)."""

    name = "standard"
    needs_clean_cotangent = False

    def backward(self, passes: Passes, piece: Piece, weight: float, cotangents: Cotangents | None) -> Tensor:
        outputs, rows = passes.forward(piece)
        value = passes.loss(outputs, rows)
        del outputs  # not held through the backward: the graph keeps what it needs
        passes.backward(value * weight)
        return value


@dataclass(frozen=True)
class Functional:
    """d = J(w+ε)ᵀ r(w): r(w), already scaled to the piece's share, comes from ``cotangents``."""

    name = "functional"
    needs_clean_cotangent = True

    def backward(self, passes: Passes, piece: Piece, weight: float, cotangents: Cotangents | None) -> Tensor:
        assert cotangents is not None  # the driver keeps r(w) for a rule that needs_clean_cotangent
        outputs, rows = passes.forward(piece)
        outputs = outputs_tensor(outputs, "Functional-SAM")
        with torch.no_grad():  # L(w+ε) for the stats only
            value = passes.loss(outputs.detach(), rows)
        root = vjp_root(outputs, cotangents.take(piece))
        del outputs
        passes.backward(root)
        return value


DESCENTS: dict[str, DescentRule] = {rule.name: rule for rule in (Standard(), Functional())}


def as_descent_rule(descent: DescentRule | str) -> DescentRule:
    """A rule object, or its name ("standard", "functional")."""
    if isinstance(descent, DescentRule):
        return descent
    if isinstance(descent, str) and descent in DESCENTS:
        return DESCENTS[descent]
    raise ValueError(f"descent must be Standard(), Functional() or one of {tuple(DESCENTS)}, got {descent!r}")


# -- autograd pieces shared with the driver's ascent -------------------------------------------


def at_least_fp32(t: Tensor) -> Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def outputs_tensor(outputs: object, what: str) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise ValueError(
            f"{what} needs forward(batch) to return the output tensor (logits), got {type(outputs).__name__}"
        )
    return outputs


def loss_and_cotangent(passes: Passes, outputs: Tensor, rows: Batch) -> tuple[Tensor, Tensor]:
    """The loss and r = ∂loss/∂outputs, through the loss alone (on a detached copy of the
    outputs): the model's graph is traversed once, by the backward that follows. FSDP1 frees
    its gathered weights after the first traversal that reaches its output hooks."""
    leaf = outputs.detach().requires_grad_()
    value = passes.loss(leaf, rows)
    (r,) = torch.autograd.grad(value, leaf)
    return value, r


def vjp_root(outputs: Tensor, cotangent: Tensor) -> Tensor:
    """A scalar whose backward is the VJP Jᵀ·cotangent into p.grad (``passes.backward(root)``).

    The cotangent is an output-sized buffer (B×T×V for an LM). Through this root, autograd
    alone holds it and frees it once the output layer's backward has used it;
    ``outputs.backward(cotangent)`` would keep it, and the outputs, alive through the whole
    backward, where the step's memory peaks. Callers pass the cotangent as a temporary and
    drop their own reference to ``outputs`` before the backward.
    """
    root: Tensor = _SendCotangent.apply(outputs, cotangent)  # type: ignore[no-untyped-call]  # untyped in torch
    return root


class _SendCotangent(torch.autograd.Function):
    """A scalar 0 whose backward sends ``cotangent`` (times the incoming gradient: 1, or
    GradScaler's power-of-two scale, in at least fp32) into ``outputs``."""

    @staticmethod
    def forward(ctx: Any, outputs: Tensor, cotangent: Tensor) -> Tensor:
        ctx.save_for_backward(cotangent.detach())
        ctx.outputs_dtype = outputs.dtype
        return torch.zeros((), dtype=torch.float32, device=outputs.device)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (cotangent,) = ctx.saved_tensors
        return (at_least_fp32(cotangent) * grad).to(ctx.outputs_dtype), None
