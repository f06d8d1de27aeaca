"""Multi-process training: process group, model wrapping, SAM settings, mixed precision.

One process per device, launched by ``torchrun`` or ``accelerate launch`` (both set
``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; accelerate also sets
``ACCELERATE_MIXED_PRECISION`` and, for FSDP, ``ACCELERATE_USE_FSDP``). A plain
``python -m samlm ...`` is a world of one and nothing here does anything.

A training loop integrates this in a few lines::

    from samlm.integrations import distributed

    run = distributed.prepare(model)                 # process group + device + DDP/FSDP wrap
    optimizer = build_optimizer(..., run.module.parameters(), **run.sam_kwargs)  # see below
    autocast_dtype, scaler = distributed.amp_settings(run.mixed_precision, run.device)
    train(run.model, optimizer, batches_for_this_rank, ...,    # the loop passes model=run.model
          step_kwargs={"autocast_dtype": autocast_dtype}, scaler=scaler)
    if distributed.is_main_process(): save(run.module.state_dict())
    distributed.cleanup()

SAM under data parallelism (what ``samlm.optim``'s driver does given ``model=`` a DDP module):

- The ascent pass (its forward *and* backward) runs under ``no_sync``: each replica perturbs
  with its own ε, i.e. m-sharpness with m = number of replicas (Foret et al.; the default).
  ``sync_ascent=True`` averages the ascent gradient over replicas first: exact global SAM.
- The descent gradients of all micro-batches accumulate locally; only the step's last backward
  all-reduces (once per step).
- FSDP shards the gradient itself, so a replica cannot form its own ε: FSDP needs
  ``sync_ascent=True`` and a gradient norm summed over shards (``sharded_grad_norm_fn``);
  ``prepare(..., strategy="fsdp")`` returns those in ``run.sam_kwargs``. Weights are restored
  with ``copy_`` (never ``.data`` swaps), which keeps FSDP's flat-parameter views intact.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("auto", "ddp", "fsdp", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world, its device, how it was launched."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "nccl" | "gloo" | None (not distributed)
    launcher: str = "none"  # "torchrun" | "accelerate" | "none"
    mixed_precision: str = "no"  # from accelerate's config/flags, else "no"
    use_fsdp: bool = False  # accelerate launch --use_fsdp

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env(env: Mapping[str, str] | None = None) -> dict:
    """Read the launcher's environment variables (torchrun / accelerate launch)."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0)
    local_rank = int(env.get("LOCAL_RANK", str(rank)) or 0)
    if any(key.startswith("ACCELERATE_") for key in env):
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env or world_size > 1:
        launcher = "torchrun"
    else:
        launcher = "none"
    mixed = str(env.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if mixed not in MIXED_PRECISION:
        raise ValueError(f"ACCELERATE_MIXED_PRECISION={mixed!r} is not supported; use one of {MIXED_PRECISION}")
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "false")).lower() == "true":
        raise ValueError(
            "DeepSpeed is not supported: its engine owns backward and the optimizer step, so the two "
            "passes of a SAM step cannot run inside it; launch with DDP or FSDP instead"
        )
    return {
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world_size,
        "launcher": launcher,
        "mixed_precision": mixed,
        "use_fsdp": str(env.get("ACCELERATE_USE_FSDP", "false")).lower() == "true",
    }


def setup_distributed(
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Detect the launcher, pick this process's device and initialise the process group.

    Idempotent: an already initialised process group is kept. With a world of one nothing is
    initialised. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` otherwise; ``device``
    defaults to ``cuda:<local_rank>`` when CUDA is available, else the CPU.
    """
    info = launch_env(env)
    if device is None:
        device = torch.device("cuda", info["local_rank"]) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info["local_rank"])
        torch.cuda.set_device(device)
    chosen: str | None = None
    if dist.is_available() and dist.is_initialized():
        chosen = str(dist.get_backend())
        info["rank"], info["world_size"] = dist.get_rank(), dist.get_world_size()
    elif info["world_size"] > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if chosen == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=chosen, init_method="env://", rank=info["rank"], world_size=info["world_size"], **kwargs
        )
    return DistInfo(device=device, backend=chosen, **info)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0") or 0)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, and in any single-process run (write files, print, save only here)."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is initialised (call once at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float | Tensor, device: torch.device | None = None) -> float:
    """The mean of a scalar over all processes (e.g. a metric); the value itself when single."""
    if not is_distributed():
        return float(value)
    t = torch.as_tensor(
        value, dtype=torch.float64 if device is None or device.type == "cpu" else torch.float32, device=device
    ).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()


# -- gradient norms over shards ---------------------------------------------------------------
def sharded_grad_norm_fn(process_group=None) -> Callable[[Tensor], Tensor]:
    """A ``grad_norm_fn`` for ``SharpnessAware``: local squared norm → global squared norm.

    Each process holds a disjoint shard of the gradient (FSDP), so the global squared norm is
    the SUM of the local ones (an all-reduce over ``process_group``). A DTensor (FSDP2) carries
    its own placement: it is reduced by DTensor to a full tensor instead. Without an
    initialised process group it is the identity.
    """

    def reduce(squared: Tensor) -> Tensor:
        full_tensor = getattr(squared, "full_tensor", None)
        if callable(full_tensor):  # a DTensor: the pending (partial) reduction happens here
            return full_tensor()
        if not (dist.is_available() and dist.is_initialized()):
            return squared
        squared = squared.clone()
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=process_group)
        return squared

    return reduce


# -- model wrapping -----------------------------------------------------------------------------
@dataclass
class Prepared:
    """What ``prepare`` returns.

    model: the module to run forward on and to pass to ``train_step(model=...)`` (DDP/FSDP-
        wrapped when distributed, else the model itself).
    module: the underlying model (state_dict without a ``module.`` prefix, save_pretrained).
    sam_kwargs: keyword arguments for a SAM-family optimizer under this strategy
        (``{}`` for DDP/single; ``sync_ascent`` and ``grad_norm_fn`` for FSDP).
    """

    model: nn.Module
    module: nn.Module
    info: DistInfo
    strategy: str
    sam_kwargs: dict

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def mixed_precision(self) -> str:
        return self.info.mixed_precision

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP1 wrappers (FSDP2 shards in place and returns the model)."""
    while isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def sam_kwargs_for(strategy: str, process_group=None) -> dict:
    """SAM-family keyword arguments a strategy needs (FSDP: global ε, norms summed over shards)."""
    if strategy == "fsdp":
        return {"sync_ascent": True, "grad_norm_fn": sharded_grad_norm_fn(process_group)}
    return {}


def prepare(
    model: nn.Module,
    *,
    strategy: str = "auto",
    info: DistInfo | None = None,
    find_unused_parameters: bool = False,
    **wrapper_kwargs,
) -> Prepared:
    """Set up the process group (``setup_distributed``), move ``model`` to this process's device
    and wrap it for data parallelism.

    strategy: ``"auto"`` (FSDP if ``accelerate launch --use_fsdp``, else DDP when the world has
        more than one process, else no wrapper), ``"ddp"``, ``"fsdp"`` (FSDP2 ``fully_shard`` on
        each block named in the model's ``_no_split_modules`` and on the root), or ``"none"``.
    wrapper_kwargs: passed to ``DistributedDataParallel`` or ``fully_shard``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    info = info or setup_distributed()
    if strategy == "auto":
        strategy = ("fsdp" if info.use_fsdp else "ddp") if info.is_distributed else "none"
    model = model.to(info.device)
    wrapped: nn.Module
    if strategy == "ddp" and info.is_distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **wrapper_kwargs
        )
    elif strategy == "fsdp" and info.is_distributed:
        wrapped = shard_model(model, **wrapper_kwargs)
    else:
        wrapped = model
    return Prepared(
        model=wrapped, module=unwrap_model(wrapped), info=info, strategy=strategy, sam_kwargs=sam_kwargs_for(strategy)
    )


def shard_model(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` every block named in ``model._no_split_modules`` (Hugging Face
    models list their transformer layer classes there), then the root."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


# -- data: each process takes its rows of the global batch -----------------------------------
class RankShard:
    """Every process reads the same global micro-batches and keeps rows
    ``[rank·b/N, (rank+1)·b/N)`` of each: the world trains on exactly the batches a single
    process would, and the data position (``state_dict``) is the same on every rank, so one
    checkpoint resumes all of them. Reading the whole batch costs nothing next to the model."""

    def __init__(self, batches, rank: int, world_size: int):
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> RankShard:
        return self

    def __next__(self):
        from samlm.optim.batching import batch_rows, slice_rows

        batch = next(self.batches)
        rows = batch_rows(batch)
        check_batch_split(rows, self.world_size, "a micro-batch of")
        share = rows // self.world_size
        return slice_rows(batch, self.rank * share, (self.rank + 1) * share)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state) -> None:
        self.batches.load_state_dict(state)


def check_batch_split(rows: int, world_size: int, what: str = "--batch") -> None:
    """Each of ``world_size`` processes takes rows/world_size rows (``UserError`` otherwise)."""
    if rows % world_size:
        from samlm.errors import UserError

        raise UserError(
            f"{what} {rows} cannot be split evenly over {world_size} processes: use a multiple of {world_size}"
        )


def shard_batches(batches, rank: int | None = None, world_size: int | None = None):
    """``batches`` itself in a world of one, else a :class:`RankShard` of it."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return batches if world_size == 1 else RankShard(batches, rank, world_size)


def agree(values: Tensor, op: str = "sum") -> Tensor:
    """All-reduce a small tensor (``sum`` or ``max``) so every process takes the same decision;
    the tensor itself in a world of one. It travels on the backend's device (NCCL: CUDA)."""
    if not is_distributed():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    reduced = values.to(device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return reduced.to(values.device)


def agree_across_processes(stats: dict, tokens: int) -> tuple[dict, int]:
    """A step's statistics and token count agreed by one small all-reduce, so every process takes the
    same decisions: the mean of each number (NaN anywhere stays NaN), any flag set, the total tokens."""
    if not is_distributed():
        return stats, tokens
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
    values = torch.tensor([float(stats[k]) for k in keys] + [float(tokens)], dtype=torch.float64)
    total = agree(values).tolist()
    world = get_world_size()
    agreed = dict(stats)
    for key, value in zip(keys, total):
        agreed[key] = value > 0 if isinstance(stats[key], bool) else value / world
    return agreed, int(total[-1])


def agree_on_stop(received: str | None) -> str | None:
    """The signal that stops the run, if any process received one (all stop at the same step)."""
    if not is_distributed():
        return received
    anyone = agree(torch.tensor([0.0 if received is None else 1.0]), op="max")
    return (received or "a signal to another process") if float(anyone) > 0 else None


# -- checkpoints: full (unsharded) state on the main process -------------------------------------
def is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state_to_save(module: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict (FSDP2: gathered from the shards onto the CPU of rank 0, an
    empty dict elsewhere; a collective, so every process calls it)."""
    if not is_fsdp2(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return cast(dict[str, Tensor], get_model_state_dict(module, options=_full_state_options(cpu_offload=True)))


def load_model_state(module: nn.Module, state: Mapping[str, Tensor]):
    """Load a full state dict (as saved by :func:`model_state_to_save`); FSDP2 re-shards it.
    Returns ``(missing_keys, unexpected_keys)``."""
    if not is_fsdp2(module):
        result = module.load_state_dict(state, strict=False)
        return result.missing_keys, result.unexpected_keys
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if not (missing or unexpected):
        set_model_state_dict(module, dict(state), options=_full_state_options())
    return missing, unexpected


def optimizer_state_to_save(module: nn.Module, optimizer) -> dict:
    """The optimizer's state dict; under FSDP2 with the base optimizer's sharded state gathered
    to full tensors keyed by parameter name (``"sharded": True`` marks that format)."""
    if not is_fsdp2(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    base = getattr(optimizer, "base_optimizer", optimizer)
    full = get_optimizer_state_dict(module, base, options=_full_state_options(cpu_offload=True))
    state = {"sharded": True, "base_optimizer": full}
    if base is not optimizer:
        state.update(counters=dict(optimizer.counters), config=optimizer.config())
    return state


def load_optimizer_state(module: nn.Module, optimizer, state: Mapping) -> None:
    """Inverse of :func:`optimizer_state_to_save` (raises ``ValueError`` on a format mismatch)."""
    sharded = bool(state.get("sharded"))
    if sharded != is_fsdp2(module):
        saved = "with FSDP" if sharded else "without FSDP"
        now = "with" if is_fsdp2(module) else "without"
        raise ValueError(
            f"the checkpoint's optimizer state was saved {saved}; this run is {now} FSDP: "
            "resume with the strategy it was saved with"
        )
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    base = getattr(optimizer, "base_optimizer", optimizer)
    set_optimizer_state_dict(module, base, optim_state_dict=state["base_optimizer"], options=_full_state_options())
    if base is not optimizer:
        optimizer.counters.update(state.get("counters", {}))


def all_finite(tensors) -> bool:
    """Every process's tensors (its shards under FSDP) are finite: agreed across processes."""
    from samlm.optim.sam import local_tensor

    local = all(bool(torch.isfinite(local_tensor(t)).all()) for t in tensors if t.is_floating_point())
    return bool(agree(torch.tensor([0.0 if local else 1.0]), op="max") == 0)


# -- mixed precision ----------------------------------------------------------------------------
def amp_settings(mixed_precision: str, device: torch.device | str):
    """``(autocast_dtype, scaler)`` for ``train_step``: bf16 → (bfloat16, None); fp16 →
    (float16, GradScaler) (the scaler unscales the ascent gradient before ε and skips a step
    whose ascent or descent gradient overflowed); no → (None, None)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    device = torch.device(device)
    if mixed_precision == "bf16":
        return torch.bfloat16, None
    if mixed_precision == "fp16":
        return torch.float16, torch.amp.GradScaler(device.type)
    return None, None
