"""Momentum-SAM: ε along the base optimizer's own momentum, with no ascent pass.

Becker, Altrock and Risse (2024, arXiv 2401.12033) perturb along the momentum the base optimizer
already keeps, instead of a fresh ascent gradient:

    msam    ε = −ρ m/‖m‖                 m: AdamW's m̂ = exp_avg/(1 − β₁ᵏ), SGD's or Muon's momentum buffer
    pmsam   ε = −ρ u/‖u‖, u = m/P        P the base's geometry, as preconditioned SAM reads it
                                          (preconditioners.py): AdamW u = m̂/(√v̂ + eps), its own
                                          update direction; Muon's matrices u = s·NS(m)

−m points along the base's next step. The step's only forward+backward is the descent at w+ε
(cost 1× a plain step plus a perturb and a restore). The rules below declare
``needs_ascent_gradient = False``; the wrapper then hands them the momentum where other rules
get the ascent gradient, and the driver skips the ascent pass. Before the base has a momentum
(its first step) or while it is zero, ε = 0: that step is the base optimizer's plain step.

Bias correction of m̂ is a scalar per parameter group (one step count), so it changes ε only
where groups differ in β₁; it is applied so that pmsam's u is exactly AdamW's update direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor

from .perturbations import check_rho, local_tensor, precondition
from .preconditioners import Precond
from .types import ParamGroup, ParamState

# the base optimizers whose first moment is ``exp_avg`` with ``betas[0]``
_ADAM_FAMILY: tuple[type, ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
# those whose momentum is ``momentum_buffer``, present when the group's ``momentum`` > 0
_BUFFERED: tuple[type, ...] = (torch.optim.SGD, *((torch.optim.Muon,) if hasattr(torch.optim, "Muon") else ()))


def _bases(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    bases = getattr(optimizer, "optimizers", None)
    return bases if isinstance(bases, tuple) else (optimizer,)


def check_momentum(optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless every parameter group of the base optimizer(s) keeps a momentum."""
    for base in _bases(optimizer):
        name = type(base).__name__
        if isinstance(base, _ADAM_FAMILY):
            continue
        if not isinstance(base, _BUFFERED):
            raise ValueError(
                f"Momentum-SAM perturbs along the base optimizer's momentum, and {name} keeps none it can "
                "read: use Adam, AdamW, NAdam, RAdam, SGD with momentum > 0, or Muon"
            )
        for index, group in enumerate(base.param_groups):
            if not group.get("momentum", 0) > 0:
                raise ValueError(
                    f"Momentum-SAM perturbs along the base optimizer's momentum, and {name}'s parameter "
                    f"group {index} has momentum={group.get('momentum', 0)!r}: give it momentum > 0 "
                    "(e.g. torch.optim.SGD(params, lr=..., momentum=0.9))"
                )


def _first_moment(base: torch.optim.Optimizer, group: ParamGroup, state: ParamState) -> Tensor | None:
    if isinstance(base, _ADAM_FAMILY):
        if "exp_avg" not in state:
            return None
        step = state.get("step", 0)
        k = float(step.item() if isinstance(step, Tensor) else step)
        if k == 0:
            return None
        moment: Tensor = state["exp_avg"]
        corrected: Tensor = moment / (1 - group["betas"][0] ** k)
        return corrected
    found: Tensor | None = state.get("momentum_buffer")
    return found


def check_without_ascent(optimizer: torch.optim.Optimizer, functional: bool, m: int) -> None:
    """What a rule without an ascent pass cannot do, refused at construction."""
    check_momentum(optimizer)
    if functional:
        raise ValueError(
            "Momentum-SAM has no pass at w, and the functional descent needs r(w) from one: use the standard descent"
        )
    if m != 1:
        raise ValueError(
            f"Momentum-SAM has one ε per step, the base's momentum, so m-sharpness does not apply: m={m!r}"
        )


def momenta(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Sequence[Tensor]:
    """Each parameter's momentum as its base optimizer keeps it (AdamW's m̂), zeros where there
    is none yet, this process's shard of it under FSDP2. Computed per item as the perturbation's
    chunks ask for it, so no parameter-sized set of m̂ is held at once; read, never written."""
    where: dict[int, tuple[torch.optim.Optimizer, ParamGroup]] = {}
    for base in _bases(optimizer):
        for group in base.param_groups:
            for p in group["params"]:
                where[id(p)] = (base, group)
    return _Momenta([(p, *where[id(p)]) for p in params])


class _Momenta(Sequence[Tensor]):
    def __init__(self, entries: list[tuple[Tensor, torch.optim.Optimizer, ParamGroup]]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Tensor]: ...

    def __getitem__(self, index: int | slice) -> Tensor | Sequence[Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        p, base, group = self.entries[index]
        with torch.no_grad():
            moment = _first_moment(base, group, base.state.get(p, {}))
            return local_tensor(torch.zeros_like(p) if moment is None else moment)


@dataclass(frozen=True)
class Momentum:
    """Momentum-SAM (Becker et al. 2024): ε = −ρ m/‖m‖, m the base optimizer's momentum (handed
    in as ``grad``)."""

    rho: float
    needs_preconditioner = False
    needs_ascent_gradient = False

    def __post_init__(self) -> None:
        check_rho(self.rho)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return grad

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return -grad


@dataclass(frozen=True)
class PreconditionedMomentum:
    """Preconditioned Momentum-SAM: ε = −ρ u/‖u‖ with u = m/P, the base's own update direction
    (AdamW: m̂/(√v̂ + eps); Muon's matrices: s·NS(m)). Before the base has moments, u = m."""

    rho: float
    needs_preconditioner = True
    needs_ascent_gradient = False

    def __post_init__(self) -> None:
        check_rho(self.rho)

    def scaled_gradient(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return precondition(grad, precond)

    def direction(self, param: Tensor, grad: Tensor, precond: Precond) -> Tensor:
        return precondition(grad, precond).neg()
