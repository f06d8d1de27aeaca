"""LookSAM (Liu, Mai, Chen, Hsieh and You, CVPR 2022): a SAM step every k-th step, cheap steps between.

Every ``look_every``-th step is a full SAM step (ascent g at w, ε = ρ g/‖g‖, descent g_s = ∇L(w+ε))
that also keeps the part of g_s orthogonal to g,

    g_v = g_s − (⟨g_s, g⟩/‖g‖²) g

The steps between take one forward+backward at w (gradient g) and step along

    d = g + α (‖g‖/‖g_v‖) g_v

so a step costs 1 + ascent_fraction/look_every plain steps on average. With ``ascent_fraction`` < 1
(Bahri et al.) g is the ascent rows' gradient, and g_v is formed on those same rows: the descent
at w+ε runs the ascent rows first (their g_s is read before the other rows add theirs; the same
rows and passes, in two pieces where a micro-batch holds both kinds), then the others, and the
base steps with the whole batch's g_s. Comparing g_s of all rows with g of a quarter of them would
put the batch-versus-quarter sampling difference into g_v; on the same rows g_v is SAM's own
change, and at ρ = 0 LookSAM is the base optimizer. A g_v below 1e-6·‖g_s‖ counts as none.

It composes with the wrapper's schedule (schedule.py): the SAM-family steps of ``sam_every`` and
``sam_start`` are LookSAM's, every ``look_every``-th of them a full SAM step, the others its cheap
steps (``StepStats.sam_step`` True, ``eps_norm`` 0); the steps off the schedule are plain. Before
the first full SAM step there is no g_v and the cheap steps are plain ones. g_v (as a unit
vector) is in ``state_dict``. Under DDP each replica forms g_v on its own rows: their mean is
kept (one all-reduce every ``look_every`` steps), so the replicas' cheap steps agree. Under FSDP
(``grad_norm_fn``, ``sync_ascent``) each process holds its shard of the global g and g_s, and the
inner products and norms are summed over the shards; FSDP1's flat parameters are refused.

Memory: g_v, one gradient-sized buffer, held between full steps, and copies of g and of the
ascent rows' g_s during a full step. A cheap step's ``StepStats`` report ‖d‖, the rewritten
gradient, as ``grad_norm`` and ``update_grad_norm``.

Where it does not compose: the functional descent (Functional-SAM's J(w+ε)ᵀ r(w) is not the SAM
gradient whose orthogonal part the cheap steps reuse, and it needs r(w) from a pass over every
row on each step), perturbations other than SAM's ρ g/‖g‖, m-sharpness (one g_v per step),
and the ``first_step``/``second_step`` surface (a cheap step is one pass
at w, which that surface cannot express; ``step(closure)`` and ``train_step`` take it). With BatchNorm, the two descent pieces normalize over their own rows.
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
    default_alpha = 0.7  # Liu et al.'s
    observes_ascent_rows_descent = True

    def __init__(
        self,
        base: OptimizerOrList,
        rho: float | None = None,
        *,
        look_every: int = default_look_every,
        alpha: float = default_alpha,
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
        self._ascent: dict[Tensor, Tensor] | None = None  # a full step's g, until g_v is formed
        self._ascent_descent: dict[Tensor, Tensor] | None = None  # its g_s on the ascent rows

    @torch.no_grad()
    def perturb(self) -> tuple[Tensor, Tensor, Tensor]:
        self._ascent = {p: local_tensor(cast(Tensor, p.grad)).clone() for p in self.params_with_grad()}
        return super().perturb()

    @torch.no_grad()
    def ascent_rows_descended(self) -> None:
        if self._ascent is not None:  # a full step: g_s on the ascent rows, before the others add theirs
            self._ascent_descent = {p: local_tensor(p.grad).clone() for p in self._ascent if isinstance(p.grad, Tensor)}

    @property
    def steps_per_cycle(self) -> int:
        return self.schedule.every * self.look_every

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

    def _keep_orthogonal_part(self) -> None:
        ascent, descent = self._ascent, self._ascent_descent
        self._ascent = self._ascent_descent = None
        if not ascent or not descent:
            return
        params = [p for p in ascent if p in descent]
        g = [ascent[p] for p in params]
        g_s = [descent[p] for p in params]
        if any(a.shape != b.shape for a, b in zip(g, g_s)):
            raise RuntimeError(
                "LookSAM: a gradient changed shape between the ascent and the descent (FSDP1's flat "
                "parameters); use FSDP2 (torch.distributed.fsdp.fully_shard, samlm's --strategy fsdp)"
            )
        # ⟨g, g⟩ by the same reduction as ⟨g_s, g⟩: where g_s = c·g exactly (ρ = 0), g_v = 0 exactly
        g_sq = self._over_shards(_dot(g, g))
        coef = torch.where(g_sq > 0, self._over_shards(_dot(g_s, g)) / g_sq.clamp(min=1e-30), torch.zeros_like(g_sq))
        g_v = [s.to(coef.dtype) - coef * a.to(coef.dtype) for s, a in zip(g_s, g)]
        if self.grad_norm_fn is None:  # DDP: per-replica rows (and ε); one g_v, so the cheap steps agree
            _mean_over_replicas(g_v)
        v_norm = self._over_shards(sum_of_squares(g_v)).sqrt()
        # kept as a unit vector (the reuse scales it by ‖g‖); below rounding of g_s it is no
        # direction (zero: the cheap steps are plain); non-finite (an overflow): the last one stays
        real = v_norm > 1e-6 * self._over_shards(sum_of_squares(g_s)).sqrt()
        unit = torch.where(real, 1 / v_norm.clamp(min=1e-30), torch.zeros_like(v_norm))
        finite = torch.isfinite(v_norm)
        for p, v in zip(params, g_v):
            v = (v * unit).to(p.dtype)
            old = self.look_direction.get(p)
            self.look_direction[p] = torch.where(finite, v, old if old is not None else torch.zeros_like(v))

    def _over_shards(self, local_sum: Tensor) -> Tensor:
        """A sum over this process's shards → over the whole tensors (FSDP: ``grad_norm_fn``
        all-reduces it; whole gradients: itself)."""
        return local_sum if self.grad_norm_fn is None else self.grad_norm_fn(local_sum)

    def _reuse(self) -> None:
        params = [p for p in self.params_with_grad() if p in self.look_direction]
        if not params:
            return
        g = [local_tensor(cast(Tensor, p.grad)) for p in params]
        scale = self.alpha * self._over_shards(sum_of_squares(g)).sqrt()  # α‖g‖ along the unit g_v
        for grad, p in zip(g, params):
            grad.add_((scale * self.look_direction[p]).to(grad.dtype))

    # -- the closure surface (Lightning's automatic optimization) -------------------------------
    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError(_CLOSURE_ONLY)

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError(_CLOSURE_ONLY)

    # the signature of SharpnessAware.step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """A step with a closure that computes the loss and calls backward (it may zero the
        gradients first): at w on every step (skipped where ``p.grad`` already holds the gradient
        at w), and at w+ε on the full SAM steps. Both gradients cover the closure's whole batch
        (``ascent_fraction`` is for ``train_step``). Returns the loss at w, or at w+ε when the
        gradient at w was given; leaves the gradients as it found them (none, or given)."""
        if closure is None:
            raise ValueError(
                f"LookSAM.step() needs a closure that re-evaluates the loss and calls backward(); {_DRIVER}"
            )
        closure = torch.enable_grad()(closure)
        given = self._has_gradient()
        loss = None if given else closure()
        due = self.sam_step_due()
        if due and self.perturbs_this_step():
            SharpnessAware.first_step(self, zero_grad=True)  # perturb() keeps g, this step's ascent gradient
            loss_perturbed = closure()
            self.ascent_rows_descended()  # g_s, on the same rows as g
            with torch.no_grad():
                self.restore()
            loss = loss_perturbed if loss is None else loss
        self.adjust_descent_gradient(sam_step=due)
        self.base_step(sam_step=due)
        if not given:
            self.zero_grad(set_to_none=True)
        return loss

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


_DRIVER = "or use opt.train_step(batch, forward, loss)"
_CLOSURE_ONLY = (
    "LookSAM's cheap steps take one pass at w, which first_step()/second_step() cannot express: "
    f"use opt.step(closure), {_DRIVER}"
)


def _mean_over_replicas(tensors: list[Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())
