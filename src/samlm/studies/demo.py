"""Run the demo: AdamW, SAM, Functional-SAM and preconditioned F-SAM on Tiny Shakespeare (minutes on a CPU).

``samlm demo`` (``make demo``) is ``samlm compare`` with fixed settings chosen to be a fair
comparison that fits in about 4 minutes on a 2-core CPU:

* a byte-level GPT-2-style model (2 layers × 32 wide, context 64, ≈36k parameters) trained at
  20 tokens per parameter (Chinchilla's budget) on the built-in Tiny Shakespeare corpus;
* each method at its own (lr, ρ), picked from the committed sweep below by the tuning slice of
  the validation split (``samlm demo --sweep`` reruns it);
* three seeds, at equal steps *and* at equal compute (AdamW and SAM get the steps that cost what
  the functional variants' steps cost), so the report has both Δ columns.

Two runs go at a time in worker processes of one torch thread: on two idle cores this gives
~1.25x the throughput of one run with two threads, and it degrades gracefully when other
processes compete for the cores. It writes ``runs/demo/{report.md, results.csv, val_loss.png,
sharpness.png}`` and every run's directory. The command is :mod:`samlm.cli.demo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.studies.compare import CompareConfig
from samlm.studies.grid import parse_seeds

DEMO_OPTIMIZERS = ("adamw", "sam", "fsam", "pfsam")
# The sweep (seed 0, equal steps, everything else as the demo): every method at every one of its
# lr, each SAM-family method at every one of its ρ; the demo's points below are its "Tuned" table.
# The grid is the pretraining study's CPU grid for these methods (samlm study pretrain, its 2x32 size
# is this model), centred on the optimum of the 40-wide demo's sweep (docs/comparing.md, "The demo").
SWEEP_LR = ",".join(
    [f"adamw={lr}" for lr in ("2.4e-2", "4.8e-2", "9.6e-2", "1.92e-1")]
    + [f"{method}={lr}" for method in ("sam", "fsam", "pfsam") for lr in ("6e-3", "1.2e-2", "2.4e-2", "4.8e-2")]
)
SWEEP_RHO = "sam=0.05,sam=0.1,fsam=0.05,fsam=0.1,pfsam=0.1,pfsam=0.2"
SWEEP_SEEDS = (0,)
DEMO_LR = "adamw=4.8e-2,sam=2.4e-2,fsam=1.2e-2,pfsam=1.2e-2"
DEMO_RHO = "sam=0.1,fsam=0.1,pfsam=0.1"
DEMO_SEEDS = (0, 1, 2)
DEMO_BUDGET = "steps,compute"
# The run settings of the demo and of the CPU presets of the studies (each sets its model's size).
# Evaluation every 70 steps: at 20 tokens/param the demo's 350 steps get 5 points per curve
# (the report asks for 5), and evaluation stays ~2% of a run.
CPU_RUN = PretrainConfig(
    arch="gpt2",
    context=64,
    data="tinyshakespeare",
    tokenizer="bytes",
    batch=32,
    tokens_per_param=20,
    eval_every=70,
    val_batches=16,
    sharpness_every=0,
    sharpness_iters=10,
    sharpness_batches=1,
    sharpness_batch_size=8,
    threads=1,
    progress=False,
)
DEMO_BASE = dataclasses.replace(CPU_RUN, layers=2, width=32, heads=4)
DEMO_JOBS = 2
DEMO_NOTES = """\
Demo settings: `samlm demo` (= `make demo`). 20 tokens per parameter; each method's (lr, ρ) from the
committed sweep (`samlm demo --sweep`, docs/comparing.md "The demo"). Two runs at a time, one torch thread each,
so step times are per run while sharing the machine with one other run. The seed sets the initial
weights and the order of the training batches; it is the same for every optimizer, so differences
to AdamW are shown *paired by seed*."""


def demo_config(
    *,
    out: str | None = None,
    seeds=None,
    steps: int | None = None,
    jobs: int = DEMO_JOBS,
    threads: int = cast(int, DEMO_BASE.threads),
    resume: bool = False,
    sweep: bool = False,
    data: str | None = None,
) -> CompareConfig:
    """The demo's comparison, or with ``sweep`` the grid its lr and ρ came from (``out`` and
    ``seeds`` default to each one's own); ``steps``: instead of 20 tokens per parameter;
    ``resume``: keep finished runs and resume interrupted ones; ``data``: another corpus (a
    prepared directory brings its own tokenizer; a raw spec is read as bytes)."""
    if steps is not None:
        settings.positive_int("--steps", steps)
    settings.positive_int("--jobs", jobs)
    settings.threads("--threads", threads)
    budget: dict[str, Any] = {} if steps is None else {"steps": steps, "tokens_per_param": None}
    base = dataclasses.replace(DEMO_BASE, threads=threads, **budget)
    if data is not None:
        from samlm.data import is_prepared_dir

        base = dataclasses.replace(base, data=data, tokenizer=None if is_prepared_dir(data) else base.tokenizer)
    variant: dict[str, Any]
    if sweep:
        variant = dict(
            out=out or "runs/demo-sweep",
            seeds=SWEEP_SEEDS if seeds is None else seeds,
            rho=SWEEP_RHO,
            lr=SWEEP_LR,
            base=dataclasses.replace(base, sharpness=False),
            budget="steps",
            title="samlm demo --sweep: the (lr, ρ) grid behind the demo's settings",
        )
    else:
        variant = dict(
            out=out or "runs/demo",
            seeds=DEMO_SEEDS if seeds is None else seeds,
            rho=DEMO_RHO,
            lr=DEMO_LR,
            base=base,
            budget=DEMO_BUDGET,
            title="samlm demo: AdamW vs SAM vs Functional-SAM on Tiny Shakespeare",
        )
    variant["seeds"] = parse_seeds(variant["seeds"])
    return CompareConfig(optimizers=DEMO_OPTIMIZERS, overwrite=not resume, notes=DEMO_NOTES, jobs=jobs, **variant)
