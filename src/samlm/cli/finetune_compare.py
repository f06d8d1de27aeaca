"""Compare fine-tuning runs: baseline vs SAM variants x (lr, ρ) x data fractions x seeds, paper-style tables."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune import FinetuneConfig, prepare
from samlm.progress import say
from samlm.studies.finetune_compare import compare_budgets, compare_runs
from samlm.studies.finetune_grid import FinetuneGrid, FinetuneGridSettings, run_grid
from samlm.studies.finetune_runs import find_run_dirs

# What the grid varies or owns (--lr and --rho are grids of FinetuneGridSettings); every other
# finetune flag applies to every run.
GRID_OWNS = ("optimizer", "rho", "lr", "subsample", "seed", "out", "resume", "overwrite", "dry_run")
# Grid flags that mean nothing without a grid to run.
GRID_ONLY = ("optimizers", "rho", "lr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report directory (grid runs go to OUT/runs)")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        metavar="DIR",
        help="existing run directories (or directories holding them) to include",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="the baseline: a method label (that point), or an optimizer (its best lr/ρ point at "
        "each data fraction) (default: the one non-SAM optimizer)",
    )
    settings.add_arguments(parser, FinetuneGridSettings)
    parser.add_argument("--subsample", default="1", help="comma-separated data fractions in (0, 1] (default 1)")
    settings.add_arguments(parser, FinetuneConfig, exclude=GRID_OWNS)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    grid_settings = settings.from_args(FinetuneGridSettings, args)
    settings.validate(grid_settings)
    # --lr (the grid's, like --rho) lands in the namespace under a FinetuneConfig name too: the base
    # keeps its default, the model's lr, for the methods the grid does not name.
    base = settings.from_args(FinetuneConfig, args, out=str(out), lr=None)
    run_dirs: list[Path] = []
    if base.model is not None:
        grid = FinetuneGrid(
            out=str(out),
            base=base,
            optimizers=grid_settings.optimizers,
            subsample=args.subsample,
            seeds=grid_settings.seeds,
            rho=grid_settings.rho,
            overwrite=grid_settings.overwrite,
            jobs=grid_settings.jobs,
            budget=grid_settings.budget,
            lr=grid_settings.lr,
        )
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
        say(
            f"wrote {out / 'results.md'}, results.csv, gains.csv, gain.png"
            + (f" (equal compute: {out / 'equal-compute'})" if "compute" in by_budget and by_budget["steps"] else "")
        )
        return 0
    grid_only = [
        settings.flag(FinetuneGridSettings, name) for name in GRID_ONLY if getattr(grid_settings, name) is not None
    ]
    if grid_only:
        raise UserError(
            f"{'/'.join(grid_only)} needs a grid to run: pass --model (and --task) too, or only --runs to report"
        )
    run_dirs += find_run_dirs(args.runs)
    if not run_dirs:
        raise UserError("nothing to compare: pass --runs DIR ... or --model/--task to run a grid")
    report = compare_runs(run_dirs, out, baseline=args.baseline)
    for line in report.headline():
        say(line)
    say(f"wrote {out / 'results.md'}, results.csv, gains.csv, gain.png")
    return 0
