"""Reading the base optimizer's second moments as a preconditioner P = √v̂ + eps.

Preconditioned SAM scales its perturbation by 1/P. The moments are the ones the base
optimizer already keeps, so they are statistics of the SAM gradients it was fed.
A user with another optimizer registers a reader with ``register_preconditioner``;
transformers' Adafactor registers itself when find_reader first meets it.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor

# reader(optimizer, group, param, state) -> P or None (None: no moments yet)
PreconditionerReader = Callable[[torch.optim.Optimizer, dict, Tensor, dict], Optional[Tensor]]

_READERS: dict[type, PreconditionerReader] = {}


def register_preconditioner(optimizer_cls: type, reader: PreconditionerReader) -> None:
    """Teach preconditioned SAM to read ``optimizer_cls``'s second moments."""
    _READERS[optimizer_cls] = reader


def find_reader(optimizer: torch.optim.Optimizer) -> Optional[PreconditionerReader]:
    cls = type(optimizer)
    reader = _lookup(cls)
    if reader is None and _register_hf_adafactor(cls):
        reader = _lookup(cls)
    return reader


def _lookup(optimizer_cls: type) -> Optional[PreconditionerReader]:
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


def _step_count(state: dict) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def adam_preconditioner(optimizer, group, param, state):
    """Adam/AdamW: P = √(exp_avg_sq / (1 − β₂ᵏ)) + eps, the denominator of Adam's own update."""
    if "exp_avg_sq" not in state or _step_count(state) == 0:
        return None
    k = _step_count(state)
    beta2 = group["betas"][1]
    v_hat = state["exp_avg_sq"] / (1 - beta2**k)
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        v_hat = state["max_exp_avg_sq"] / (1 - beta2**k)
    return v_hat.sqrt_().add_(group["eps"])


def torch_adafactor_preconditioner(optimizer, group, param, state):
    """torch.optim.Adafactor: v̂ = row_var·col_var / mean(row_var) (rank-1 factored), P = √v̂."""
    if _step_count(state) == 0:
        return None
    eps1 = group.get("eps1") or torch.finfo(param.dtype).eps
    if state.get("row_var") is not None and state.get("col_var") is not None:
        row, col = state["row_var"], state["col_var"]
        v_hat = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
    elif state.get("variance") is not None:
        v_hat = state["variance"].clone()
    else:
        return None
    return v_hat.clamp_(min=eps1 * eps1).sqrt_()


def hf_adafactor_preconditioner(optimizer, group, param, state):
    """transformers.Adafactor: v̂ = (row / mean(row)) ⊗ col, P = √v̂ (its update is g/√v̂)."""
    if _step_count(state) == 0:
        return None
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        v_hat = (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)
    elif "exp_avg_sq" in state:
        v_hat = state["exp_avg_sq"].clone()
    else:
        return None
    eps1 = group["eps"][0] if isinstance(group.get("eps"), (tuple, list)) else 1e-30
    return v_hat.add_(eps1).sqrt_().to(param.dtype)


register_preconditioner(torch.optim.Adam, adam_preconditioner)
register_preconditioner(torch.optim.AdamW, adam_preconditioner)
if hasattr(torch.optim, "Adafactor"):
    register_preconditioner(torch.optim.Adafactor, torch_adafactor_preconditioner)


class Preconditioners:
    """Lazy view of P for each parameter; ``available`` is False until every parameter has moments.

    P is computed per tensor on demand, so no parameter-sized set of buffers is held at once.
    All-or-nothing keeps ε on one scale: mixing 1/P for some tensors with 1 for others would
    make the perturbation's direction meaningless.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[Tensor]):
        self.optimizer = optimizer
        self.reader = find_reader(optimizer)
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.available = self.reader is not None and all(
            optimizer.state.get(p) and _step_count(optimizer.state[p]) > 0 for p in params
        )

    def __call__(self, param: Tensor) -> Optional[Tensor]:
        if not self.available:
            return None
        return self.reader(self.optimizer, self.group_of[id(param)], param, self.optimizer.state[param])
