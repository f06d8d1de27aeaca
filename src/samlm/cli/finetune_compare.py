"""Compare fine-tuning runs: baseline vs SAM variants x data fractions x seeds, paper-style tables."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune import FinetuneConfig, prepare
from samlm.progress import say
from samlm.studies.finetune_compare import FinetuneGrid, compare_budgets, compare_runs, find_run_dirs, run_grid
from samlm.studies.grid import GridSettings

# What the grid varies or owns; every other finetune flag applies to every run.
GRID_OWNS = ("optimizer", "rho", "subsample", "seed", "out", "resume", "overwrite", "dry_run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report directory (grid runs go to OUT/runs)")
    parser.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                        help="existing run directories (or directories holding them) to include")
    parser.add_argument("--baseline", default=None,
                        help="method label of the baseline (default: the one non-SAM optimizer)")
    settings.add_arguments(parser, GridSettings)
    parser.add_argument("--subsample", default="1", help="comma-separated data fractions in (0, 1] (default 1)")
    settings.add_arguments(parser, FinetuneConfig, exclude=GRID_OWNS)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    grid_settings = settings.from_args(GridSettings, args)
    settings.validate(grid_settings)
    base = settings.from_args(FinetuneConfig, args, out=str(out))
    run_dirs: list[Path] = []
    if base.model is not None:
        grid = FinetuneGrid(out=str(out), base=base, optimizers=grid_settings.optimizers, subsample=args.subsample,
                            seeds=grid_settings.seeds, rho=grid_settings.rho, overwrite=grid_settings.overwrite,
                            jobs=grid_settings.jobs, budget=grid_settings.budget)
        if grid_settings.dry_run:
            runs = grid.runs()
            for name, config, budgets in runs:
                prepare(dataclasses.replace(config, dry_run=True, overwrite=True))
                print(f"{name}: {config.out} ({'+'.join(budgets)}; {config.steps} steps)")
            say(f"dry run: {len(runs)} runs are fine; nothing was written")
            return 0
        by_budget = run_grid(grid)
        by_budget["steps"] = by_budget.get("steps", []) + find_run_dirs(args.runs)
        report = compare_budgets(by_budget, out, baseline=args.baseline)
        for line in report.headline():
            say(line)
        say(f"wrote {out / 'results.md'}, results.csv, gains.csv, gain.png"
            + (f" (equal compute: {out / 'equal-compute'})" if "compute" in by_budget and by_budget["steps"] else ""))
        return 0
    elif grid_settings.optimizers is not None:
        raise UserError("--optimizers runs a grid: pass --model (and --task) too, or only --runs to report")
    run_dirs += find_run_dirs(args.runs)
    if not run_dirs:
        raise UserError("nothing to compare: pass --runs DIR ... or --model/--task to run a grid")
    report = compare_runs(run_dirs, out, baseline=args.baseline)
    for line in report.headline():
        say(line)
    say(f"wrote {out / 'results.md'}, results.csv, gains.csv, gain.png")
    return 0
