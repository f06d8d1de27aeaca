"""Compare optimizers × learning rates × ρ × seeds on the same model, data and step budget, with a report."""

from __future__ import annotations

import argparse
import dataclasses

from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig, config_from_args, validate
from samlm.progress import say
from samlm.studies.compare import DEFAULT_OPTIMIZERS, CompareConfig, CompareResult, compare
from samlm.studies.grid import CompareGridSettings

# What the grid varies or owns (each run gets its own), and the launch flags (runs are local jobs).
GRID_OWNS = ("optimizer", "rho", "lr", "seed", "out", "resume", "overwrite", "dry_run") + tuple(
    f.name for f in dataclasses.fields(settings.ParallelSettings)
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, CompareGridSettings)
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--out", default=CompareConfig.out, help=f"directory of the runs and the report (default {CompareConfig.out})"
    )
    group.add_argument("--title", default=CompareConfig.title, help="report title")
    settings.add_arguments(parser, PretrainConfig, exclude=GRID_OWNS)


def config_from_cli(args: argparse.Namespace) -> CompareConfig:
    grid = settings.from_args(CompareGridSettings, args)
    settings.validate(grid)
    base = config_from_args(args, out=args.out)
    return CompareConfig(
        out=args.out,
        optimizers=grid.optimizers or ",".join(DEFAULT_OPTIMIZERS),
        seeds=grid.seeds,
        rho=grid.rho,
        lr=grid.lr,
        base=base,
        overwrite=grid.overwrite,
        title=args.title,
        jobs=grid.jobs,
        budget=grid.budget,
    )


def print_result(result: CompareResult) -> None:
    print(result.table)
    print()
    for key in ("report", "csv", "val_loss", "sharpness", "forgetting"):
        if key in result.files:
            print(f"{key:>10}: {result.files[key]}")
    if result.unfinished:
        print(f"unfinished runs: {', '.join(result.unfinished)} (run the same command again to resume)")


def run(args: argparse.Namespace) -> int:
    config = config_from_cli(args)
    if getattr(args, "dry_run", False):
        plan = config.runs()
        for run in plan:
            validate(run.config)
            budget = (
                run.config.steps if run.config.steps is not None else f"{run.config.tokens_per_param:g} tokens/param"
            )
            until = " (the FLOP model's, until the calibration)" if run.estimated else ""
            print(f"{run.name}: {run.config.out} ({'+'.join(run.budgets)}; {budget} steps{until})")
        say(f"dry run: {len(plan)} runs are fine; nothing was written")
        return 0
    result = compare(config)
    print_result(result)
    print(f"took {result.seconds:.0f} s")
    return 130 if result.interrupted else 0
