"""The step driver: every forward/backward pass of one optimizer step, in one place.

For a SAM-family optimizer, one step over the (micro-)batch is, for each m-sharpness group:

    1. ascent    forward+backward on the group's first ⌈ascent_fraction·rows⌉ rows at w,
                 under no_sync (per-replica ε); with ``sync_ascent`` its last backward syncs
                 (DDP all-reduce, FSDP reduce-scatter: the global mean ascent gradient)
    2. clean     (functional descent only) r = ∂L/∂outputs at w for the group's other rows,
                 a forward without a parameter backward
    3. perturb   w ← w + ε
    4. descent   forward+backward on all the group's rows at w+ε, accumulated across micro-
                 batches and groups; only the step's very last backward syncs gradients
    5. restore   w ← saved copy (bitwise)

then one base-optimizer step on the accumulated descent gradient (unscaled, clipped, and
skipped if non-finite). Micro-batch losses are weighted by their share of rows. The optimizer's
descent rule (descents.py) runs each descent piece's backward.

Norm layers' running statistics move in one of these passes only, by the optimizer's
``running_stats`` policy (running_stats.py); the other passes leave them bitwise unchanged.
``split=True`` measures the logit/functional split (split.py) after the passes, at w with each
group's ε, leaving the step itself unchanged. Steps off the optimizer's schedule (``sam_every``,
``sam_start``: schedule.py) are plain: one forward+backward per micro-batch, as ``plain_step``.

This module sees the optimizer through its public API only and imports no optimizer class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import torch
from torch import Tensor, nn

from .batching import GroupPlan, Piece, as_micro_batches, batch_rows, plan_step, slice_rows, split_at_ascent_rows
from .descents import DescentRule, at_least_fp32, loss_and_cotangent, outputs_tensor, vjp_root
from .perturbations import local_tensor, squared_norm
from .running_stats import frozen_running_stats, norm_layers
from .split import measure_split
from .step_stats import StepStats
from .types import Batch, ForwardFn, GradNormFn, LossFn, ParamGroup

if TYPE_CHECKING:
    from torch.amp import GradScaler


class SamOptimizer(Protocol):
    """A SAM-family optimizer as the driver sees it: the public API of ``samlm.optim.SharpnessAware``."""

    base_optimizer: torch.optim.Optimizer
    descent_rule: DescentRule
    ascent_fraction: float
    m: int
    sync_ascent: bool
    observes_ascent_rows_descent: bool
    running_stats: str
    grad_norm_fn: GradNormFn | None

    @property
    def param_groups(self) -> list[ParamGroup]: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def sam_step_due(self) -> bool: ...

    def perturbs_this_step(self) -> bool: ...

    def perturb(self) -> tuple[Tensor, Tensor, Tensor]: ...

    @property
    def needs_ascent_gradient(self) -> bool: ...

    def params_with_grad(self) -> list[Tensor]: ...

    def perturbed_params(self) -> list[Tensor]: ...

    def adjust_descent_gradient(self, sam_step: bool) -> None: ...

    def ascent_rows_descended(self) -> None: ...

    def epsilon(self) -> Sequence[Tensor]: ...

    def restore(self) -> None: ...

    def record_step(
        self,
        *,
        skipped: bool = False,
        ascent_nonfinite: bool = False,
        zero_grad_norm: bool = False,
        sam_step: bool = True,
    ) -> None: ...


class _TensorOptions(TypedDict):
    dtype: torch.dtype
    device: torch.device


class _Passes:
    """Runs forward/backward on pieces of the step's micro-batches with the step's settings."""

    def __init__(
        self,
        micro_batches: list[Batch],
        forward: ForwardFn,
        loss: LossFn,
        model: nn.Module | None,
        scaler: GradScaler | None,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.micro_batches = micro_batches
        self.forward_fn = forward
        self.loss_fn = loss
        self.model = model
        self.scaler = scaler
        self.autocast: Callable[[], AbstractContextManager[object]] = (
            (lambda: torch.autocast(device_type=device.type, dtype=autocast_dtype))
            if autocast_dtype is not None
            else contextlib.nullcontext
        )

    @property
    def reduces_gradients(self) -> bool:
        """The model reduces gradients across replicas itself (DDP, FSDP1: ``no_sync``; FSDP2:
        ``set_requires_gradient_sync``)."""
        return self.model is not None and (
            hasattr(self.model, "no_sync") or hasattr(self.model, "set_requires_gradient_sync")
        )

    def no_sync(self, skip_sync: bool = True) -> AbstractContextManager[object]:
        if skip_sync and self.model is not None:
            if hasattr(self.model, "no_sync"):
                # DDP's or FSDP1's method, which nn.Module's __getattr__ types as a Tensor | Module attribute
                return self.model.no_sync()  # type: ignore[operator, no-any-return]
            if hasattr(self.model, "set_requires_gradient_sync"):
                return _fsdp2_no_sync(self.model)
        return contextlib.nullcontext()

    def rows(self, piece: Piece) -> Batch:
        return slice_rows(self.micro_batches[piece.micro], piece.start, piece.stop)

    def outputs(self, batch: Batch) -> Tensor:
        with self.autocast():
            return self.forward_fn(batch)

    def forward(self, piece: Piece) -> tuple[Tensor, Batch]:
        batch = self.rows(piece)
        return self.outputs(batch), batch

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        with self.autocast():
            value = self.loss_fn(outputs, batch)
        if not (isinstance(value, Tensor) and value.dim() == 0):
            raise ValueError("loss(outputs, batch) must return a scalar tensor (the batch's mean loss)")
        return value

    def backward(self, loss: Tensor) -> None:
        # Tensor.backward is unannotated in torch
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _fsdp2_no_sync(model: Any) -> Iterator[None]:
    """FSDP2 (``fully_shard``) has no ``no_sync()``: accumulate unsharded gradients locally."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _sharding(model: nn.Module | None) -> str | None:
    """ "fsdp1" (``FullyShardedDataParallel``), "fsdp2" (``fully_shard``) or None."""
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    return "fsdp2" if isinstance(model, FSDPModule) else None


def _check_sharded(opt: SamOptimizer, sharding: str | None, plans: list[GroupPlan], split: bool) -> None:
    if sharding is None:
        return
    if not opt.sync_ascent:
        raise ValueError(
            "FSDP shards the gradient, so a replica cannot form its own ε: use sync_ascent=True and "
            "grad_norm_fn=samlm.integrations.distributed.sharded_grad_norm_fn() (samlm.integrations.distributed.sam_kwargs_for('fsdp'))"
        )
    if split:
        raise ValueError("split=True is not supported with FSDP (it differentiates through the model twice)")
    clean_rows = any(plan.ascent_rows < sum(p.rows for p in plan.descent) for plan in plans)
    if sharding == "fsdp1" and opt.descent_rule.needs_clean_cotangent and clean_rows:
        raise ValueError(
            "Functional-SAM with ascent_fraction < 1 needs a forward without backward at w, which "
            "FullyShardedDataParallel (FSDP1) leaves with stale gathered weights: use FSDP2 "
            "(torch.distributed.fsdp.fully_shard, samlm.integrations.distributed.prepare(strategy='fsdp')) or ascent_fraction=1.0"
        )


def _reshard_fsdp2(model: nn.Module) -> None:
    """FSDP2 keeps the root's gathered weights after a forward, for the backward that usually
    follows; after a forward without backward they would be stale once w moves: free them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _stats_module(model: nn.Module | None, forward: ForwardFn) -> torch.nn.Module | None:
    """The module whose norm layers' running statistics the step manages: ``model``, else
    ``forward`` itself when it is a module (or a module's bound method)."""
    if model is not None:
        return model
    for candidate in (forward, getattr(forward, "__self__", None)):
        if isinstance(candidate, torch.nn.Module):
            return candidate
    return None


def _descent_params(optimizer: torch.optim.Optimizer | SamOptimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _unscale_and_check(
    optimizer: torch.optim.Optimizer,
    scaler: GradScaler | None,
    max_grad_norm: float | None,
    norm_fn: GradNormFn | None = None,
    adjust: Callable[[], None] | None = None,
) -> Tensor:
    """Unscale (GradScaler), clip if asked, and return ‖d‖ (non-finite if any entry is).
    ``adjust`` (the optimizer's ``adjust_descent_gradient``) sees d unscaled, before the clip.

    ``norm_fn`` (a SAM wrapper's ``grad_norm_fn``) reduces the local squared norm to the
    global one, e.g. summed over FSDP shards, so clipping uses the global norm."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if adjust is not None:
        adjust()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if norm_fn is None:
        if not params:
            return torch.zeros(())
        if max_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    # norm_fn may be a collective: every process calls it, even one whose shards are empty
    grads = cast(list[Tensor], [local_tensor(p.grad) for p in params])  # FSDP2: this process's shards
    squares = [squared_norm(g).to(torch.float64 if g.dtype == torch.float64 else torch.float32) for g in grads]
    local = torch.stack(squares).sum() if squares else torch.zeros((), device=_device_of(optimizer))
    total = norm_fn(local).sqrt()
    if max_grad_norm is not None:
        coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def _validate_step_args(batch: Batch, forward: ForwardFn, loss: LossFn) -> tuple[list[Batch], list[int]]:
    if not callable(forward) or not callable(loss):
        raise ValueError("train_step(batch, forward, loss): forward and loss must be callables")
    micro_batches = as_micro_batches(batch)
    return micro_batches, [batch_rows(b) for b in micro_batches]


def _device_of(optimizer: torch.optim.Optimizer | SamOptimizer) -> torch.device:
    param: Tensor = next(p for g in optimizer.param_groups for p in g["params"])
    return param.device


def plain_step(
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    forward: ForwardFn,
    loss: LossFn,
    *,
    model: nn.Module | None = None,
    scaler: GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    split: bool = False,
) -> StepStats:
    """One step of a plain optimizer with the same conventions as the SAM driver."""
    if split:
        raise ValueError("split=True needs a SAM-family optimizer (it splits SAM's extra gradient)")
    return _one_pass_step(optimizer, batch, forward, loss, model, scaler, autocast_dtype, max_grad_norm)


def _one_pass_step(
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    forward: ForwardFn,
    loss: LossFn,
    model: nn.Module | None,
    scaler: GradScaler | None,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None,
    norm_fn: GradNormFn | None = None,
    adjust: Callable[[], None] | None = None,
) -> StepStats:
    """One forward+backward per micro-batch on all rows (no_sync but for the last), then the step."""
    micro_batches, sizes = _validate_step_args(batch, forward, loss)
    total = sum(sizes)
    passes = _Passes(micro_batches, forward, loss, model, scaler, autocast_dtype, _device_of(optimizer))
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(())
    for k, size in enumerate(sizes):
        with passes.no_sync(skip_sync=k < len(sizes) - 1):
            outputs, rows = passes.forward(Piece(k, 0, size))
            value = passes.loss(outputs, rows)
            del outputs  # not held through the backward: the graph keeps what it needs
            passes.backward(value * (size / total))
        loss_sum = loss_sum.to(value.device) + at_least_fp32(value) * (size / total)
    update_norm = _unscale_and_check(optimizer, scaler, max_grad_norm, norm_fn, adjust)
    skipped = _finish_step(optimizer, scaler, update_norm)
    loss_value, norm_value = torch.stack([loss_sum, update_norm.to(loss_sum)]).tolist()
    return StepStats(
        ascent_loss=loss_value,
        loss_perturbed=loss_value,
        grad_norm=norm_value,
        eps_norm=0.0,
        update_grad_norm=norm_value,
        skipped=skipped,
        ascent_nonfinite=False,
        sam_step=False,
    )


def _finish_step(optimizer: torch.optim.Optimizer, scaler: GradScaler | None, update_norm: Tensor) -> bool:
    """Take ``optimizer``'s step unless the descent gradient is non-finite. Returns skipped."""
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # GradScaler backs off exactly when it skipped
    else:
        skipped = not bool(torch.isfinite(update_norm))
        if not skipped:
            optimizer.step()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    return skipped


def sharpness_aware_step(
    opt: SamOptimizer,
    batch: Batch,
    forward: ForwardFn,
    loss: LossFn,
    *,
    model: nn.Module | None = None,
    scaler: GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    split: bool = False,
) -> StepStats:
    """One step of ``opt`` (a SharpnessAware) over ``batch`` (a list = accumulated micro-batches).

    Args:
        model: the (possibly DDP/FSDP-wrapped) module; its ``no_sync()`` (FSDP2:
            ``set_requires_gradient_sync``) keeps the ascent pass (unless ``sync_ascent``) and
            all but the last descent backward local to the replica. FSDP needs
            ``sync_ascent=True`` and a shard-summing ``grad_norm_fn`` (samlm.integrations.distributed).
            Its norm layers' running statistics follow ``opt.running_stats`` (without ``model``:
            those of ``forward`` when it is a module).
        scaler: a ``torch.amp.GradScaler`` for fp16: the ascent gradient is unscaled before
            ε is computed; a non-finite ascent gradient skips the step as GradScaler would.
        autocast_dtype: run forward and loss under ``torch.autocast`` with this dtype.
        max_grad_norm: clip the descent gradient before the base step.
        split: also measure SAM's extra gradient split into its logit path ‖g_SAM − g_F‖ and
            functional path ‖g_F − g‖ over the step's rows with its ε (split.py: a forward and
            backward at w and a forward and two VJPs at w+ε, after the step's passes; running
            statistics and the RNG are left as they were, so the step is unchanged).

    On the plain steps of ``opt``'s schedule (``sam_every``, ``sam_start``) the base optimizer
    steps after one forward+backward per micro-batch, as ``plain_step`` (``split`` is not measured).
    """
    due = opt.sam_step_due()
    if not (due and opt.perturbs_this_step()):
        # a plain step, or a SAM-family step without a perturbation (LookSAM's reuse of g_v)
        stats = _one_pass_step(
            opt.base_optimizer,
            batch,
            forward,
            loss,
            model,
            scaler,
            autocast_dtype,
            max_grad_norm,
            opt.grad_norm_fn,
            lambda: opt.adjust_descent_gradient(sam_step=due),
        )
        opt.record_step(skipped=stats.skipped, sam_step=due)
        stats.sam_step = due
        return stats
    micro_batches, sizes = _validate_step_args(batch, forward, loss)
    plans = plan_step(sizes, opt.ascent_fraction, opt.m)
    total = sum(sizes)
    device = _device_of(opt)
    passes = _Passes(micro_batches, forward, loss, model, scaler, autocast_dtype, device)
    descent_rule = opt.descent_rule
    params = _descent_params(opt)
    sharding = _sharding(model)
    _check_sharded(opt, sharding, plans, split)
    sharded = sharding is not None
    # The ascent gradient is averaged over replicas (sync_ascent) by the model's own reduction
    # on its last backward (DDP all-reduce, FSDP reduce-scatter); without a DDP/FSDP model, by
    # an explicit all-reduce.
    sync_ascent_in_model = opt.sync_ascent and passes.reduces_gradients
    stats_module = _stats_module(model, forward)
    stats_layers = norm_layers(stats_module) if stats_module is not None else []
    ascends = opt.needs_ascent_gradient  # False: ε from the base's state, no pass at w (momentum.py)

    def running_stats_move_in(phase: str) -> AbstractContextManager[None]:
        # without an ascent pass the descent is the step's one pass over every row: it moves them
        if opt.running_stats in ("all", phase) or not stats_layers or (phase == "descent" and not ascends):
            return contextlib.nullcontext()
        return frozen_running_stats(stats_layers)

    opt.zero_grad(set_to_none=True)
    f32: _TensorOptions = dict(dtype=torch.promote_types(params[0].dtype, torch.float32), device=device)
    loss_clean, loss_perturbed = torch.zeros((), **f32), torch.zeros((), **f32)
    grad_norms: list[Tensor] = []
    eps_norms: list[Tensor] = []
    oks: list[Tensor] = []
    # split=True: each group's ε (by id of its parameter), for the measurement after the passes
    epsilons: list[dict[int, Tensor]] | None = [] if split else None
    descent_so_far: list[Tensor | None] | None = None  # m > 1: earlier groups' descent gradients, set aside
    for index, plan in enumerate(plans):
        if index > 0:
            descent_so_far = [p.grad for p in params]
            for p in params:
                p.grad = None

        # 1-2. ascent gradient at w (and, when needed, the clean output cotangents r(w))
        cotangents = _Cotangents(plan, total) if descent_rule.needs_clean_cotangent else None
        if ascends:
            with running_stats_move_in("ascent"):
                ascent_loss = _ascent(passes, plan, cotangents, sync_at_end=sync_ascent_in_model)
            loss_clean += ascent_loss * (plan.ascent_rows / sum(pl.ascent_rows for pl in plans))
        if cotangents is not None:
            with running_stats_move_in("clean"):
                _clean_cotangents(passes, plan, cotangents)
            if sharding == "fsdp2":
                assert model is not None  # sharded: the model was given
                _reshard_fsdp2(model)
        if ascends and opt.sync_ascent and not sync_ascent_in_model:
            _all_reduce_mean([p.grad for p in params if p.grad is not None])
        if ascends and scaler is not None and _ascent_overflowed(opt, scaler, agree=passes.reduces_gradients):
            return _skip_for_overflow(opt, scaler, loss_clean)

        # 3. perturb
        grad_norm, eps_norm, ok = opt.perturb()
        grad_norms.append(grad_norm)
        eps_norms.append(eps_norm)
        oks.append(ok)
        if epsilons is not None:
            epsilons.append(dict(zip(map(id, opt.perturbed_params()), opt.epsilon())))
        for p, g in zip(params, descent_so_far or [None] * len(params)):
            p.grad = g  # the descent accumulates onto earlier groups' gradients

        # 4. descent at w+ε
        try:
            # FSDP keeps unsynced gradients in its own buffers, which the next group's synced
            # ascent would flush: there every group's descent ends with a reduction.
            synced = index == len(plans) - 1 or sharded
            # LookSAM: the ascent rows' descent first, its gradient seen before the other rows add theirs
            # (sharded: reduced first, since FSDP's p.grad holds only reduced gradients)
            first, rest = split_at_ascent_rows(plan) if opt.observes_ascent_rows_descent else (plan.descent, ())
            with running_stats_move_in("descent"):
                first_synced = synced and (sharded or not rest)
                loss_perturbed += _descent(passes, first, total, descent_rule, cotangents, first_synced)
                if opt.observes_ascent_rows_descent:
                    opt.ascent_rows_descended()
                if rest:
                    loss_perturbed += _descent(passes, rest, total, descent_rule, cotangents, synced)
        finally:
            # 5. restore w exactly, even if a pass raised
            opt.restore()

    split_norms = measure_split(passes, plans, total, epsilons, params, stats_layers) if epsilons is not None else []
    update_norm = _unscale_and_check(
        opt.base_optimizer, scaler, max_grad_norm, opt.grad_norm_fn, lambda: opt.adjust_descent_gradient(sam_step=True)
    )
    skipped = _finish_step(opt.base_optimizer, scaler, update_norm)
    grad_norm = torch.stack(grad_norms).square().mean().sqrt()
    eps_norm = torch.stack(eps_norms).square().mean().sqrt()
    nonfinite = ~torch.stack([torch.isfinite(n) for n in grad_norms]).all()
    zero_norm = torch.stack([n == 0 for n in grad_norms]).any()
    values = torch.stack(
        [
            v.to(device=device, dtype=f32["dtype"])
            for v in (
                loss_clean,
                loss_perturbed,
                grad_norm,
                eps_norm,
                update_norm.to(device),
                nonfinite,
                zero_norm,
                *split_norms,
            )
        ]
    ).tolist()  # the step's one host sync
    ascent_nonfinite = bool(values[5])
    opt.record_step(
        skipped=skipped, ascent_nonfinite=ascent_nonfinite, zero_grad_norm=bool(values[6]) and not ascent_nonfinite
    )
    return StepStats(
        ascent_loss=values[0] if ascends else None,
        loss_perturbed=values[1],
        grad_norm=values[2],
        eps_norm=values[3],
        update_grad_norm=values[4],
        skipped=skipped,
        ascent_nonfinite=ascent_nonfinite,
        **dict(zip(("logit_path_norm", "functional_path_norm"), values[7:])),
    )


class _Cotangents:
    """One group's clean output cotangents r(w), kept as its descent will use them: one buffer
    per descent piece, each part written in place as ∂(part's mean loss)/∂outputs scaled to the
    part's share of the step's loss. The descent reads a piece's buffer once, without a copy or
    concatenation, and frees it."""

    def __init__(self, plan: GroupPlan, total: int):
        self.total = total
        self.pieces = {piece.micro: piece for piece in plan.descent}  # ≤ 1 piece per micro-batch
        self.buffers: dict[int, Tensor] = {}

    def put(self, part: Piece, r: Tensor) -> None:
        piece = self.pieces[part.micro]
        scale = part.rows / piece.rows * (piece.rows / self.total)
        r = at_least_fp32(r)
        if part.rows == piece.rows:
            self.buffers[part.micro] = _scaled(r, scale)
            return
        if part.micro not in self.buffers:
            self.buffers[part.micro] = r.new_empty((piece.rows, *r.shape[1:]))
        torch.mul(r, scale, out=self.buffers[part.micro][part.start - piece.start : part.stop - piece.start])

    def take(self, piece: Piece) -> Tensor:
        return self.buffers.pop(piece.micro)


def _ascent(passes: _Passes, plan: GroupPlan, cotangents: _Cotangents | None, sync_at_end: bool = False) -> Tensor:
    """Ascent gradient of the mean loss over the group's ascent rows, into p.grad. Local to the
    replica (no_sync), unless ``sync_at_end``: then the last piece's backward reduces it.
    ``cotangents``: also keep r(w) on these rows (a descent rule that needs them)."""
    ascent_rows = plan.ascent_rows
    loss_sum = None
    last = len(plan.ascent) - 1
    for j, piece in enumerate(plan.ascent):
        weight = piece.rows / ascent_rows
        with passes.no_sync(skip_sync=not (sync_at_end and j == last)):
            outputs, rows = passes.forward(piece)
            if cotangents is not None:
                outputs = outputs_tensor(outputs, "Functional-SAM")
                value, r = loss_and_cotangent(passes, outputs, rows)
                cotangents.put(piece, r)  # ∂(piece mean loss)/∂outputs at w
                root = vjp_root(outputs, _scaled(r, weight))
                del outputs, r
                passes.backward(root)
            else:
                value = passes.loss(outputs, rows)
                del outputs
                passes.backward(value * weight)
        term = at_least_fp32(value) * weight
        loss_sum = term if loss_sum is None else loss_sum + term
    assert loss_sum is not None  # a group has ascent rows
    return loss_sum


def _clean_cotangents(passes: _Passes, plan: GroupPlan, cotangents: _Cotangents) -> None:
    """r(w) for the group's rows outside the ascent prefix: a forward at w, no parameter backward."""
    ascent_by_micro = {p.micro: p for p in plan.ascent}
    for piece in plan.descent:
        done = ascent_by_micro.get(piece.micro)
        start = done.stop if done is not None and done.start == piece.start else piece.start
        if start >= piece.stop:
            continue
        rest = Piece(piece.micro, start, piece.stop)
        with passes.no_sync(), torch.no_grad():
            outputs, rows = passes.forward(rest)
        leaf = outputs_tensor(outputs, "Functional-SAM").detach().requires_grad_()
        with torch.enable_grad():
            (r,) = torch.autograd.grad(passes.loss(leaf, rows), leaf)
        cotangents.put(rest, r)


def _scaled(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1 else t * factor


def _descent(
    passes: _Passes,
    pieces: Sequence[Piece],
    total: int,
    descent_rule: DescentRule,
    cotangents: _Cotangents | None,
    sync_at_end: bool,
) -> Tensor:
    """Descent gradient at w+ε, weighted by each piece's share of the step's rows, into p.grad."""
    loss_sum = None
    last = len(pieces) - 1
    for j, piece in enumerate(pieces):
        weight = piece.rows / total
        with passes.no_sync(skip_sync=not (sync_at_end and j == last)):
            value = descent_rule.backward(passes, piece, weight, cotangents)
        term = at_least_fp32(value) * weight
        loss_sum = term if loss_sum is None else loss_sum + term
    assert loss_sum is not None  # a group has rows
    return loss_sum


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())


def _ascent_overflowed(opt: SamOptimizer, scaler: GradScaler, agree: bool = False) -> bool:
    """fp16: unscale the ascent gradient in place; True if it is non-finite (one host sync).

    ``agree``: replicas of a DDP/FSDP model decide together (an all-reduce MAX of the flag),
    so that all skip or none does; one replica skipping alone would leave the others waiting
    in the descent's gradient all-reduce."""
    inv_scale = 1.0 / scaler.get_scale()
    grads = cast(list[Tensor], [local_tensor(p.grad) for p in opt.params_with_grad()])
    torch._foreach_mul_(grads, inv_scale)
    norm = torch.nn.utils.get_total_norm(grads)
    found = (~torch.isfinite(norm)).to(torch.float32)
    if agree:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            found = found.clone()
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found)


def _skip_for_overflow(opt: SamOptimizer, scaler: GradScaler, loss_clean: Tensor) -> StepStats:
    """The ascent gradient overflowed: skip the perturbation and the step, and let GradScaler
    back off its scale exactly as it does for a non-finite gradient."""
    # A replica whose own ascent gradient was finite skips with the others: mark its gradient
    # non-finite so that its GradScaler skips and backs off identically.
    local_tensor(cast(Tensor, opt.params_with_grad()[0].grad)).fill_(float("inf"))
    scaler.unscale_(opt.base_optimizer)  # records the inf for this optimizer
    scaler.step(opt.base_optimizer)  # skipped: inf found
    scaler.update()  # backs the scale off
    opt.zero_grad(set_to_none=True)
    opt.record_step(skipped=True, ascent_nonfinite=True)
    nan = float("nan")
    return StepStats(
        ascent_loss=float(loss_clean),
        loss_perturbed=nan,
        grad_norm=nan,
        eps_norm=0.0,
        update_grad_norm=nan,
        skipped=True,
        ascent_nonfinite=True,
    )
