"""The SAM family as one optimizer wrapper with two pluggable parts.

A step of every variant is

    g   = ∇L_a(w)                         ascent gradient, on a micro-batch a of the batch
    ε   = rule(w, g)                      the perturbation (perturbations.py)
    d   = descent(w+ε)                    the descent rule (descents.py): ∇L(w+ε), or
                                          J(w+ε)ᵀ r(w) with r = ∂L/∂outputs at w (functional)
    w  ← base_step(w, d)                  weights restored bitwise before the base step

This module holds the state and the math of the step; ``driver.py`` runs the passes. A class's
default ρ is its entry's in ``registry.py``, which sets ``default_rho``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .bases import OptimizerOrList, as_optimizer
from .descents import DescentRule, Functional, Standard, as_descent_rule
from .driver import plain_step, sharpness_aware_step
from .momentum import Momentum, PreconditionedMomentum, check_without_ascent, momenta
from .perturbations import (
    Adaptive,
    Euclidean,
    PerturbationRule,
    Preconditioned,
    Spectral,
    add_perturbation_,
    local_tensor,
    perturbation_norm,
)
from .preconditioners import Preconditioners, PrecondOf, find_reader
from .running_stats import check_policy
from .schedule import SamSchedule
from .step_stats import StepStats
from .types import Batch, ForwardFn, GradNormFn, LossFn, ParamGroup

__all__ = [
    "SharpnessAware",
    "SAM",
    "ASAM",
    "FunctionalSAM",
    "PreconditionedSAM",
    "PreconditionedFunctionalSAM",
    "SpectralSAM",
    "MomentumSAM",
    "PreconditionedMomentumSAM",
    "train_step",
    "local_tensor",
]


def _on_shards(precond: PrecondOf, owner: dict[int, Tensor]) -> PrecondOf:
    """``precond`` keyed by a DTensor parameter → keyed by its local shard, returning shards."""
    return lambda shard: local_tensor(precond(owner[id(shard)]))


class SharpnessAware(torch.optim.Optimizer):
    """Wraps a base optimizer *instance* (or several); ``param_groups`` are the base optimizer's own.

    Args:
        base: any ``torch.optim.Optimizer``; it takes the final step at the restored weights.
            A list/tuple of them (``[muon, adamw]``) acts as one (``CombinedOptimizer``): ε's
            norm runs over all their parameters, ``param_groups`` are all their groups and
            ``state_dict`` nests each one's state.
        perturbation: a rule object (``Euclidean``, ``Adaptive``, ``Preconditioned`` or your own).
        descent: a descent rule, ``Standard()`` (∇L(w+ε)) or ``Functional()`` (J(w+ε)ᵀ r(w),
            Functional-SAM), or its name; default: the class's ``descent_rule``.
        ascent_fraction: the ascent gradient uses the first ⌈ascent_fraction·b⌉ rows of each
            group's batch (Bahri et al.: 0.25; 1.0 is classic SAM).
        m: m-sharpness groups; each group of b/m rows gets its own ε and the groups' SAM
            gradients are averaged.
        sync_ascent: under torch.distributed, all-reduce the ascent gradient so every replica
            uses the same global ε (exact global SAM). Off by default: per-replica ε, as in
            Foret et al. and the paper, i.e. m-sharpness with m = number of replicas.
        grad_norm_fn: how to reduce the squared norm of local tensors to a global one (FSDP
            passes an all-reduce over shards); default: local sum.
        running_stats: which pass of ``train_step`` updates the running statistics of the
            model's norm layers (BatchNorm): ``"ascent"`` (at w, default), ``"descent"`` (at
            w+ε, every row once) or ``"all"``; the others leave them bitwise unchanged
            (running_stats.py). Needs ``train_step(..., model=module)`` or a module as forward.
        sam_every: a SAM-family step every ``sam_every``-th step, plain base-optimizer steps
            (one forward+backward) in between (schedule.py).
        sam_start: plain steps before it, the schedule's steps from it on: a step index, or a
            fraction in (0, 1) of ``total_steps`` (the run's optimizer steps).
    """

    descent_rule: DescentRule = Standard()
    default_rho: float | None = None  # set from the class's registry entry (registry.py)
    observes_ascent_rows_descent = False  # True: the driver calls ascent_rows_descended() (LookSAM)

    def __init__(
        self,
        base: OptimizerOrList,
        perturbation: PerturbationRule,
        *,
        descent: DescentRule | str | None = None,
        ascent_fraction: float = 0.25,
        m: int = 1,
        sync_ascent: bool = False,
        grad_norm_fn: GradNormFn | None = None,
        running_stats: str = "ascent",
        sam_every: int = 1,
        sam_start: int | float = 0,
        total_steps: int | None = None,
    ) -> None:
        base = as_optimizer(base)
        if not isinstance(base, torch.optim.Optimizer):
            raise ValueError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
        if isinstance(base, SharpnessAware):
            raise ValueError("base is already a SAM optimizer; wrap the plain base optimizer instead")
        if not isinstance(perturbation, PerturbationRule):
            raise ValueError("perturbation must provide rho, needs_preconditioner, scaled_gradient() and direction()")
        descent_rule = as_descent_rule(self.descent_rule if descent is None else descent)
        if not (isinstance(ascent_fraction, (int, float)) and 0 < ascent_fraction <= 1):
            raise ValueError(f"ascent_fraction must be in (0, 1], got {ascent_fraction!r}")
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        check_policy(running_stats)
        schedule = SamSchedule.of(sam_every, sam_start, total_steps)
        if perturbation.needs_preconditioner and find_reader(base) is None:
            names = [type(b).__name__ for b in getattr(base, "optimizers", (base,))]
            raise ValueError(
                f"{type(perturbation).__name__} perturbation needs a base optimizer with second moments or a "
                f"geometry it can read (Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adafactor, Muon, or "
                f"one registered with register_preconditioner); got {', '.join(names)}"
            )
        if not getattr(perturbation, "needs_ascent_gradient", True):
            check_without_ascent(base, descent_rule.needs_clean_cotangent, m)
        if isinstance(perturbation, Spectral) and not _has_muon(base):
            raise ValueError(
                "the spectral perturbation perturbs Muon's matrices: it needs a Muon base "
                "optimizer (e.g. [torch.optim.Muon(hidden_matrices), torch.optim.AdamW(rest)])"
            )
        self.base_optimizer = base
        self.perturbation = perturbation
        self.descent_rule = descent_rule
        self.ascent_fraction = float(ascent_fraction)
        self.m = m
        self.sync_ascent = sync_ascent
        self.grad_norm_fn = grad_norm_fn
        self.running_stats = running_stats
        self.schedule = schedule
        self.sam_start, self.total_steps = sam_start, total_steps
        # steps: taken; skipped_steps: not taken (non-finite); sam_steps + plain_steps: both, by kind
        self.counters = {
            "steps": 0,
            "skipped_steps": 0,
            "ascent_nonfinite": 0,
            "zero_grad_norm": 0,
            "sam_steps": 0,
            "plain_steps": 0,
        }
        self._saved: list[Tensor] | None = None  # weights at w while perturbed: not state
        self._perturbed = False
        # torch.optim.Optimizer.__init__ assigns self.param_groups = [] and re-adds each group:
        # while adopting, both leave the base's own groups (the same dicts) as they are.
        self._adopting = True
        super().__init__(list(base.param_groups), base.defaults)
        self._adopting = False

    # -- param_groups are the base optimizer's, always (LR schedulers act on either) --------
    @property
    def param_groups(self) -> list[ParamGroup]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[ParamGroup]) -> None:
        if not getattr(self, "_adopting", False):
            self.base_optimizer.param_groups = groups

    @property
    def rho(self) -> float:
        return self.perturbation.rho

    @property
    def base_optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The base optimizers: several when built from a list, else the one."""
        return getattr(self.base_optimizer, "optimizers", (self.base_optimizer,))

    @property
    def descent(self) -> str:
        """The descent rule's name: "standard" or "functional"."""
        return self.descent_rule.name

    @classmethod
    def resolve_rho(cls, rho: float | None) -> float:
        """``rho``, or the class's registry default when None."""
        if rho is not None:
            return rho
        if cls.default_rho is None:
            raise ValueError(f"{cls.__name__} has no default rho: pass rho=")
        return cls.default_rho

    def add_param_group(self, param_group: ParamGroup) -> None:
        if not getattr(self, "_adopting", False):
            self.base_optimizer.add_param_group(param_group)

    def params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @property
    def needs_ascent_gradient(self) -> bool:
        """The perturbation is built from an ascent gradient at w (False: from the base
        optimizer's state, Momentum-SAM, and the driver runs no ascent pass)."""
        return bool(getattr(self.perturbation, "needs_ascent_gradient", True))

    def perturbed_params(self) -> list[Tensor]:
        """The parameters ``perturb()`` moves: those with a gradient, or every trainable one for
        a rule without an ascent gradient (``epsilon()`` is in this order)."""
        if self.needs_ascent_gradient:
            return self.params_with_grad()
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # -- the math of one step ---------------------------------------------------------------
    def _global_norm(self, squared: Tensor) -> Tensor:
        if self.grad_norm_fn is not None:
            squared = self.grad_norm_fn(squared)
        return squared.sqrt()

    @torch.no_grad()
    def perturb(self) -> tuple[Tensor, Tensor, Tensor]:
        """w ← w + ε(w, g) with g in ``p.grad``; saves w for an exact restore.

        Returns (‖scaled g‖, ‖ε‖, ok). ``ok`` is False when g is non-finite or zero; then
        ε = 0 (an unperturbed step), decided on the device without a host sync. A rule without
        an ascent gradient gets the base optimizer's momentum in place of g (momentum.py).
        """
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore(); call restore() first")
        params = self.perturbed_params()
        if not params:
            raise RuntimeError("no parameter has a gradient: run backward on the ascent loss first")
        grads: Sequence[Tensor] = (
            cast(list[Tensor], [local_tensor(p.grad) for p in params])
            if self.needs_ascent_gradient
            else momenta(self.base_optimizer, params)
        )
        precond = self._preconditioner(params)
        shards = [local_tensor(p) for p in params]
        if any(shard is not p for shard, p in zip(shards, params)):
            # FSDP2 (DTensor): the math runs on this process's shards; grad_norm_fn sums the norms.
            owner = {id(shard): p for shard, p in zip(shards, params)}
            precond = _on_shards(precond, owner)
            params = shards
        norm = self._global_norm(perturbation_norm(self.perturbation, params, grads, precond).square())
        ok = torch.isfinite(norm) & (norm > 0)
        radius = (
            self.perturbation.rho / (norm + 1e-12)
            if getattr(self.perturbation, "normalize", True)
            else torch.full_like(norm, self.perturbation.rho)
        )  # a radius per tensor (Spectral)
        scale = torch.where(ok, radius, torch.zeros_like(norm))

        self._save_weights(params)
        eps_sq = add_perturbation_(self.perturbation, params, grads, precond, scale, ok)
        self._perturbed = True
        return norm, self._global_norm(eps_sq), ok

    def _preconditioner(self, params: list[Tensor]) -> PrecondOf:
        if self.perturbation.needs_preconditioner:
            view = Preconditioners(self.base_optimizer, params, joint=getattr(self.perturbation, "normalize", True))
            return view.geometry
        return lambda param: None

    def _save_weights(self, params: list[Tensor]) -> None:
        # One parameter-sized buffer, reused across steps; never part of state_dict().
        if (
            self._saved is None
            or len(self._saved) != len(params)
            or any(
                s.shape != p.shape or s.dtype != p.dtype or s.device != p.device for s, p in zip(self._saved, params)
            )
        ):
            self._saved = [torch.empty_like(p) for p in params]
        self._saved_params = params
        torch._foreach_copy_(self._saved, [p.detach() for p in params])

    @property
    def perturbed(self) -> bool:
        """The weights are at w+ε (between ``perturb()`` and ``restore()``)."""
        return self._perturbed

    @torch.no_grad()
    def epsilon(self) -> Sequence[Tensor]:
        """ε = (w+ε) − w while perturbed, one tensor per parameter with a gradient."""
        if not self._perturbed:
            raise RuntimeError("epsilon() needs perturb() first")
        assert self._saved is not None  # saved by perturb()
        return torch._foreach_sub(self._saved_params, self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        """w+ε → w, bitwise: a copy of the saved weights, never w+ε−ε."""
        if not self._perturbed:
            return
        assert self._saved is not None  # saved by perturb()
        torch._foreach_copy_(self._saved_params, self._saved)
        self._perturbed = False

    def adjust_descent_gradient(self, sam_step: bool) -> None:
        """Called by the driver with the step's descent gradient in ``p.grad`` (unscaled, before
        clipping and the base step); a method may rewrite it there (LookSAM). Default: nothing."""

    def ascent_rows_descended(self) -> None:
        """With ``observes_ascent_rows_descent``, called once the descent at w+ε has covered the
        ascent rows, before the other rows add theirs to ``p.grad``. Default: nothing."""

    def base_step(self, sam_step: bool = True) -> None:
        self.base_optimizer.step()
        self.record_step(sam_step=sam_step)

    def sam_step_due(self) -> bool:
        """The next step is a SAM-family step of the schedule (else a plain one)."""
        return self.schedule.is_sam_step(self.counters["steps"] + self.counters["skipped_steps"])

    @property
    def steps_per_cycle(self) -> int:
        """Steps after which the schedule's mix of step kinds repeats (``sam_every``; LookSAM: times
        ``look_every``): a step time taken over any whole cycle counts each kind at its share."""
        return self.schedule.every

    def perturbs_this_step(self) -> bool:
        """A SAM-family step of the schedule runs the ascent and perturbs (LookSAM: only every
        ``look_every``-th; its others are one pass at w, rewritten by ``adjust_descent_gradient``)."""
        return True

    def record_step(
        self,
        *,
        skipped: bool = False,
        ascent_nonfinite: bool = False,
        zero_grad_norm: bool = False,
        sam_step: bool = True,
    ) -> None:
        """Count one optimizer step: taken or skipped, SAM or plain, and whether its ascent
        gradient was non-finite or zero."""
        self.counters["sam_steps" if sam_step else "plain_steps"] += 1
        if skipped:
            self.counters["skipped_steps"] += 1
        else:
            self.counters["steps"] += 1
            self._opt_called = True  # tells LR schedulers that an optimizer step happened
        self.counters["ascent_nonfinite"] += int(ascent_nonfinite)
        self.counters["zero_grad_norm"] += int(zero_grad_norm)

    # -- the surface PyTorch users know (davda54/sam) ---------------------------------------
    def _require_standard(self, what: str) -> None:
        if self.descent_rule.needs_clean_cotangent:
            raise RuntimeError(
                f"{type(self).__name__}.{what} is not available: the functional descent needs the "
                "clean output cotangent r(w); use opt.train_step(batch, forward, loss)"
            )

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w+ε using the gradient currently in ``p.grad`` (computed at w)."""
        self._require_standard("first_step()")
        norm, _, ok = self.perturb()
        if not bool(ok):  # one host sync: this surface reports through counters only
            self.counters["ascent_nonfinite" if not bool(torch.isfinite(norm)) else "zero_grad_norm"] += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and take the base optimizer's step with the gradient computed at w+ε."""
        self._require_standard("second_step()")
        self.restore()
        self.base_step()
        if zero_grad:
            self.zero_grad()

    # torch declares float losses (and None without a closure); this returns the closure's tensor, or None
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """A step with a closure that computes the loss and calls backward (it may zero the
        gradients first).

        No gradient in ``p.grad`` yet (torch's convention, Lightning): the closure runs at w,
        then at w+ε; returns the loss at w and leaves no gradient. The gradient at w already in
        ``p.grad`` (davda54/sam): the closure runs at w+ε; returns its loss. A plain step of the
        schedule runs the closure at w only if no gradient is there (returns its loss, or None).
        A SAM step of a rule without an ascent gradient (Momentum-SAM) runs it at w+ε only.
        """
        self._require_standard("step(closure)")
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that re-evaluates the loss and calls backward(); "
                "or use opt.train_step(batch, forward, loss), or first_step()/second_step()"
            )
        closure = torch.enable_grad()(closure)
        given = self._has_gradient()
        at_w = not given and (self.needs_ascent_gradient or not self.sam_step_due())
        loss = closure() if at_w else None
        if not self.sam_step_due():
            self.base_step(sam_step=False)
        else:
            self.first_step(zero_grad=True)
            loss_perturbed = closure()
            self.second_step()
            loss = loss if at_w else loss_perturbed
        if not given:
            self.zero_grad(set_to_none=True)  # the next step(closure) sees no gradient either
        return loss

    def _has_gradient(self) -> bool:
        """Some gradient is non-zero (None, or zeros from ``zero_grad(set_to_none=False)``, is none)."""
        grads = cast(list[Tensor], [local_tensor(p.grad) for p in self.params_with_grad()])
        return bool(grads) and bool(torch.stack([g.any() for g in grads]).any())

    def train_step(self, batch: Batch, forward: ForwardFn, loss: LossFn, **kwargs: Any) -> StepStats:
        """One optimizer step that owns all passes; see ``samlm.optim.driver.sharpness_aware_step``."""
        return sharpness_aware_step(self, batch, forward, loss, **kwargs)

    # -- checkpointing: the base optimizer's full state, nothing transient ------------------
    def config(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "perturbation": type(self.perturbation).__name__,
            "rho": self.perturbation.rho,
            "descent": self.descent,
            "ascent_fraction": self.ascent_fraction,
            "m": self.m,
            "sync_ascent": self.sync_ascent,
            "running_stats": self.running_stats,
            "sam_every": self.schedule.every,
            "sam_start": self.sam_start,
            "total_steps": self.total_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "counters": dict(self.counters),
            "config": self.config(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                # A plain optimizer's state dict: load it into the base optimizer.
                self.base_optimizer.load_state_dict(state_dict)
                return
            raise ValueError("not a samlm optimizer state dict: it has no 'base_optimizer' entry")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.counters.update(state_dict.get("counters", {}))

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "class")
        return f"{type(self).__name__}({cfg},\n  base={self.base_optimizer!r})"


_WRAPPER_OPTIONS = ("sync_ascent", "grad_norm_fn", "running_stats", "sam_every", "sam_start", "total_steps")


def _has_muon(base: torch.optim.Optimizer) -> bool:
    muon = getattr(torch.optim, "Muon", None)
    return muon is not None and any(isinstance(b, muon) for b in getattr(base, "optimizers", (base,)))


def _wrap_base(
    base: OptimizerOrList | ParamsT,
    base_optimizer: type[torch.optim.Optimizer] | None,
    base_kwargs: dict[str, Any],
    name: str,
) -> torch.optim.Optimizer:
    """Accept an optimizer instance (or a list of them), or davda54's (params, base_optimizer_cls, **kwargs)."""
    if isinstance(base, (list, tuple)) and base and all(isinstance(b, torch.optim.Optimizer) for b in base):
        base = as_optimizer(base)
    if isinstance(base, torch.optim.Optimizer):
        if base_optimizer is not None or base_kwargs:
            raise ValueError(f"{name}: pass either an optimizer instance or (params, optimizer class, **kwargs)")
        return base
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer(cast(ParamsT, base), **base_kwargs)  # davda54's form: base is the parameters
    raise ValueError(
        f"{name} wraps a torch.optim.Optimizer instance, e.g. {name}(torch.optim.AdamW(model.parameters()))"
    )


class SAM(SharpnessAware):
    """Sharpness-Aware Minimization (Foret et al.) with Bahri et al.'s micro-batch ascent.

    ``SAM(base)`` wraps an optimizer instance. davda54/sam's form
    ``SAM(params, torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1)`` also works.
    """

    def __init__(
        self,
        base: OptimizerOrList | ParamsT,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = 0.0,
        ascent_fraction: float = 0.25,
        m: int = 1,
        **kwargs: Any,
    ) -> None:
        sam_kwargs = {k: kwargs.pop(k) for k in _WRAPPER_OPTIONS if k in kwargs}
        base = _wrap_base(base, base_optimizer, kwargs, type(self).__name__)
        rho = self.resolve_rho(rho)
        rule = Adaptive(rho=rho, eta=eta) if adaptive else Euclidean(rho=rho)
        super().__init__(base, rule, ascent_fraction=ascent_fraction, m=m, **sam_kwargs)


class ASAM(SharpnessAware):
    """Adaptive SAM (Kwon et al. 2021): ε = ρ T²g/‖Tg‖, T = |w| + η."""

    def __init__(
        self,
        base: OptimizerOrList,
        rho: float | None = None,
        eta: float = 0.01,
        *,
        ascent_fraction: float = 0.25,
        m: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            base, Adaptive(rho=self.resolve_rho(rho), eta=eta), ascent_fraction=ascent_fraction, m=m, **kwargs
        )


class _FixedRules(SharpnessAware):
    """A method given by two class attributes: ``perturbation_rule`` (a rule class, built with ρ)
    and ``descent_rule``."""

    perturbation_rule: Callable[..., PerturbationRule]

    def __init__(
        self,
        base: OptimizerOrList,
        rho: float | None = None,
        *,
        ascent_fraction: float = 0.25,
        m: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            base, self.perturbation_rule(rho=self.resolve_rho(rho)), ascent_fraction=ascent_fraction, m=m, **kwargs
        )


class FunctionalSAM(_FixedRules):
    """Functional-SAM (Singh et al. 2025): descend along J(w+ε)ᵀ r(w), the functional path only."""

    perturbation_rule = Euclidean
    descent_rule = Functional()


class PreconditionedSAM(_FixedRules):
    """Preconditioned SAM (Singh et al. 2025): ε ∝ g/(√v̂+eps) with ‖ε‖₂ = ρ, v̂ from the base optimizer."""

    perturbation_rule = Preconditioned


class PreconditionedFunctionalSAM(_FixedRules):
    """Preconditioned Functional-SAM (Singh et al. 2025): the preconditioned ε, the functional descent."""

    perturbation_rule = Preconditioned
    descent_rule = Functional()


class MomentumSAM(_FixedRules):
    """Momentum-SAM (Becker, Altrock and Risse 2024): ε = −ρ m/‖m‖ along the base optimizer's own
    momentum (AdamW's m̂, SGD's or Muon's buffer), no ascent pass: one forward+backward per step,
    at w+ε. The base must keep a momentum (a ValueError otherwise); its first step, before any
    momentum, is a plain one (ε = 0). ``ascent_fraction`` is accepted and unused (no ascent)."""

    perturbation_rule = Momentum


class PreconditionedMomentumSAM(_FixedRules):
    """Momentum-SAM in the base's geometry: ε = −ρ u/‖u‖ with u the base's update direction
    (AdamW: m̂/(√v̂ + eps); Muon's matrices: s·NS(m)), one forward+backward per step."""

    perturbation_rule = PreconditionedMomentum


class SpectralSAM(_FixedRules):
    """Spectral SAM (Zhong, Milsom and Murray 2026): each of Muon's matrices perturbed within its
    own spectral-norm ball, ε_i = ρ·NS(G_i), the other parameters not; the standard descent.
    Needs a Muon base (``SpectralSAM([muon, adamw], rho=...)``)."""

    perturbation_rule = Spectral
    default_rho = None  # not a registry method: ρ (per matrix, operator norm) is the caller's to choose


def train_step(optimizer: OptimizerOrList, batch: Batch, forward: ForwardFn, loss: LossFn, **kwargs: Any) -> StepStats:
    """One optimizer step for any optimizer: SAM-family wrappers run their passes, plain
    optimizers one forward/backward per micro-batch. Same arguments as ``sharpness_aware_step``.
    A SAM-family optimizer inside a wrapper's ``.optimizer`` (accelerate's AcceleratedOptimizer)
    counts as SAM-family. A list of plain optimizers (``[muon, adamw]``) steps them together."""
    if isinstance(optimizer, (list, tuple)):
        optimizer = as_optimizer(optimizer)
    sam = sharpness_aware_inside(optimizer)
    if sam is not None:
        return sharpness_aware_step(sam, batch, forward, loss, **kwargs)
    return plain_step(optimizer, batch, forward, loss, **kwargs)


def sharpness_aware_inside(optimizer: object) -> SharpnessAware | None:
    """``optimizer`` if SAM-family, else the SAM-family optimizer its ``.optimizer`` chain wraps."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(optimizer, SharpnessAware):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            return None
    return None
