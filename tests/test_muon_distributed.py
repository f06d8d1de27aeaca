"""SAM around Muon+AdamW under torch.distributed (DDP, gloo, 2 CPU processes).

As tests/test_distributed.py: one module-scoped launch of two workers (this file as a script,
torchrun's environment variables), compared with single-process references.

- sync_ascent=True: ε from the replicas' averaged ascent gradient = single-process SAM on the
  global batch ordered [rank-0 ascent rows, rank-1 ascent rows, the rest]. Muon's geometry
  (preconditioned SAM) and its own step orthogonalize in bf16, so replicas and reference agree
  to bf16 rounding of a 1e-2 step, not bitwise.
- per-replica (default) = m-sharpness with m = 2 (the spectral rule: each replica its own ε).
- FSDP shards Muon's matrices: --base muon refuses it in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import samlm
from gloo_ranks import run_ranks
from samlm.integrations import distributed

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon (torch >= 2.9)"),
]

ROWS = 8
STEPS = 3
ASCENT_FRACTION = 0.5


def make_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 12, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 5),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def make_optimizer(method, model, **kwargs):
    hidden = model[2].weight
    rest = [p for p in model.parameters() if p is not hidden]
    bases = [torch.optim.Muon([hidden], lr=1e-2, adjust_lr_fn="match_rms_adamw"), torch.optim.AdamW(rest, lr=1e-2)]
    return method(bases, rho=0.05, ascent_fraction=ASCENT_FRACTION, **kwargs)


def global_batches(seed=1):
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


def ce(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


CASES = {  # name: (method, sync_ascent)
    "psam-sync": (samlm.PreconditionedSAM, True),
    "pfsam-sync": (samlm.PreconditionedFunctionalSAM, True),
    "ssam-local": (samlm.SpectralSAM, False),
}


def _worker_main(out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    info = distributed.setup_distributed(timeout_s=60)
    results = {}
    for name, (method, sync) in CASES.items():
        model = make_model()
        prepared = distributed.prepare(model, strategy="ddp", info=info)
        opt = make_optimizer(method, model, sync_ascent=sync)
        for batch in global_batches():
            opt.train_step(rank_rows(batch, info.rank), lambda b, w=prepared.model: w(b[0]), ce, model=prepared.model)
        results[name] = flat(model.parameters())
    sharded = distributed.prepare(make_model(), strategy="fsdp", info=info)
    try:
        samlm.build_optimizer("psam", sharded.module, base="muon", lr=1e-2, sam_kwargs=sharded.sam_kwargs)
        results["fsdp_refusal"] = None
    except ValueError as exc:
        results["fsdp_refusal"] = str(exc)
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    distributed.barrier()
    distributed.cleanup()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(__file__, tmp_path_factory.mktemp("dist-muon"))


def reference(name):
    method, sync = CASES[name]
    model = make_model()
    opt = make_optimizer(method, model, m=1 if sync else 2)
    a = int(ROWS * ASCENT_FRACTION)
    for batch in global_batches():
        if sync:
            r0, r1 = rank_rows(batch, 0), rank_rows(batch, 1)
            batch = tuple(torch.cat([x[:a], y[:a], x[a:], y[a:]]) for x, y in zip(r0, r1))
        opt.train_step(batch, lambda b: model(b[0]), ce)
    return flat(model.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_sam_around_muon_and_adamw_under_ddp_equals_the_single_process_reference(results, name):
    expected = reference(name)
    assert torch.equal(results[0][name], results[1][name])  # replicas agree bitwise
    torch.testing.assert_close(results[0][name], expected, rtol=0, atol=2e-4)
    assert not torch.equal(expected, flat(make_model().parameters()))  # it trained


def test_base_muon_refuses_fsdp_in_one_line(results):
    for res in results:
        message = res["fsdp_refusal"]
        assert message and "FSDP shards" in message and "\n" not in message


if __name__ == "__main__":
    _worker_main(sys.argv[1])
