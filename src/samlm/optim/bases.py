"""Several base optimizers acting as one, and the Muon + AdamW split of a model's parameters.

``CombinedOptimizer([muon, adamw])`` is a ``torch.optim.Optimizer`` over the union of its bases'
parameters: ``param_groups`` are all their groups (the same dicts, so an LR scheduler on it
moves every base), ``step()`` steps each base in order, ``zero_grad()`` zeroes each, and
``state_dict()`` nests each base's full state. A SAM-family wrapper given a list of optimizers
wraps their ``CombinedOptimizer``: its perturbation's norm then runs over all their parameters.

The Muon split (``muon_split``), the usual recipe (Jordan et al. 2024, "Muon: An optimizer for
hidden layers"; Liu et al. 2025, "Muon is Scalable for LLM Training"): Muon takes the hidden
2-D weight matrices; AdamW takes everything else — the token and position embeddings, the output
head (tied or not), the norms' gains and the biases (Muon only takes 2-D tensors, and the
embedding and head are not "hidden": their gradients are sparse or tied to the vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from .types import ParamGroup

__all__ = ["CombinedOptimizer", "as_optimizer", "muon_split", "HEAD_NAMES"]

# A base optimizer, or several acting as one (``[muon, adamw]``)
OptimizerOrList: TypeAlias = torch.optim.Optimizer | list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...]


def _is_sam(optimizer: object) -> bool:
    return hasattr(optimizer, "perturbation") and hasattr(optimizer, "base_optimizer")


class CombinedOptimizer(torch.optim.Optimizer):
    """Several base optimizers as one: each keeps its own parameters, groups and state."""

    optimizers: tuple[torch.optim.Optimizer, ...]

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        optimizers = tuple(optimizers)
        if not optimizers:
            raise ValueError("a list of base optimizers must hold at least one optimizer")
        flat: list[torch.optim.Optimizer] = []
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(f"base optimizers must be torch.optim.Optimizer instances, got {type(opt).__name__}")
            if _is_sam(opt):
                raise ValueError("a base optimizer is already a SAM optimizer; list the plain base optimizers")
            flat.extend(opt.optimizers if isinstance(opt, CombinedOptimizer) else (opt,))
        _check_disjoint(flat)
        self.optimizers = tuple(flat)
        self._adopting = True  # Optimizer.__init__ re-adds the groups: they stay the bases' own
        super().__init__(self.param_groups, {})
        self._adopting = False

    # -- the bases' groups and state, never copies --------------------------------------------
    @property
    def param_groups(self) -> list[ParamGroup]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[ParamGroup]) -> None:
        # Optimizer.__init__ of a wrapper around this one assigns [] and re-adds the same groups
        # (the wrapper's add_param_group): both leave the bases' groups as they are.
        if not (getattr(self, "_adopting", False) or all(self._owns(g) for g in groups)):
            raise AttributeError("set the param_groups of a base optimizer, not of their combination")

    # torch declares ``state`` a defaultdict; this merged, read-only view is a plain dict (no lookup adds an entry)
    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, Any]:
        """Every base's per-parameter state, in one (read-only) mapping."""
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @state.setter
    def state(self, value: dict[Tensor, Any]) -> None:
        if not getattr(self, "_adopting", False):
            raise AttributeError("set the state of a base optimizer, not of their combination")

    def add_param_group(self, param_group: ParamGroup) -> None:
        if not (getattr(self, "_adopting", False) or self._owns(param_group)):
            raise ValueError("add the parameter group to one of the base optimizers (combined.optimizers[i])")

    def _owns(self, group: ParamGroup) -> bool:
        return any(group is g for g in self.param_groups)

    def base_of(self, param: Tensor) -> torch.optim.Optimizer:
        """The base optimizer that steps ``param``."""
        for opt in self.optimizers:
            if any(p is param for g in opt.param_groups for p in g["params"]):
                return opt
        raise KeyError("parameter not in any base optimizer")

    # -- the optimizer surface ----------------------------------------------------------------
    # torch declares float losses (and None without a closure); this returns the closure's tensor
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "classes": [type(opt).__name__ for opt in self.optimizers],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(f"not a state dict of {len(self.optimizers)} combined base optimizers")
        classes = state_dict.get("classes")
        if classes is not None and list(classes) != [type(o).__name__ for o in self.optimizers]:
            raise ValueError(
                f"the state dict is of base optimizers {classes}, "
                f"these are {[type(o).__name__ for o in self.optimizers]}"
            )
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)

    def __repr__(self) -> str:
        return "CombinedOptimizer(\n" + ",\n".join(f"  {opt!r}" for opt in self.optimizers) + ")"


def _check_disjoint(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    owner: dict[int, int] = {}
    for k, opt in enumerate(optimizers):
        for g in opt.param_groups:
            for p in g["params"]:
                j = owner.setdefault(id(p), k)
                if j != k:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in two base optimizers "
                        f"(#{j} {type(optimizers[j]).__name__} and #{k} {type(opt).__name__}): "
                        "give each parameter to one of them"
                    )


def as_optimizer(base: OptimizerOrList) -> torch.optim.Optimizer:
    """An optimizer instance as it is; a list/tuple of them as their ``CombinedOptimizer``
    (one element: that optimizer)."""
    if isinstance(base, (list, tuple)):
        return base[0] if len(base) == 1 and isinstance(base[0], torch.optim.Optimizer) else CombinedOptimizer(base)
    return base


# Module names of output heads that a model without ``get_output_embeddings`` may use (HF
# classifiers and QA heads): their weights go to AdamW, as the LM head's.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _unwrap(model: nn.Module) -> nn.Module:
    for _ in range(8):  # DDP / torch.compile / accelerate wrappers
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def muon_split(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(hidden matrices for Muon, everything else for AdamW) among ``model``'s trainable parameters.

    Hidden matrices: 2-D parameters that are not an ``nn.Embedding``'s table, not the model's
    input/output embeddings (``get_input_embeddings``/``get_output_embeddings``, so a tied head
    too), and not inside a head module (``HEAD_NAMES``). Everything else (1-D gains and biases,
    embeddings, heads, convolutions) goes to AdamW. Raises ValueError when there is no hidden
    matrix."""
    inner = _unwrap(model)
    excluded: set[int] = set()
    for module_name, module in inner.named_modules():
        is_head = any(part in HEAD_NAMES for part in module_name.split("."))
        if isinstance(module, nn.Embedding) or is_head:
            excluded.update(id(p) for p in module.parameters())
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(inner, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            excluded.update(id(p) for p in module.parameters())
    matrices: list[Tensor] = []
    others: list[Tensor] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (matrices if p.ndim == 2 and id(p) not in excluded else others).append(p)
    if not matrices:
        raise ValueError(
            f"{type(inner).__name__} has no hidden 2-D weight matrix for Muon "
            "(all its parameters are embeddings, heads, gains or biases): use --base adamw"
        )
    return matrices, others


def params_of(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    """The parameters of a module, or the given iterable as a list."""
    return list(params.parameters()) if isinstance(params, nn.Module) else list(params)
