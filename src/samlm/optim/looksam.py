"""LookSAM (Liu, Mai, Chen, Hsieh and You, CVPR 2022): a SAM step every k-th step, cheap steps between.

Every ``look_every``-th step is a SAM step (ascent g at w, ε = ρ g/‖g‖, descent g_s = ∇L(w+ε))
that also keeps the part of g_s orthogonal to g,

    g_v = g_s − (⟨g_s, g⟩/‖g‖²) g

The steps between take one forward+backward at w (gradient g) and step along

    d = g + α (‖g‖/‖g_v‖) g_v

so a step costs 1 + ascent_fraction/look_every plain steps on average. With ``ascent_fraction`` < 1
the g of a SAM step is the ascent rows' gradient (Bahri et al.), g_s the whole batch's at w+ε,
so g_v also holds the batch's gradient minus the ascent rows' (even at ρ = 0); the paper's
LookSAM is ``ascent_fraction=1``, and at ρ = 0 it is then the base optimizer, bitwise.
It composes with the wrapper's schedule (schedule.py): the SAM-family steps of ``sam_every`` and
``sam_start`` are LookSAM's, every ``look_every``-th of them a full SAM step, the others its cheap
steps (``StepStats.sam_step`` True, ``eps_norm`` 0); the steps off the schedule are plain. Before
the first full SAM step there is no g_v and the cheap steps are plain ones. g_v is in ``state_dict``.

Memory: g_v, one gradient-sized buffer, held between full steps, and a copy of g during a full
step. A cheap step's ``StepStats`` report ‖d‖, the rewritten gradient, as ``grad_norm`` and
``update_grad_norm``.

Where it does not compose: the functional descent (Functional-SAM's J(w+ε)ᵀ r(w) is not the SAM
gradient whose orthogonal part the cheap steps reuse, and it needs r(w) from a pass over every
row on each step), perturbations other than SAM's ρ g/‖g‖, m-sharpness (one g_v per step), and
the ``step(closure)``/``first_step`` surface (the cheap steps need the driver: ``train_step``).
Under DDP with per-replica ε each replica's g_v differs: their mean is kept (one all-reduce every
``look_every`` steps), so the replicas' cheap steps stay the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from .bases import OptimizerOrList
from .descents import as_descent_rule
from .perturbations import Euclidean, local_tensor, sum_of_squares
from .sam import SharpnessAware


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """⟨a, b⟩ over lists of tensors, accumulated in at least float32."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32
    return torch.stack([torch.sum(x.to(acc) * y.to(acc)) for x, y in zip(a, b)]).sum()


class LookSAM(SharpnessAware):
    """LookSAM: SAM every ``look_every``-th step; between, g + α (‖g‖/‖g_v‖) g_v with the last
    SAM step's g_v (see the module docstring). ``alpha``: the reuse weight (0.7 in the paper)."""

    default_look_every = 5  # the registry's cost assumes this period (registry.py)

    def __init__(
        self,
        base: OptimizerOrList,
        rho: float | None = None,
        *,
        look_every: int = default_look_every,
        alpha: float = 0.7,
        ascent_fraction: float = 0.25,
        m: int = 1,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(look_every, int) and not isinstance(look_every, bool) and look_every >= 1):
            raise ValueError(
                f"look_every must be an integer >= 1 (a SAM step every look_every steps), got {look_every!r}"
            )
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if m != 1:
            raise ValueError(f"LookSAM keeps one g_v per step: m-sharpness (m={m!r}) does not compose with it")
        if "descent" in kwargs and as_descent_rule(kwargs["descent"]).needs_clean_cotangent:
            raise ValueError(
                "LookSAM reuses the orthogonal part of the SAM gradient ∇L(w+ε); the functional descent "
                "J(w+ε)ᵀ r(w) is another gradient and needs r(w) on every step: use the standard descent"
            )
        super().__init__(
            base,
            Euclidean(rho=self.resolve_rho(rho)),
            ascent_fraction=ascent_fraction,
            m=1,
            **kwargs,
        )
        self.look_every, self.alpha = look_every, float(alpha)
        self.look_direction: dict[Tensor, Tensor] = {}  # param -> g_v of the last SAM step
        self._ascent: dict[Tensor, Tensor] | None = None  # the SAM step's g, until g_v is formed

    @torch.no_grad()
    def perturb(self) -> tuple[Tensor, Tensor, Tensor]:
        self._ascent = {p: local_tensor(cast(Tensor, p.grad)).clone() for p in self.params_with_grad()}
        return super().perturb()

    def perturbs_this_step(self) -> bool:
        """Every ``look_every``-th step of the wrapper's schedule (asked when one is due)."""
        n = self.counters["steps"] + self.counters["skipped_steps"]
        return (n - self.schedule.start) // self.schedule.every % self.look_every == 0

    @torch.no_grad()
    def adjust_descent_gradient(self, sam_step: bool) -> None:
        if not sam_step:
            return  # a plain step of the schedule
        if self.perturbs_this_step():
            self._keep_orthogonal_part()
        elif self.look_direction:
            self._reuse()

    def _global(self, local: Tensor) -> Tensor:
        return self.grad_norm_fn(local) if self.grad_norm_fn is not None else local

    def _keep_orthogonal_part(self) -> None:
        ascent, self._ascent = self._ascent, None
        if not ascent:
            return
        params = [p for p in ascent if p.grad is not None]
        g = [ascent[p] for p in params]
        g_s = [local_tensor(cast(Tensor, p.grad)) for p in params]
        g_sq = self._global(_dot(g, g))  # the same reduction as ⟨g_s, g⟩: g_s = g gives g_v = 0 exactly
        coef = torch.where(g_sq > 0, self._global(_dot(g_s, g)) / g_sq.clamp(min=1e-30), torch.zeros_like(g_sq))
        g_v = [s.to(coef.dtype) - coef * a.to(coef.dtype) for s, a in zip(g_s, g)]
        if not self.sync_ascent:  # each replica's own ε, so its own g_v
            _mean_over_replicas(g_v)
        # a non-finite g_v (an overflowed step) keeps the last good one rather than poisoning the next steps
        finite = torch.isfinite(sum_of_squares(g_v))
        for p, v in zip(params, g_v):
            v = v.to(p.grad.dtype if p.grad is not None else v.dtype)
            old = self.look_direction.get(p)
            self.look_direction[p] = torch.where(finite, v, old if old is not None else torch.zeros_like(v))

    def _reuse(self) -> None:
        params = [p for p in self.params_with_grad() if p in self.look_direction]
        if not params:
            return
        g = [local_tensor(cast(Tensor, p.grad)) for p in params]
        g_v = [self.look_direction[p] for p in params]
        g_norm = self._global(sum_of_squares(g)).sqrt()
        v_norm = self._global(sum_of_squares(g_v)).sqrt()
        scale = torch.where(v_norm > 0, self.alpha * g_norm / v_norm.clamp(min=1e-30), torch.zeros_like(v_norm))
        for grad, v in zip(g, g_v):
            grad.add_((scale * v).to(grad.dtype))

    # -- the closure surface cannot take the cheap steps ----------------------------------------
    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("LookSAM's steps need the driver: use opt.train_step(batch, forward, loss)")

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("LookSAM's steps need the driver: use opt.train_step(batch, forward, loss)")

    # the signature of SharpnessAware.step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        raise RuntimeError("LookSAM's steps need the driver: use opt.train_step(batch, forward, loss)")

    # -- checkpointing: g_v beside the base's state -------------------------------------------
    def config(self) -> dict[str, Any]:
        return {**super().config(), "look_every": self.look_every, "alpha": self.alpha}

    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        index = {p: i for i, p in enumerate(self._flat_params())}
        state["look_direction"] = {index[p]: v.clone() for p, v in self.look_direction.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        params = self._flat_params()
        self.look_direction = {
            params[int(i)]: v.to(device=params[int(i)].device, dtype=params[int(i)].dtype)
            for i, v in state_dict.get("look_direction", {}).items()
        }


def _mean_over_replicas(tensors: list[Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())
