"""Run the demo: AdamW, SAM, Functional-SAM and preconditioned F-SAM on Tiny Shakespeare (minutes on a CPU)."""

from __future__ import annotations

import argparse
import time

from samlm.cli.compare import print_result
from samlm.harness import settings
from samlm.harness.pretrain.config import TextDataSettings
from samlm.progress import say
from samlm.studies.compare import compare
from samlm.studies.demo import DEMO_BASE, DEMO_JOBS, DEMO_OPTIMIZERS, DEMO_SEEDS, SWEEP_SEEDS, demo_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None, help="output directory (default runs/demo; with --sweep runs/demo-sweep)"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help=f"comma-separated (default {','.join(map(str, DEMO_SEEDS))}; "
        f"with --sweep {','.join(map(str, SWEEP_SEEDS))})",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 20 tokens per parameter)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the (lr, rho) grid the demo's settings were picked from (docs/comparing.md, 'The demo')",
    )
    parser.add_argument("--jobs", type=int, default=DEMO_JOBS, help=f"runs at a time (default {DEMO_JOBS})")
    parser.add_argument(
        "--threads", type=int, default=DEMO_BASE.threads, help=f"torch threads per run (default {DEMO_BASE.threads})"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep finished runs and resume interrupted ones (default: start over)"
    )
    settings.add_arguments(parser, TextDataSettings, only=("data",))  # the pretraining flag itself


def run(args: argparse.Namespace) -> int:
    config = demo_config(
        out=args.out,
        seeds=args.seeds,
        steps=args.steps,
        jobs=args.jobs,
        threads=args.threads,
        resume=args.resume,
        sweep=args.sweep,
        data=getattr(args, "data", None),
    )
    started = time.perf_counter()
    runs = len(config.plan())
    length = f"{config.base.steps} steps" if config.base.steps else f"{config.base.tokens_per_param} tokens/param"
    say(
        f"demo{' sweep' if args.sweep else ''}: {runs} runs ({', '.join(DEMO_OPTIMIZERS)} x seeds "
        f"{','.join(map(str, config.seeds))}, budget {config.budget}), {length}, {config.jobs} at a time -> {config.out}"
    )
    result = compare(config)
    print_result(result)
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 130 if result.interrupted else 0
