"""Momentum-SAM and LookSAM under DDP (gloo, 2 processes) equal one process on the global batch.

Momentum-SAM's ε comes from the base's momentum, the same on every replica, and its one pass is
DDP's all-reduced descent: one process on the global batch is the reference. LookSAM with
``sync_ascent=True`` is global SAM on its full steps, and the mean of the replicas' g_v (each on
its own ascent rows) is the one process's g_v; with per-replica ε that mean keeps the replicas'
cheap steps (and weights) the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gloo_ranks import run_ranks
from samlm.integrations import distributed
from samlm.optim import LookSAM, MomentumSAM, PreconditionedMomentumSAM

pytestmark = pytest.mark.usefixtures("float64_default")

ROWS = 6  # rows per replica per step
STEPS = 5


def make_model():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def global_batches():
    g = torch.Generator().manual_seed(1)
    dtype = torch.get_default_dtype()
    return [
        (torch.randn(2 * ROWS, 4, generator=g, dtype=dtype), torch.randint(0, 3, (2 * ROWS,), generator=g))
        for _ in range(STEPS)
    ]


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


CASES = {
    "msam": lambda params: MomentumSAM(torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2),
    "pmsam": lambda params: PreconditionedMomentumSAM(torch.optim.AdamW(params, lr=1e-2), rho=0.1),
    "looksam-sync": lambda params: LookSAM(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2, look_every=2, ascent_fraction=1.0, sync_ascent=True
    ),
    "looksam-sync-half": lambda params: LookSAM(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2, look_every=2, ascent_fraction=0.5, sync_ascent=True
    ),
    "looksam-local": lambda params: LookSAM(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2, look_every=2, ascent_fraction=0.5
    ),
}


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker_main(out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    info = distributed.setup_distributed(timeout_s=60)
    results = {}
    for name, build in CASES.items():
        model = make_model()
        wrapped = distributed.prepare(model, strategy="ddp", info=info).model
        opt = build(model.parameters())
        for batch in global_batches():
            rows = tuple(t[info.rank * ROWS : (info.rank + 1) * ROWS] for t in batch)
            opt.train_step(rows, lambda b: wrapped(b[0]), ce, model=wrapped)
        results[name] = flat(model)
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    distributed.barrier()
    distributed.cleanup()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(__file__, tmp_path_factory.mktemp("dist"))


def one_process(name):
    """The global batch, ordered so that its first half is the replicas' ascent rows (each
    replica's first half); a mean over the rows does not see the order."""
    model = make_model()
    opt = CASES[name](model.parameters())
    half = ROWS // 2
    order = [*range(half), *range(ROWS, ROWS + half), *range(half, ROWS), *range(ROWS + half, 2 * ROWS)]
    for batch in global_batches():
        opt.train_step(tuple(t[order] for t in batch), lambda b: model(b[0]), ce)
    return flat(model)


@pytest.mark.parametrize("name", ["msam", "pmsam", "looksam-sync", "looksam-sync-half"])
def test_ddp_equals_one_process_on_the_global_batch(results, name):
    expected = one_process(name)
    for res in results:
        torch.testing.assert_close(res[name], expected, rtol=0, atol=1e-12)


def test_looksam_with_per_replica_eps_keeps_the_replicas_the_same(results):
    torch.testing.assert_close(results[0]["looksam-local"], results[1]["looksam-local"], rtol=0, atol=0)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
