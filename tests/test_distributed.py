"""SAM under torch.distributed: DDP, FSDP1, FSDP2 on CPU with gloo, 2 processes.

One module-scoped launch runs every distributed case in two worker processes (this file run
as a script, with the environment variables torchrun sets), each writing its results; the
tests compare them with single-process references computed here in float64.

- sync_ascent=True: ε from the ascent gradient averaged over replicas = single-process SAM on
  the global batch. Each replica's ascent uses the first ascent_fraction of *its* rows, so the
  reference batch is ordered [rank-0 ascent rows, rank-1 ascent rows, the rest]: its first
  ascent_fraction·16 rows are exactly the replicas' ascent rows (descent: all rows; order does
  not change a mean).
- per-replica (default): each replica its own ε = m-sharpness with m = 2 on [rank-0 rows,
  rank-1 rows] (group g = rank g's rows, ascent = the first ascent_fraction of the group).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import samlm
from gloo_ranks import run_ranks
from samlm.integrations import distributed

pytestmark = pytest.mark.usefixtures("float64_default")  # the references are float64

ROWS = 8  # rows per replica per step
STEPS = 2
ASCENT_FRACTION = 0.5
SPLITS = [3, 5]  # micro-batches per replica: the ascent rows (4) span both


# -- the problem, shared by workers and references ----------------------------------------------
def make_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def global_batches(seed=1):
    """STEPS batches of 2·ROWS rows; rank r gets rows [r·ROWS, (r+1)·ROWS)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(2 * ROWS, 6, generator=g, dtype=torch.get_default_dtype()),
            torch.randint(0, 5, (2 * ROWS,), generator=g),
        )
        for _ in range(STEPS)
    ]


def rank_rows(batch, rank):
    return tuple(t[rank * ROWS : (rank + 1) * ROWS] for t in batch)


def split(batch, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(tuple(t[start : start + n] for t in batch))
        start += n
    return out


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def make_optimizer(method, params, **kwargs):
    base = (
        torch.optim.AdamW(params, lr=1e-2)
        if method in (samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM)
        else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    return method(base, ascent_fraction=ASCENT_FRACTION, **kwargs)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


# name: (method, wrapper, sync_ascent, micro-batch sizes or None)
CASES = {
    "sam-sync": (samlm.SAM, "ddp", True, None),
    "fsam-sync": (samlm.FunctionalSAM, "ddp", True, None),
    "sam-local": (samlm.SAM, "ddp", False, None),
    "fsam-local": (samlm.FunctionalSAM, "ddp", False, None),
    "sam-local-accum": (samlm.SAM, "ddp", False, SPLITS),
    "fsam-sync-accum": (samlm.FunctionalSAM, "ddp", True, SPLITS),
    "psam-local-accum": (samlm.PreconditionedSAM, "ddp", False, SPLITS),
    "sam-fsdp1-accum": (samlm.SAM, "fsdp1", True, SPLITS),
    "asam-fsdp1": (samlm.ASAM, "fsdp1", True, None),
    "fsam-fsdp2-accum": (samlm.FunctionalSAM, "fsdp2", True, SPLITS),
    "psam-fsdp2-accum": (samlm.PreconditionedSAM, "fsdp2", True, SPLITS),
    "msam-fsdp2-accum": (samlm.MomentumSAM, "fsdp2", True, SPLITS),
    "looksam-fsdp2-accum": (samlm.LookSAM, "fsdp2", True, SPLITS),
}


# -- worker side ----------------------------------------------------------------------------------
def _run_case(name, info, results):
    method, wrapper, sync, splits = CASES[name]
    model = make_model()
    record = {"forward_synced": [], "allreduces": 0}
    if wrapper == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        prepared = distributed.prepare(model, strategy="ddp", info=info)
        wrapped = prepared.model
        assert prepared.module is model and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)

        def counting_hook(state, bucket):
            record["allreduces"] += 1
            return allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, counting_hook)
        sam_kwargs = {"sync_ascent": sync}
    elif wrapper == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        sam_kwargs = distributed.sam_kwargs_for("fsdp")
    else:
        prepared = distributed.prepare(model, strategy="fsdp", info=info)
        wrapped = prepared.model
        sam_kwargs = prepared.sam_kwargs
    opt = make_optimizer(method, wrapped.parameters(), **sam_kwargs)

    def forward(batch):
        if wrapper == "ddp":  # DDP decides at forward time whether the next backward syncs
            record["forward_synced"].append(bool(wrapped.require_backward_grad_sync))
        return wrapped(batch[0])

    stats = []
    for batch in global_batches():
        local = rank_rows(batch, info.rank)
        stats.append(
            opt.train_step(
                split(local, splits) if splits else local,
                forward,
                ce,
                model=wrapped,
                max_grad_norm=0.5 if wrapper != "ddp" else None,
            ).as_dict()
        )
    if wrapper == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            final = flat(model.parameters())
    elif wrapper == "fsdp2":
        final = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    else:
        final = flat(model.parameters())
    results[name] = {"params": final, "stats": stats, **record}


def _run_fp16_overflow_on_one_replica(info, results):
    """fp16 GradScaler under DDP: rank 0's ascent gradient overflows in step 1 only."""
    model = make_model().float()
    wrapped = distributed.prepare(model, strategy="ddp", info=info).model
    opt = samlm.SAM(torch.optim.SGD(wrapped.parameters(), lr=0.1), ascent_fraction=ASCENT_FRACTION)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = {"n": 0}

    def loss(outputs, batch):
        calls["n"] += 1
        value = ce(outputs, batch)
        if info.rank == 0 and calls["n"] == 1:  # step 1's first pass: rank 0's ascent
            value = value + outputs.sum() * float("inf")
        return value

    before = flat(model.parameters())
    out = {"scales": [], "skipped": [], "unchanged_after_skip": None}
    for i, batch in enumerate(global_batches()):
        local = tuple(t.float() if t.is_floating_point() else t for t in rank_rows(batch, info.rank))
        stats = opt.train_step(local, lambda b: wrapped(b[0]), loss, model=wrapped, scaler=scaler)
        out["scales"].append(scaler.get_scale())
        out["skipped"].append(stats.skipped)
        if i == 0:
            out["unchanged_after_skip"] = torch.equal(flat(model.parameters()), before)
    out["counters"] = dict(opt.counters)
    out["params"] = flat(model.parameters())
    results["fp16"] = out


def make_batchnorm_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh(), torch.nn.Linear(12, 5)
    )


def _run_batchnorm(info, results):
    """DDP broadcasts rank 0's buffers in place before forwards; the frozen passes must still
    leave each replica with the statistics of its own ascent rows at w."""
    model = make_batchnorm_model()
    wrapped = distributed.prepare(model, strategy="ddp", info=info).model
    opt = samlm.SAM(torch.optim.SGD(wrapped.parameters(), lr=0.1), ascent_fraction=ASCENT_FRACTION)
    opt.train_step(rank_rows(global_batches()[0], info.rank), lambda b: wrapped(b[0]), ce, model=wrapped)
    bn = model[1]
    results["batchnorm"] = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _run_sharded_norm(info, results):
    """Each rank holds half of a gradient: the reduced norm equals the unsharded norm."""
    full = [torch.arange(10.0) - 3, torch.linspace(-1, 2, 7)]
    shard = [t.chunk(2)[info.rank] for t in full]
    local_sq = sum(t.pow(2).sum() for t in shard)
    results["sharded_norm"] = {
        "global": float(distributed.sharded_grad_norm_fn()(local_sq).sqrt()),
        "expected": float(torch.sqrt(sum(t.pow(2).sum() for t in full))),
        "local": float(local_sq.sqrt()),
    }


def _run_fsdp_refusals(info, results):
    """What FSDP cannot do is refused with a ValueError before any pass runs."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    batch = rank_rows(global_batches()[0], info.rank)
    refusals = {}
    fsdp2 = distributed.prepare(make_model(), strategy="fsdp", info=info).model
    fsdp1 = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    for name, wrapped, method, kwargs, step_kwargs in [
        ("per-replica", fsdp2, samlm.SAM, {}, {}),  # sync_ascent left off
        ("split", fsdp2, samlm.SAM, distributed.sam_kwargs_for("fsdp"), {"split": True}),
        ("fsdp1-fsam", fsdp1, samlm.FunctionalSAM, distributed.sam_kwargs_for("fsdp"), {}),
    ]:
        opt = method(torch.optim.SGD(wrapped.parameters(), lr=0.1), ascent_fraction=0.5, **kwargs)
        try:
            opt.train_step(batch, lambda b, w=wrapped: w(b[0]), ce, model=wrapped, **step_kwargs)
        except ValueError as exc:
            refusals[name] = str(exc)
    results["fsdp_refusals"] = refusals


def _worker_main(out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    info = distributed.setup_distributed(timeout_s=60)
    results = {
        "info": {
            "rank": info.rank,
            "world_size": info.world_size,
            "backend": info.backend,
            "launcher": info.launcher,
            "is_main": distributed.is_main_process(),
            "device": str(info.device),
        }
    }
    for name in CASES:
        _run_case(name, info, results)
    _run_fp16_overflow_on_one_replica(info, results)
    _run_sharded_norm(info, results)
    _run_batchnorm(info, results)
    _run_fsdp_refusals(info, results)
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    distributed.barrier()
    distributed.cleanup()


# -- test side --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(__file__, tmp_path_factory.mktemp("dist"))


def reference_sync(method, clip=None):
    """Single-process SAM on the global batch, ordered so its ascent rows are the replicas'."""
    model = make_model()
    opt = make_optimizer(method, model.parameters())
    a = int(ROWS * ASCENT_FRACTION)
    for batch in global_batches():
        r0, r1 = rank_rows(batch, 0), rank_rows(batch, 1)
        ordered = tuple(torch.cat([x[:a], y[:a], x[a:], y[a:]]) for x, y in zip(r0, r1))
        opt.train_step(ordered, lambda b: model(b[0]), ce, max_grad_norm=clip)
    return flat(model.parameters())


def reference_m_sharpness(method):
    """Single process, m = 2 groups = the two replicas' rows."""
    model = make_model()
    opt = make_optimizer(method, model.parameters(), m=2)
    for batch in global_batches():
        opt.train_step(batch, lambda b: model(b[0]), ce)
    return flat(model.parameters())


def test_workers_detect_the_torchrun_environment(results):
    for rank, res in enumerate(results):
        assert res["info"] == {
            "rank": rank,
            "world_size": 2,
            "backend": "gloo",
            "launcher": "torchrun",
            "is_main": rank == 0,
            "device": "cpu",
        }


@pytest.mark.parametrize("name,method", [("sam-sync", samlm.SAM), ("fsam-sync", samlm.FunctionalSAM)])
def test_sync_ascent_equals_single_process_sam_on_the_global_batch(results, name, method):
    expected = reference_sync(method)
    for res in results:
        torch.testing.assert_close(res[name]["params"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name,method",
    [
        ("sam-local", samlm.SAM),
        ("fsam-local", samlm.FunctionalSAM),
        ("sam-local-accum", samlm.SAM),
        ("psam-local-accum", samlm.PreconditionedSAM),
    ],
)
def test_per_replica_ascent_equals_m_sharpness_with_m_replicas(results, name, method):
    expected = reference_m_sharpness(method)
    for res in results:
        torch.testing.assert_close(res[name]["params"], expected, rtol=0, atol=1e-12)
    # and it really differs from global SAM: the replicas did not share ε
    assert not torch.allclose(results[0][name]["params"], reference_sync(method), rtol=0, atol=1e-9)


def test_ddp_accumulation_equals_the_unaccumulated_step(results):
    for res in results:
        torch.testing.assert_close(res["sam-local-accum"]["params"], res["sam-local"]["params"], rtol=0, atol=1e-12)
    for res in results:
        torch.testing.assert_close(res["fsam-sync-accum"]["params"], res["fsam-sync"]["params"], rtol=0, atol=1e-12)
    stats_a, stats_b = results[0]["sam-local-accum"]["stats"], results[0]["sam-local"]["stats"]
    assert [s["loss_perturbed"] for s in stats_a] == pytest.approx([s["loss_perturbed"] for s in stats_b], rel=1e-12)


@pytest.mark.parametrize(
    "name,forwards,allreduces",
    [
        # per replica: ascent forward and backward under no_sync; only the step's last backward syncs
        ("sam-local", [False, True], 1),
        ("sam-local-accum", [False, False, False, True], 1),  # ascent 3+1 rows, descent 3, 5 rows
        # sync_ascent: the ascent's last backward syncs too (functional: + a clean forward, no_sync)
        ("fsam-sync", [True, False, True], 2),
        ("fsam-sync-accum", [False, True, False, False, True], 2),
    ],
)
def test_ddp_sync_pattern_per_step(results, name, forwards, allreduces):
    for res in results:
        assert res[name]["forward_synced"] == forwards * STEPS
        assert res[name]["allreduces"] == allreduces * STEPS  # one bucket: one all-reduce per synced backward


@pytest.mark.parametrize(
    "name,method",
    [
        ("sam-fsdp1-accum", samlm.SAM),
        ("asam-fsdp1", samlm.ASAM),
        ("fsam-fsdp2-accum", samlm.FunctionalSAM),
        ("psam-fsdp2-accum", samlm.PreconditionedSAM),
        ("msam-fsdp2-accum", samlm.MomentumSAM),
        ("looksam-fsdp2-accum", samlm.LookSAM),
    ],
)
def test_fsdp_with_sharded_norms_equals_global_sam(results, name, method):
    """FSDP1 (flat shards) and FSDP2 (DTensor): ε and the clip use norms summed over shards."""
    expected = reference_sync(method, clip=0.5)  # the workers clip the FSDP runs' global norm to 0.5
    assert not torch.allclose(expected, reference_sync(method), rtol=0, atol=1e-6)  # the clip mattered
    for res in results:
        torch.testing.assert_close(res[name]["params"], expected, rtol=0, atol=1e-10)
        perturbed = [stats["eps_norm"] for stats in res[name]["stats"] if stats["eps_norm"] > 0]
        # every step perturbs, but Momentum-SAM's first (no momentum yet) and LookSAM's cheap steps
        assert len(perturbed) == {samlm.MomentumSAM: STEPS - 1, samlm.LookSAM: -(-STEPS // 5)}.get(method, STEPS)
        if method is not samlm.ASAM:
            rho = 0.3 if method is samlm.MomentumSAM else 0.05  # the registry's default ρ
            assert perturbed == pytest.approx([rho] * len(perturbed), rel=1e-9)  # global ‖ε‖ = ρ


def test_fsdp_refuses_what_it_cannot_do_with_a_clear_message(results):
    for res in results:
        refusals = res["fsdp_refusals"]
        assert "sync_ascent=True" in refusals["per-replica"] and "sharded_grad_norm_fn" in refusals["per-replica"]
        assert "split=True" in refusals["split"]
        assert "FSDP2" in refusals["fsdp1-fsam"] and "ascent_fraction=1.0" in refusals["fsdp1-fsam"]


def test_sharded_grad_norm_fn_sums_the_shards(results):
    for res in results:
        norm = res["sharded_norm"]
        assert norm["global"] == pytest.approx(norm["expected"], rel=1e-12)
        assert norm["local"] < norm["expected"]


def test_fp16_overflow_on_one_replica_skips_the_step_on_every_replica(results):
    """The replicas agree to skip (else one would wait forever in the descent all-reduce)."""
    for res in results:
        fp16 = res["fp16"]
        assert fp16["skipped"] == [True, False]
        assert fp16["unchanged_after_skip"]
        assert fp16["scales"] == [2.0**9, 2.0**9]  # backed off once, then a normal step
        assert fp16["counters"]["skipped_steps"] == 1 and fp16["counters"]["steps"] == 1
    torch.testing.assert_close(results[0]["fp16"]["params"], results[1]["fp16"]["params"], rtol=0, atol=0)


def test_ddp_replicas_keep_the_running_statistics_of_their_own_ascent_rows(results):
    a = int(ROWS * ASCENT_FRACTION)
    for rank, res in enumerate(results):
        reference = make_batchnorm_model()
        reference(rank_rows(global_batches()[0], rank)[0][:a])  # one train-mode forward at w
        bn = reference[1]
        expected = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
        for actual, want in zip(res["batchnorm"], expected):
            torch.testing.assert_close(actual, want, rtol=0, atol=1e-12)
    assert not torch.allclose(results[0]["batchnorm"][0], results[1]["batchnorm"][0])  # really per replica


# -- single-process parts -----------------------------------------------------------------------------
def test_launch_env_detects_torchrun_and_accelerate():
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}
    assert distributed.launch_env(torchrun) == {
        "rank": 1,
        "local_rank": 1,
        "world_size": 4,
        "launcher": "torchrun",
        "mixed_precision": "no",
        "use_fsdp": False,
    }
    accelerate = dict(torchrun, ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_USE_FSDP="true")
    info = distributed.launch_env(accelerate)
    assert (info["launcher"], info["mixed_precision"], info["use_fsdp"]) == ("accelerate", "bf16", True)
    assert distributed.launch_env({})["launcher"] == "none"
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        distributed.launch_env(dict(accelerate, ACCELERATE_USE_DEEPSPEED="true"))


def test_single_process_prepare_is_a_no_op():
    model = make_model()
    run = distributed.prepare(model, info=distributed.setup_distributed(env={}))
    assert run.model is model and run.module is model and run.strategy == "none" and run.sam_kwargs == {}
    assert run.world_size == 1 and distributed.is_main_process() and not distributed.is_distributed()
    assert distributed.all_reduce_mean(2.5) == 2.5
    with pytest.raises(ValueError, match="strategy"):
        distributed.prepare(model, strategy="zero3")


def test_amp_settings():
    assert distributed.amp_settings("no", "cpu") == (None, None)
    assert distributed.amp_settings("bf16", "cpu") == (torch.bfloat16, None)
    dtype, scaler = distributed.amp_settings("fp16", "cpu")
    assert dtype is torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    with pytest.raises(ValueError, match="mixed precision"):
        distributed.amp_settings("fp8", "cpu")


if __name__ == "__main__":
    _worker_main(sys.argv[1])
