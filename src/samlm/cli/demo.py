"""Run the demo: AdamW, SAM, Functional-SAM and preconditioned F-SAM on Tiny Shakespeare (minutes on a CPU)."""

from __future__ import annotations

import argparse
import time

from samlm.cli.compare import print_result
from samlm.progress import say
from samlm.studies.compare import compare
from samlm.studies.demo import DEMO_BASE, DEMO_JOBS, DEMO_OPTIMIZERS, DEMO_SEEDS, demo_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--seeds", default=",".join(map(str, DEMO_SEEDS)),
                        help=f"comma-separated (default {','.join(map(str, DEMO_SEEDS))})")
    parser.add_argument("--steps", type=int, default=DEMO_BASE.steps, help=f"steps per run (default {DEMO_BASE.steps})")
    parser.add_argument("--jobs", type=int, default=DEMO_JOBS, help=f"runs at a time (default {DEMO_JOBS})")
    parser.add_argument("--threads", type=int, default=DEMO_BASE.threads,
                        help=f"torch threads per run (default {DEMO_BASE.threads})")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished runs and resume interrupted ones (default: start over)")


def run(args: argparse.Namespace) -> int:
    config = demo_config(out=args.out, seeds=args.seeds, steps=args.steps, jobs=args.jobs, threads=args.threads,
                         resume=args.resume)
    started = time.perf_counter()
    runs = len(config.plan())
    say(f"demo: {runs} runs ({', '.join(DEMO_OPTIMIZERS)} x seeds {','.join(map(str, config.seeds))}), "
        f"{config.base.steps} steps each, {config.jobs} at a time -> {config.out}")
    result = compare(config)
    print_result(result)
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 130 if result.interrupted else 0
