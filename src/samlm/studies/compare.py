"""Compare optimizers × learning rates × ρ × seeds on the same model, data and step budget, with a report.

Each run is a :func:`samlm.harness.pretrain.pretrain` run in ``OUT/<optimizer>-rho<ρ>-seed<s>/``
(AdamW has no ρ: ``OUT/adamw-seed<s>/``; a method with several learning rates adds ``-lr<lr>``
before ``-seed``), run one after another so that step times are
comparable. A finished run (its ``summary.json`` says completed, with the same configuration) is
skipped, an interrupted one is resumed from its checkpoint; ``overwrite=True`` reruns everything.
Then ``OUT/report.md`` (table of mean ± std over seeds, plots), ``OUT/results.csv``,
``OUT/val_loss.png`` and ``OUT/sharpness.png`` are written by :mod:`samlm.studies.report`.

ρ and lr: see :mod:`samlm.studies.grid` (one value, a grid, or values per method). With a grid,
the report's "Tuned" table picks each method's (lr, ρ) by its mean val loss on the tuning slice
and reports that choice on the disjoint report slice (:func:`samlm.studies.report.tuned_table`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from samlm.errors import UserError
from samlm.harness.pretrain import PretrainConfig, pretrain, validate
from samlm.harness.pretrain.build import DEFAULT_TOKENS_PER_PARAM
from samlm.harness.rundir import RunDir
from samlm.optim.registry import METHODS
from samlm.progress import say
from samlm.studies import clock, report
from samlm.studies.grid import (
    Job,
    check_out_dir,
    compute_factors,
    parse_budget,
    parse_lr,
    parse_method,
    parse_optimizers,
    parse_rho,
    parse_seeds,
    run_jobs,
    start_fraction,
    stretched,
    tracked,
)
from samlm.studies.runs import step_time, step_time_outliers

DEFAULT_OPTIMIZERS = ("adamw", "sam", "fsam", "pfsam")
# The settings a finished run must share with the comparison asking for it: those a resume
# must match, and the budget (resumable only because its resolved value is compared).
_SAME_RUN = frozenset(f.name for f in dataclasses.fields(PretrainConfig) if f.metadata.get("resume", True)) | {
    "steps",
    "tokens_per_param",
    "warmup",
}


def run_name(optimizer: str, rho: float | None, seed: int, lr: float | None = None) -> str:
    """``sam-rho0.05-seed0``; ``lr`` (named only when a method's lr grid has several values):
    ``sam-rho0.05-lr0.003-seed0``."""
    return optimizer + ("" if rho is None else f"-rho{rho:g}") + ("" if lr is None else f"-lr{lr:g}") + f"-seed{seed}"


COMPUTE_SUFFIX = "-equal-compute"
BUDGET_SUFFIXES = {"compute": COMPUTE_SUFFIX, "time": clock.CLOCK_SUFFIX}  # a run's name beyond its budget's


@dataclass(frozen=True)
class PlannedRun:
    """One run of the comparison and the budgets it serves (a run whose steps are the same under
    both budgets, the costliest method's, serves both)."""

    name: str
    config: PretrainConfig
    budgets: tuple[str, ...]
    factor: float = 1.0  # its steps relative to --steps (equal compute: cost of the costliest / its own)
    method: str = ""  # its method's label in the comparison (a variant: sam@every5)
    estimated: bool = False  # a clock-budget run planned before the calibration: the model's steps


def _at_compute(config: PretrainConfig, factor: float) -> PretrainConfig:
    """``config`` with its budget, warmup and evaluation cadence stretched by ``factor``."""
    budget = (
        {"steps": stretched(config.steps, factor)}
        if config.steps is not None
        else {"tokens_per_param": (config.tokens_per_param or DEFAULT_TOKENS_PER_PARAM) * factor}
    )
    return dataclasses.replace(
        config,
        **budget,
        warmup=stretched(config.warmup, factor),
        eval_every=stretched(config.eval_every, factor),
        sharpness_every=cast(int, stretched(config.sharpness_every, factor)),  # an int in, an int out
    )


@dataclass
class CompareConfig:
    """What ``samlm compare`` runs: ``base`` (model, data, budget, loop) for every run.

    ``budget``: ``steps`` (every method ``base``'s steps), ``compute`` (every method the
    forward+backward compute of the costliest one: cheaper methods get proportionally more steps,
    their schedules stretched to their own length; see :func:`samlm.studies.grid.compute_factors`),
    or ``steps,compute`` (both; the paired differences to AdamW are reported under each)."""

    out: str = "runs/compare"
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS
    seeds: Sequence[int] = (0,)
    rho: str | float | Mapping | None = None
    lr: str | float | Mapping | None = None  # a grid like rho's (default: base.lr for every method)
    base: PretrainConfig = field(default_factory=PretrainConfig)
    overwrite: bool = False
    title: str = "samlm compare"
    notes: str = ""
    jobs: int = 1  # runs at a time (worker processes); 1: one after another
    budget: str = "steps"
    lr_in_names: bool = False  # name every run's lr (default: only a method's with several)

    def runs(self, calibration: Mapping | None = None) -> list[PlannedRun]:
        """Every run, seed by seed (a partial comparison has every optimizer). With the clock budget,
        its steps come from ``calibration`` (default: the one stored in ``out``, else the FLOP
        model's as an estimate: :attr:`PlannedRun.estimated`)."""
        optimizers = parse_optimizers(self.optimizers)
        budgets = parse_budget(self.budget)
        factors: dict[str, Mapping[str, float]] = {"steps": dict.fromkeys(optimizers, 1.0)}
        if "compute" in budgets or "time" in budgets:
            factors["compute"] = compute_factors(
                optimizers,
                self.base.ascent_fraction,
                sam_every=self.base.sam_every,
                sam_start_fraction=start_fraction(self.base.sam_start, self.base.steps),
            )
        estimated = False
        if "time" in budgets:
            clock.check(self.method_configs())
            if calibration is None:
                calibration = clock.stored(self.out, self.method_configs())
            estimated = calibration is None
            factors["time"] = factors["compute"] if calibration is None else clock.time_factors(calibration)
        return [
            run for seed in parse_seeds(self.seeds) for run in self._seed_runs(seed, optimizers, factors, estimated)
        ]

    def _seed_runs(
        self, seed: int, optimizers: Sequence[str], factors: Mapping[str, Mapping[str, float]], estimated: bool
    ) -> list[PlannedRun]:
        budgets = parse_budget(self.budget)
        rhos = parse_rho(self.rho, optimizers)
        lrs = parse_lr(self.lr, optimizers, self.base.lr)
        runs = []
        for optimizer in optimizers:
            registered, every = parse_method(optimizer)
            for lr, rho in itertools.product(lrs[optimizer], rhos[optimizer]):
                name = run_name(optimizer, rho, seed, lr if self.lr_in_names or len(lrs[optimizer]) > 1 else None)
                # budgets whose steps are the same share a run: factor -> the budgets it serves
                variants: dict[Any, list[str]] = {}
                for kind in budgets:
                    factor = factors[kind][optimizer]
                    # before the calibration the clock's steps are unknown: its own run but the costliest's
                    apart = estimated and kind == "time" and factor != 1.0
                    variants.setdefault((kind, factor) if apart else factor, []).append(kind)
                for share, serves in variants.items():
                    factor = share[1] if isinstance(share, tuple) else share
                    run = name if factor == 1.0 else name + BUDGET_SUFFIXES[serves[0]]
                    out = Path(self.out) / run
                    # Resume where a checkpoint exists; otherwise start clean (a run killed before
                    # its first checkpoint leaves only a partial metrics.jsonl behind).
                    resume = not self.overwrite and RunDir(out).has_checkpoint()
                    config = dataclasses.replace(
                        self.base,
                        optimizer=registered,
                        rho=rho,
                        lr=lr,
                        seed=seed,
                        out=str(out),
                        resume=resume,
                        overwrite=not resume,
                        sam_every=self.base.sam_every if every is None else every,
                    )
                    if factor != 1.0:
                        config = _at_compute(config, factor)
                    runs.append(
                        PlannedRun(
                            run,
                            tracked(config, run, self.out),
                            tuple(serves),
                            factor,
                            optimizer,
                            isinstance(share, tuple),
                        )
                    )
        return runs

    def method_configs(self) -> dict[str, PretrainConfig]:
        """Each method's run settings at its first (lr, ρ) point and the first seed: what the clock
        budget's calibration times (only the step matters: not the budget, not the lr)."""
        optimizers = parse_optimizers(self.optimizers)
        rhos = parse_rho(self.rho, optimizers)
        lrs = parse_lr(self.lr, optimizers, self.base.lr)
        configs = {}
        for optimizer in optimizers:
            name, every = parse_method(optimizer)
            configs[optimizer] = dataclasses.replace(
                self.base,
                optimizer=name,
                rho=rhos[optimizer][0],
                lr=lrs[optimizer][0],
                seed=parse_seeds(self.seeds)[0],
                sam_every=self.base.sam_every if every is None else every,
            )
        return configs

    def plan(self) -> list[tuple[str, PretrainConfig]]:
        """(run name, config) of every run."""
        return [(r.name, r.config) for r in self.runs()]


@dataclass
class CompareResult:
    out: Path
    summaries: dict[str, dict]  # run name -> summary (finished runs)
    skipped: list[str]  # finished before this call
    unfinished: list[str]  # not (yet) completed
    files: dict[str, Path]  # report files
    table: str  # the terminal table
    interrupted: str | None = None
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        return not self.unfinished


def _finished(config: PretrainConfig) -> dict | None:
    """The summary of a completed run with the same configuration in ``config.out``, else None."""
    summary = RunDir(config.out).finished_summary()
    if summary is None:
        return None
    if config.robustness and not isinstance(summary.get("weight_noise"), dict):
        return None  # finished before --robustness was asked: resumed, it measures (no more steps)
    saved = {k: v for k, v in summary.get("config", {}).items() if k in _SAME_RUN}
    wanted = {k: v for k, v in config.as_dict().items() if k in _SAME_RUN}
    return summary if saved == wanted else None


def run_pretrain(config: Mapping, on_step=None) -> dict:
    """One run of the grid (a module-level function: worker processes import it)."""
    return pretrain(PretrainConfig.from_mapping(config), on_step=on_step)


def compare(config: CompareConfig, *, on_run: Callable[[str, dict], None] | None = None) -> CompareResult:
    """Run every (optimizer, lr, ρ, seed) of ``config`` that is not finished yet, then write the report.

    ``config.jobs`` > 1 runs that many at a time in worker processes (each with
    ``base.threads`` torch threads), longest first.
    """
    started = time.perf_counter()
    planned = config.runs()
    for run in planned:
        validate(run.config)
    if not isinstance(config.jobs, int) or config.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {config.jobs!r}")
    out = check_out_dir(config.out)
    calibration = None
    if "time" in parse_budget(config.budget):  # every setting checked first: the calibration takes a while
        calibration = clock.calibrate(out, config.method_configs(), overwrite=config.overwrite)
        planned = config.runs(calibration)
    plan = [(r.name, r.config) for r in planned]
    summaries: dict[str, dict] = {}
    skipped: list[str] = []
    todo: list[Job] = []
    for index, (name, run_config) in enumerate(plan, start=1):
        finished = None if config.overwrite else _finished(run_config)
        if finished is not None:
            say(f"[{index}/{len(plan)}] {name}: finished earlier, skipped")
            summaries[name] = finished
            skipped.append(name)
        else:
            cost = METHODS[run_config.optimizer].step_cost(run_config.ascent_fraction, sam_every=run_config.sam_every)
            steps = run_config.steps or 1
            todo.append(Job(index, name, run_config, cost * steps))

    def done(job: Job, summary: dict) -> bool:
        if on_run is not None:
            on_run(job.name, summary)
        if not summary.get("completed"):
            say(f"{job.name} stopped at step {summary.get('step')}: run the same command again to resume")
            return False
        summaries[job.name] = summary
        timing = step_time(report.load_run(out / job.name))
        how = "mean, start-up included" if timing.source == "mean" else "median after warm-up"
        say(
            f"[{job.index}/{len(plan)}] {job.name}: val loss {summary.get('val_loss'):.4f}, "
            f"{(timing.seconds or 0) * 1000:.1f} ms/step ({how})"
        )
        return True

    interrupted = run_jobs(todo, len(plan), done, run=run_pretrain, jobs=config.jobs)
    unfinished = [name for name, _ in plan if name not in summaries]
    loaded = {r.name: report.load_run(out / r.name) for r in planned if r.name in summaries}
    by_budget = {
        budget: [loaded[r.name] for r in planned if r.name in loaded and budget in r.budgets]
        for budget in parse_budget(config.budget)
    }
    runs = by_budget.get("steps") or next(iter(by_budget.values()))
    files = report.write_report(
        out,
        runs,
        title=config.title,
        notes=config.notes,
        unfinished=unfinished,
        budgets=by_budget,
        calibration=calibration,
        clock_steps={
            r.method: summaries[r.name].get("steps") for r in planned if "time" in r.budgets and r.name in summaries
        },
    )
    slow = [o.run for o in step_time_outliers(list(loaded.values()))]  # as report.md: over both budgets' runs
    table = report.text_table(report.aggregate(runs, outliers=slow))
    return CompareResult(
        out=out,
        summaries=summaries,
        skipped=skipped,
        unfinished=unfinished,
        files=files,
        table=table,
        interrupted=interrupted,
        seconds=time.perf_counter() - started,
    )
