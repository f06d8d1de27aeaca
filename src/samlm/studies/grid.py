"""What both comparisons share: the grid flags (methods, seeds, ρ, jobs), their parsing, and
running the grid's runs one after another or a few at a time in worker processes.

ρ: one value for every SAM-family method (``--rho 0.05``), a list (``--rho 0.02,0.05``: a grid),
or per method (``--rho sam=0.02,fsam=0.1``; repeat a name for a grid, ``sam=0.01,sam=0.02``; a
bare value applies to the methods not named). Methods without a value use their default ρ from
the registry. ``samlm compare``'s ``--lr`` is a grid of the same syntax over every method
(:func:`parse_grid`; default: the one ``--lr`` of a run).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from samlm.errors import UserError
from samlm.harness import settings as s
from samlm.harness.settings import setting
from samlm.optim.registry import METHODS, sam_family
from samlm.progress import say


def check_optimizers(flag: str, value: Any) -> None:
    """A setting's check: ``value`` is a list of methods (:func:`parse_optimizers`)."""
    parse_optimizers(value)


def check_seeds(flag: str, value: Any) -> None:
    """A setting's check: ``value`` is a list of seeds (:func:`parse_seeds`)."""
    parse_seeds(value, flag)


def check_budget(flag: str, value: Any) -> None:
    """A setting's check: ``value`` is a budget (:func:`parse_budget`)."""
    parse_budget(value)


@dataclass
class GridSettings:
    """comparison"""

    optimizers: str | None = setting(None, "comma-separated methods to compare (samlm.optim.registry)")
    seeds: str = setting("0", "comma-separated seeds")
    rho: str | None = setting(
        None,
        "one value, a list (0.02,0.05: a grid for every SAM-family method), or per "
        "method (sam=0.02,fsam=0.1; repeat a name for a grid)",
        default_text="each method's default",
    )
    jobs: int = setting(
        1,
        "runs at a time, in worker processes (1: one after another, so step times are comparable); use with --threads",
        check=s.positive_int,
    )
    overwrite: bool = setting(False, "rerun finished runs too")
    dry_run: bool = setting(False, "check every run's settings and print the grid; write nothing")
    budget: str = setting(
        "steps",
        "steps: every method the same number of steps; compute: the same "
        "forward+backward compute by the FLOP model (cheaper methods get proportionally more steps); "
        "time: the same measured time on this machine (a calibration of every method's step time, "
        "stored in OUT/calibration.json); a comma-separated list (steps,compute,time) runs several",
        check=check_budget,
    )


@dataclass
class CompareGridSettings(GridSettings):
    """comparison"""

    lr: str | None = setting(
        None,
        "peak learning rate: one value, a list (1e-3,3e-3: a grid for every method), "
        "or per method (adamw=1e-3,adamw=3e-3,sam=3e-3; a bare value applies to the "
        "methods not named)",
        default_text=f"{s.OptimizerSettings.lr:g}",
        group="comparison",
    )


@dataclass
class StudySettings:
    """study"""

    preset: str = setting("cpu", "the study's preset")
    out: str = setting("runs/study", "study directory")
    seeds: str | None = setting(
        None,
        "comma-separated seeds of the final runs",
        default_text="the preset's",
        check=check_seeds,
    )
    jobs: int | None = setting(None, "runs at a time", check=s.positive_int, default_text="the preset's")
    steps: int | None = setting(
        None, "steps per run instead of the preset's budget (a quick look)", check=s.positive_int
    )
    overwrite: bool = setting(False, "rerun finished runs too")
    dry_run: bool = setting(False, "print the sizes, grids and runs; write nothing")
    # experiment trackers: the runs' own settings, passed to every run of the study
    report_to: str = s.override(s.LoopSettings, "report_to")
    run_name: str | None = s.override(
        s.LoopSettings,
        "run_name",
        help="the study's name in the trackers (its runs' group and name prefix)",
        default_text="the runs' directories",
    )
    log_every: int | None = s.override(s.LoopSettings, "log_every", default=None, default_text="the preset's")

    def tracking(self) -> dict:
        """The tracker settings given, for the runs' configs."""
        return {
            k: v
            for k in ("report_to", "run_name", "log_every")
            if (v := getattr(self, k)) is not None and not (k == "report_to" and v == "none")
        }


def study_seconds(record_file: Path, seconds: float, *, restart: bool = False) -> dict:
    """A study's time over all its calls: this call's ``seconds`` added to those the study's
    record (``study.json``) already holds (``restart``: an ``--overwrite`` call starts over)."""
    calls: list = []
    if not restart and record_file.is_file():
        import json

        with contextlib.suppress(ValueError, OSError):
            calls = [float(c) for c in json.loads(record_file.read_text()).get("calls_seconds", [])]
    calls.append(round(seconds, 1))
    return {"seconds": round(sum(calls), 1), "calls_seconds": calls}


def study_time_text(time: Mapping[str, Any], seconds: float) -> str:
    """The report's line on a study's time (``time``: :func:`study_seconds`)."""
    calls = time.get("calls_seconds") or [round(seconds, 1)]
    return (
        f"The study took {time.get('seconds', seconds):.0f} s in all"
        + (f" over {len(calls)} calls" if len(calls) > 1 else "")
        + f" (this call {seconds:.0f} s)."
    )


# Each budget as the reports name it. "time" is equal compute by the clock: every method the measured
# time of the costliest one (samlm.studies.clock); beside it, "compute" is named by its model.
BUDGET_HEADERS = {"steps": "equal steps", "compute": "equal compute", "time": "equal compute (clock)"}
BUDGETS = tuple(BUDGET_HEADERS)
MODEL_HEADER = "equal compute (model)"


def budget_headers(budgets: Iterable[str]) -> dict[str, str]:
    """The reports' name of each budget: with the clock budget beside it, the FLOP-model one is
    "equal compute (model)", so that neither is mistaken for the other."""
    kinds = list(budgets)
    return {k: MODEL_HEADER if k == "compute" and "time" in kinds else BUDGET_HEADERS.get(k, k) for k in kinds}


def parse_budget(text: str) -> tuple[str, ...]:
    """``steps``, ``compute``, ``time`` or several (``steps,compute,time``), in that order."""
    items = tuple(dict.fromkeys(t.strip() for t in str(text).split(",")))
    if not items or any(item not in BUDGETS for item in items):
        raise UserError(f"--budget must be steps, compute, time or a comma-separated list of them, got '{text}'")
    return tuple(b for b in BUDGETS if b in items)


# A method variant: a registered SAM-family method with its own SAM schedule, ``sam@every5`` (a SAM
# step every 5th step), so that one comparison holds SAM and SAM every k-th step side by side.
VARIANT_SEPARATOR = "@every"


def parse_method(label: str) -> tuple[str, int | None]:
    """``(registered name, its own sam_every or None)`` of a method label (``sam``, ``sam@every5``)."""
    name, sep, every = str(label).partition(VARIANT_SEPARATOR)
    if not sep:
        return name, None
    if name not in METHODS or not METHODS[name].is_sam:
        raise UserError(f"{label}: only a SAM-family method has a SAM schedule (NAME{VARIANT_SEPARATOR}K)")
    if not every.isdigit() or int(every) < 1:
        raise UserError(f"{label}: K in NAME{VARIANT_SEPARATOR}K must be an integer >= 1")
    return name, int(every)


def method_cost(label: str, ascent_fraction: float, *, sam_every: int = 1, sam_start_fraction: float = 0.0) -> float:
    """``Method.step_cost`` of a method label (a variant's own ``sam_every`` replaces the run's)."""
    name, every = parse_method(label)
    return METHODS[name].step_cost(ascent_fraction, sam_every=every or sam_every, sam_start_fraction=sam_start_fraction)


def compute_factors(
    optimizers: Sequence[str], ascent_fraction: float, *, sam_every: int = 1, sam_start_fraction: float = 0.0
) -> dict[str, float]:
    """Steps multiplier of each method at equal compute: every method gets the compute of the most
    expensive one (``Method.step_cost``: passes counted with a backward = 2 forwards, a SAM step
    every ``sam_every`` steps after ``sam_start_fraction`` of the run), so one run of the
    costliest method and one baseline run per seed serve every comparison."""
    costs = {
        name: method_cost(name, ascent_fraction, sam_every=sam_every, sam_start_fraction=sam_start_fraction)
        for name in optimizers
    }
    most = max(costs.values())
    return {name: most / cost for name, cost in costs.items()}


def start_fraction(sam_start: float, steps: int | None) -> float:
    """``--sam-start`` as a fraction of the run (a step count needs the run's ``steps``)."""
    if 0 < sam_start < 1:
        return float(sam_start)
    if not sam_start:
        return 0.0
    if not steps:
        raise UserError(
            "--budget compute with --sam-start as a step needs --steps (or give --sam-start as a fraction of the run)"
        )
    return min(1.0, sam_start / steps)


def check_out_dir(out: str | os.PathLike) -> Path:
    """``--out`` as a Path; a one-line error when it names a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory")
    return path


def tracked(config, name: str, out: str | os.PathLike):
    """A run of a comparison in ``out`` as the trackers show it: named ``name`` (after the user's
    ``--run-name``, if any), grouped with the comparison's other runs (W&B group, MLflow
    experiment, trackio project: ``--run-name``, else the comparison's ``--out``)."""
    import dataclasses

    group = config.run_group or config.run_name or str(out)
    return dataclasses.replace(
        config, run_name=f"{config.run_name}/{name}" if config.run_name else name, run_group=group
    )


def stretched(steps: int | None, factor: float) -> int | None:
    """A step count (a budget, a warmup, an evaluation period) at ``factor`` times the compute."""
    return None if steps is None else max(1, round(steps * factor)) if steps else steps


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UserError(f"--{what} must be a comma-separated list, got '{text}'")
    return items


def parse_optimizers(text: str | Sequence[str]) -> list[str]:
    names = parse_list(text, "optimizers") if isinstance(text, str) else list(text)
    unknown = [n for n in names if parse_method(n)[0] not in METHODS]
    if unknown:
        raise UserError(f"unknown optimizer(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if len(set(names)) != len(names):
        raise UserError(f"--optimizers lists an optimizer twice: {','.join(names)}")
    return names


def parse_seeds(text: str | Sequence[int], flag: str = "--seeds") -> list[int]:
    items = parse_list(text, flag[2:]) if isinstance(text, str) else list(text)
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise UserError(f"{flag} must be comma-separated integers >= 0, got '{text}'") from None
        if seed < 0:
            raise UserError(f"{flag} must be integers >= 0, got {seed}")
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def parse_numbers(text: str, flag: str, *, positive: bool = False) -> list[float]:
    """A comma-separated list of finite numbers >= 0 (``positive``: > 0), e.g. ``--subsample``."""
    items = parse_list(text, flag[2:])
    for item in items:
        try:
            float(item)
        except ValueError:
            raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    return [_grid_value(item, text, flag, positive) for item in items]


def _grid_value(text: str, spec: str, flag: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag}: '{text}' is not a number (in '{spec}')") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise UserError(f"{flag} must be finite and {'>' if positive else '>='} 0, got {text}")
    return value


def parse_grid(
    spec: str | float | Mapping[str, Sequence[float] | float] | None,
    optimizers: Sequence[str],
    flag: str,
    default: Callable[[str], float | None],
    *,
    applies: Sequence[str] | None = None,
    positive: bool = False,
) -> dict[str, list[float | None]]:
    """The values of a grid flag (``--rho``, ``--lr``) per optimizer: one value, a list (a grid for
    every method), or per method (``name=value``, repeated for a grid; a bare value applies to the
    methods not named). Methods without a value get ``default(name)``; methods the flag does not
    apply to (``applies``; default: every registered method), ``[None]``. ``positive``: 0 is refused too."""
    applies = list(METHODS) if applies is None else list(applies)
    applies += [name for name in optimizers if name not in applies and parse_method(name)[0] in applies]  # variants
    named: dict[str, list[float]] = {}
    bare: list[float] = []
    if isinstance(spec, Mapping):
        for name, values in spec.items():
            named[name] = [float(v) for v in (values if isinstance(values, (list, tuple)) else [cast(float, values)])]
    elif isinstance(spec, (int, float)):
        bare = [float(spec)]
    elif spec is not None and str(spec).strip():
        for item in parse_list(spec, flag[2:]):
            if "=" in item:
                name, _, value = item.partition("=")
                named.setdefault(name.strip(), []).append(_grid_value(value.strip(), spec, flag, positive))
            else:
                bare.append(_grid_value(item, spec, flag, positive))
    for name in named:
        if name in METHODS and name not in applies:
            raise UserError(f"{flag}: {name} has no {flag[2:]} (only {', '.join(applies)})")
        if name not in applies:
            raise UserError(f"{flag}: unknown optimizer '{name}' (choose from {', '.join(applies)})")
        if name not in optimizers:
            raise UserError(f"{flag} gives a value for {name}, which is not in --optimizers ({','.join(optimizers)})")
    result: dict[str, list[float | None]] = {}
    for name in optimizers:
        given: Sequence[float | None] = (named.get(name) or bare or [default(name)]) if name in applies else [None]
        result[name] = list(dict.fromkeys(given))  # dedupe, keep order
    return result


def parse_rho(
    spec: str | float | Mapping[str, Sequence[float] | float] | None, optimizers: Sequence[str]
) -> dict[str, list[float | None]]:
    """ρ values per optimizer (plain optimizers: ``[None]``; default: the registry's ρ)."""
    return parse_grid(
        spec, optimizers, "--rho", lambda name: METHODS[parse_method(name)[0]].default_rho, applies=sam_family()
    )


def parse_lr(
    spec: str | float | Mapping[str, Sequence[float] | float] | None,
    optimizers: Sequence[str],
    default: float | None,
) -> dict[str, list[float | None]]:
    """Peak learning rates per optimizer (default: ``default``, the run's ``--lr``)."""
    return parse_grid(spec, optimizers, "--lr", lambda name: default, positive=True)


@dataclass
class Job:
    """One run of a grid: ``config`` is a harness config (``as_dict()``, ``threads``)."""

    index: int
    name: str
    config: Any
    cost: float = 1.0


Runner = Callable[[Mapping[str, Any], Callable[[int, dict], None] | None], dict]


def run_jobs(
    todo: Sequence[Job], total: int, done: Callable[[Job, dict], bool], *, run: Runner, jobs: int = 1
) -> str | None:
    """Run ``todo`` with ``run(config_dict, on_step) -> summary`` (a module-level function, so
    that worker processes can import it). ``jobs`` > 1: that many at a time, longest first.
    ``done(job, summary)`` is False when the run stopped early. Returns what interrupted the
    grid, or None."""
    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            say(f"[{job.index}/{total}] {job.name}")
            summary = run(job.config.as_dict(), None)
            if not done(job, summary):
                return summary.get("interrupted") or "interrupted"
        return None
    return _run_in_parallel(sorted(todo, key=lambda job: -job.cost), total, done, run, jobs)


# ---- parallel runs: worker processes in their own process group, so that a Ctrl-C reaches only
# the parent, which forwards exactly one SIGINT to each busy worker (two would abort its step).

_STOP_REQUESTED = False


def _worker_init(threads: int | None) -> None:
    global _STOP_REQUESTED
    _STOP_REQUESTED = False
    from samlm.progress import quiet_third_party_loggers

    quiet_third_party_loggers()
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    if threads:
        import torch

        torch.set_num_threads(threads)

    def request_stop(signum, frame):  # a signal before (or after) the training loop
        global _STOP_REQUESTED
        _STOP_REQUESTED = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def _worker_run(run: Runner, config: dict) -> dict:
    def on_step(step, stats):
        global _STOP_REQUESTED
        if _STOP_REQUESTED:  # asked to stop before the loop listened: pass it on to the loop
            _STOP_REQUESTED = False
            os.kill(os.getpid(), signal.SIGINT)

    if _STOP_REQUESTED:
        return {"completed": False, "interrupted": "SIGINT", "step": 0}
    return run(dict(config, progress=False), on_step)


def _run_in_parallel(queue: list[Job], total: int, done, run: Runner, jobs: int) -> str | None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    queue = list(queue)
    threads = queue[0].config.threads
    interrupted: list[str] = []
    executor = ProcessPoolExecutor(
        max_workers=min(jobs, len(queue)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(threads,),
    )
    running: dict = {}

    def forward(signum, frame):
        name = signal.Signals(signum).name
        if interrupted and name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        interrupted.append(name)
        say(f"received {name}: the running runs save a checkpoint and stop")
        for process in list(getattr(executor, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    try:
        while queue or running:
            while queue and len(running) < jobs and not interrupted:
                job = queue.pop(0)
                say(f"[{job.index}/{total}] {job.name}")
                running[executor.submit(_worker_run, run, job.config.as_dict())] = job
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                if not done(job, future.result()) and not interrupted:
                    interrupted.append("interrupted")
        executor.shutdown(wait=True)
    except BaseException:
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return interrupted[0] if interrupted else None
