"""The grid of ``samlm finetune-compare``: its flags, its runs (methods × lr × ρ × data fractions ×
seeds, under equal steps and/or equal compute) and running the missing ones (:mod:`samlm.studies.grid`
has the grid syntax and the job runner)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.finetune.config import FinetuneConfig
from samlm.harness.rundir import RunDir
from samlm.optim.registry import METHODS
from samlm.progress import say
from samlm.studies.compare import COMPUTE_SUFFIX
from samlm.studies.grid import (
    CompareGridSettings,
    Job,
    compute_factors,
    parse_budget,
    parse_lr,
    parse_method,
    parse_numbers,
    parse_optimizers,
    parse_rho,
    parse_seeds,
    run_jobs,
    start_fraction,
    stretched,
    tracked,
)


@dataclass
class FinetuneGridSettings(CompareGridSettings):
    """comparison"""

    # samlm compare's lr grid; a method not named runs at the model's fine-tuning lr, not pretraining's.
    lr: str | None = settings.override(
        CompareGridSettings, "lr", default_text=FinetuneConfig.__dataclass_fields__["lr"].metadata["default_text"]
    )


@dataclass
class FinetuneGrid:
    """A grid of fine-tuning runs: ``base`` for every run, varied over methods × lr × ρ × data
    fractions × seeds. Runs go to ``OUT/runs/<method>[-rho<ρ>][-lr<lr>]-sub<fraction>-seed<s>/``,
    ``-lr`` only for a method run at several learning rates (``lr``: a grid of
    :func:`samlm.studies.grid.parse_lr`; a method it does not name runs at ``base.lr``, where
    ``None`` is the model's default)."""

    out: str
    base: FinetuneConfig
    optimizers: str | None = None  # default: the model's baseline optimizer and sam
    subsample: str = "1"
    seeds: str = "0"
    rho: str | None = None
    overwrite: bool = False
    jobs: int = 1
    budget: str = "steps"  # steps | compute | steps,compute (samlm.studies.grid)
    lr: str | None = None

    def runs(self) -> list[tuple[str, FinetuneConfig, tuple[str, ...]]]:
        """``(run name, config, budgets it serves)`` for every point of the grid. At equal compute a
        cheaper method's steps, warmup and evaluation/checkpoint cadence are stretched by its
        factor (:func:`samlm.studies.grid.compute_factors`), in ``<name>-equal-compute``."""
        from samlm.models.finetune import inspect_model, paper_defaults

        if "time" in parse_budget(self.budget):
            raise UserError(
                "--budget time (equal compute by the clock) is samlm compare's; finetune-compare has steps and compute"
            )

        info = inspect_model(cast(str, self.base.model), trust_remote_code=self.base.trust_remote_code)
        baseline = paper_defaults(info)["optimizer"]
        optimizers = parse_optimizers(self.optimizers or f"{baseline},sam")
        variants = [name for name in optimizers if parse_method(name)[1] is not None]
        if variants:
            raise UserError(f"{variants[0]}: method variants (NAME@everyK) are samlm compare's; use --sam-every")
        rhos = parse_rho(self.rho, optimizers)
        lrs = parse_lr(self.lr, optimizers, self.base.lr)
        rates = parse_numbers(self.subsample, "--subsample")
        seeds = parse_seeds(self.seeds)
        budgets = parse_budget(self.budget)
        factors = compute_factors(
            optimizers,
            self.base.ascent_fraction or 0.25,
            sam_every=self.base.sam_every,
            sam_start_fraction=start_fraction(self.base.sam_start, self.base.steps),
        )
        runs = []
        for optimizer in optimizers:
            points = itertools.product(lrs[optimizer], rhos[optimizer] if self.rho is not None else [None])
            for lr, rho in points:
                for rate in rates:
                    for seed in seeds:
                        name = (
                            optimizer
                            + (f"-rho{rho:g}" if rho is not None else "")
                            + (f"-lr{lr:g}" if len(lrs[optimizer]) > 1 else "")
                            + f"-sub{rate:g}-seed{seed}"
                        )
                        sam = METHODS[optimizer].is_sam
                        plain: dict[str, Any] = {} if sam else {"base": None, "ascent_fraction": None, "m": 1}
                        config = dataclasses.replace(
                            self.base,
                            optimizer=optimizer,
                            rho=rho,
                            lr=lr,
                            subsample=rate,
                            seed=seed,
                            out=str(Path(self.out) / "runs" / name),
                            resume=False,
                            overwrite=self.overwrite,
                            **plain,
                        )
                        factor = factors[optimizer] if "compute" in budgets else 1.0
                        if factor == 1.0:
                            runs.append((name, tracked(config, name, self.out), budgets))
                            continue
                        if "steps" in budgets:
                            runs.append((name, tracked(config, name, self.out), ("steps",)))
                        longer = name + COMPUTE_SUFFIX
                        runs.append(
                            (
                                longer,
                                tracked(
                                    dataclasses.replace(
                                        config,
                                        out=str(Path(self.out) / "runs" / longer),
                                        steps=stretched(config.steps, factor),
                                        warmup=stretched(config.warmup, factor),
                                        eval_every=stretched(config.eval_every, factor),
                                        save_every=stretched(config.save_every, factor),
                                    ),
                                    longer,
                                    self.out,
                                ),
                                ("compute",),
                            )
                        )
        return runs


def run_finetune(config: Mapping[str, Any], on_step=None) -> dict:
    """One run of the grid (a module-level function: worker processes import it)."""
    from samlm.harness.finetune import finetune

    return finetune(FinetuneConfig.from_mapping(config), on_step=on_step)


def run_grid(grid: FinetuneGrid) -> dict[str, list[Path]]:
    """Run every missing point of the grid (resuming interrupted ones); the run directories of
    each budget (``steps``, ``compute``)."""
    from samlm.harness.finetune import prepare

    runs = grid.runs()
    todo: list[Job] = []
    for number, (name, config, _) in enumerate(runs, start=1):
        assert config.out is not None  # FinetuneGrid.runs sets it
        run_dir = RunDir(config.out)
        if run_dir.finished_summary() is not None and not grid.overwrite:
            say(f"[{number}/{len(runs)}] {name}: done, skipping")
            continue
        # Resume where a checkpoint exists; otherwise start clean (a run killed before its first
        # checkpoint leaves only a partial metrics.jsonl behind).
        resume = run_dir.has_checkpoint() and not grid.overwrite
        config = dataclasses.replace(config, resume=resume, overwrite=not resume)
        try:
            prepare(dataclasses.replace(config, dry_run=True))  # every run's mistakes before any training
        except UserError as err:
            raise UserError(f"run {name}: {err}") from None
        assert config.optimizer is not None  # FinetuneGrid.runs sets it
        step_cost = METHODS[config.optimizer].step_cost(config.ascent_fraction or 0.25, sam_every=config.sam_every)
        cost = step_cost * cast(int, config.steps)
        todo.append(Job(number, name + (" (resuming)" if config.resume else ""), config, cost))

    interrupted = run_jobs(
        todo, len(runs), lambda job, summary: bool(summary.get("completed")), run=run_finetune, jobs=grid.jobs
    )
    if interrupted:
        raise UserError(f"the grid stopped before the end ({interrupted}); run the same command to resume")
    return {
        budget: [Path(cast(str, config.out)) for _, config, serves in runs if budget in serves]
        for budget in parse_budget(grid.budget)
    }
