"""Run the demo: AdamW, SAM, Functional-SAM and preconditioned F-SAM on Tiny Shakespeare (minutes on a CPU).

``samlm demo`` (``make demo``) is ``samlm compare`` with fixed settings chosen to fit in about
3-4 minutes on a 2-core CPU: a byte-level GPT-2-style model (3 layers × 64 wide, context 64,
≈170k parameters) trained for 400 steps of 32 × 64 tokens on the built-in Tiny Shakespeare
corpus, with AdamW and the SAM family at the ρ each got from a sweep over
{0.01, 0.02, 0.05, 0.1, 0.2} (SAM) and {0.05, 0.1, 0.2, 0.5} (F-SAM, preconditioned F-SAM)
(see README, "The ρ sweep behind the defaults"), two seeds each. Two runs go at a time in worker processes of
one torch thread: on two idle cores this gives ~1.25x the throughput of one run with two
threads, and it degrades gracefully when other processes compete for the cores, which
two-thread runs do not (they slowed down up to 10x on a shared machine).

It prints the table (mean ± std over seeds, plus the paired difference to AdamW) and writes
``runs/demo/{report.md, results.csv, val_loss.png, sharpness.png}`` and every run's directory.
The command is :mod:`samlm.cli.demo`.
"""

from __future__ import annotations

import dataclasses

from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.studies.compare import CompareConfig
from samlm.studies.grid import parse_seeds

DEMO_OPTIMIZERS = ("adamw", "sam", "fsam", "pfsam")
DEMO_RHO = "sam=0.1,fsam=0.1,pfsam=0.2"
DEMO_SEEDS = (0, 1)
DEMO_BASE = PretrainConfig(
    arch="gpt2", layers=3, width=64, heads=4, context=64, data="tinyshakespeare", tokenizer="bytes",
    batch=32, steps=400, lr=6e-3, eval_every=80, val_batches=16,
    sharpness_every=200, sharpness_iters=10, sharpness_batches=1, sharpness_batch_size=8,
    threads=1, progress=False,
)
DEMO_JOBS = 2
DEMO_NOTES = """\
Demo settings: `samlm demo` (= `make demo`). Two runs at a time, one torch thread each, so step
times are per run while sharing the machine with one other run. ρ per method from a sweep at these
settings (README, "The demo"). The seed sets the initial weights and the order of the training
batches; it is the same for every optimizer, so differences to AdamW are also shown *paired by seed*."""


def demo_config(*, out: str = "runs/demo", seeds=DEMO_SEEDS, steps: int = DEMO_BASE.steps, jobs: int = DEMO_JOBS,
                threads: int = DEMO_BASE.threads, resume: bool = False) -> CompareConfig:
    """The demo's comparison; ``resume``: keep finished runs and resume interrupted ones."""
    settings.positive_int("--steps", steps)
    settings.positive_int("--jobs", jobs)
    settings.threads("--threads", threads)
    every = DEMO_BASE.sharpness_every if steps >= 2 * DEMO_BASE.sharpness_every else 0
    base = dataclasses.replace(DEMO_BASE, steps=steps, threads=threads, sharpness_every=every)
    return CompareConfig(
        out=out, optimizers=DEMO_OPTIMIZERS, seeds=parse_seeds(seeds), rho=DEMO_RHO, base=base,
        overwrite=not resume, title="samlm demo: AdamW vs SAM vs Functional-SAM on Tiny Shakespeare",
        notes=DEMO_NOTES, jobs=jobs,
    )
