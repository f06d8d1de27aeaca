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
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from samlm.compare import CompareConfig, compare, parse_seeds, print_result
from samlm.errors import UserError
from samlm.progress import say
from samlm.train.pretrain import PretrainConfig

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--seeds", default=",".join(map(str, DEMO_SEEDS)), help="comma-separated (default 0,1)")
    parser.add_argument("--steps", type=int, default=DEMO_BASE.steps, help=f"steps per run (default {DEMO_BASE.steps})")
    parser.add_argument("--jobs", type=int, default=DEMO_JOBS, help=f"runs at a time (default {DEMO_JOBS})")
    parser.add_argument("--threads", type=int, default=DEMO_BASE.threads,
                        help=f"torch threads per run (default {DEMO_BASE.threads})")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished runs and resume interrupted ones (default: start over)")


def demo_config(args: argparse.Namespace) -> CompareConfig:
    if args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    base = dataclasses.replace(DEMO_BASE, steps=args.steps, threads=args.threads,
                               sharpness_every=DEMO_BASE.sharpness_every if args.steps >= 2 * DEMO_BASE.sharpness_every
                               else 0)
    return CompareConfig(
        out=args.out, optimizers=DEMO_OPTIMIZERS, seeds=parse_seeds(args.seeds), rho=DEMO_RHO, base=base,
        overwrite=not args.resume, title="samlm demo: AdamW vs SAM vs Functional-SAM on Tiny Shakespeare",
        notes=DEMO_NOTES, jobs=args.jobs,
    )


def run(args: argparse.Namespace) -> int:
    config = demo_config(args)
    started = time.perf_counter()
    runs = len(config.plan())
    say(f"demo: {runs} runs ({', '.join(DEMO_OPTIMIZERS)} x seeds {','.join(map(str, config.seeds))}), "
        f"{config.base.steps} steps each, {config.jobs} at a time -> {config.out}")
    result = compare(config)
    print_result(result)
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 130 if result.interrupted else 0
