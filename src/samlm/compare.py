"""Compare optimizers × ρ × seeds on the same model, data and step budget, with a report.

Each run is a :func:`samlm.train.pretrain.pretrain` run in ``OUT/<optimizer>-rho<ρ>-seed<s>/``
(AdamW has no ρ: ``OUT/adamw-seed<s>/``), run one after another so that step times are
comparable. A finished run (its ``summary.json`` says completed, with the same configuration) is
skipped, an interrupted one is resumed from its checkpoint; ``overwrite=True`` reruns everything.
Then ``OUT/report.md`` (table of mean ± std over seeds, plots), ``OUT/results.csv``,
``OUT/val_loss.png`` and ``OUT/sharpness.png`` are written by :mod:`samlm.report`.

ρ: one value for every SAM-family optimizer (``--rho 0.05``), a list (``--rho 0.02,0.05``: a
grid), or per optimizer (``--rho sam=0.02,fsam=0.1,pfsam=0.1``; repeat a name for a grid,
``sam=0.01,sam=0.02``; a bare value applies to the optimizers not named). Optimizers without a
value use their default (:data:`samlm.train.pretrain.DEFAULT_RHO`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from samlm import io, report
from samlm.errors import UserError
from samlm.progress import say
from samlm.train.loop import CHECKPOINTS_DIR
from samlm.train.pretrain import (
    DEFAULT_RHO,
    RESUMABLE_CHANGES,
    SUMMARY_FILE,
    PretrainConfig,
    add_model_data_arguments,
    add_training_arguments,
    config_from_args,
    pretrain,
    validate,
)

DEFAULT_OPTIMIZERS = ("adamw", "sam", "fsam", "pfsam")
# Settings that may differ between a finished run and the comparison asking for it.
_SKIP_IGNORES = RESUMABLE_CHANGES - {"steps", "tokens_per_param", "warmup"}


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UserError(f"--{what} must be a comma-separated list, got '{text}'")
    return items


def parse_optimizers(text: str | Sequence[str]) -> list[str]:
    from samlm.optim import OPTIMIZER_NAMES

    names = parse_list(text, "optimizers") if isinstance(text, str) else list(text)
    unknown = [n for n in names if n not in OPTIMIZER_NAMES]
    if unknown:
        raise UserError(f"unknown optimizer(s) {', '.join(unknown)} (choose from {', '.join(OPTIMIZER_NAMES)})")
    if len(set(names)) != len(names):
        raise UserError(f"--optimizers lists an optimizer twice: {','.join(names)}")
    return names


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    items = parse_list(text, "seeds") if isinstance(text, str) else list(text)
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise UserError(f"--seeds must be comma-separated integers >= 0, got '{text}'") from None
        if seed < 0:
            raise UserError(f"--seeds must be integers >= 0, got {seed}")
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _rho_value(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--rho: '{text}' is not a number (in '{spec}')") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--rho must be finite and >= 0, got {text}")
    return value


def parse_rho(spec: str | float | Mapping[str, Sequence[float] | float] | None,
              optimizers: Sequence[str]) -> dict[str, list[float | None]]:
    """ρ values per optimizer (AdamW: ``[None]``). See the module docstring for the syntax."""
    named: dict[str, list[float]] = {}
    bare: list[float] = []
    if isinstance(spec, Mapping):
        for name, values in spec.items():
            named[name] = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    elif isinstance(spec, (int, float)):
        bare = [float(spec)]
    elif spec is not None and str(spec).strip():
        for item in parse_list(spec, "rho"):
            if "=" in item:
                name, _, value = item.partition("=")
                named.setdefault(name.strip(), []).append(_rho_value(value.strip(), spec))
            else:
                bare.append(_rho_value(item, spec))
    for name in named:
        if name == "adamw":
            raise UserError("--rho: adamw has no perturbation radius")
        if name not in DEFAULT_RHO:
            raise UserError(f"--rho: unknown optimizer '{name}' (SAM family: {', '.join(DEFAULT_RHO)})")
        if name not in optimizers:
            raise UserError(f"--rho gives a value for {name}, which is not in --optimizers ({','.join(optimizers)})")
    result: dict[str, list[float | None]] = {}
    for name in optimizers:
        if name == "adamw":
            result[name] = [None]
            continue
        values = named.get(name) or bare or [DEFAULT_RHO[name]]
        result[name] = list(dict.fromkeys(values))  # dedupe, keep order
    return result


def run_name(optimizer: str, rho: float | None, seed: int) -> str:
    return f"{optimizer}-seed{seed}" if rho is None else f"{optimizer}-rho{rho:g}-seed{seed}"


@dataclass
class CompareConfig:
    """What ``samlm compare`` runs: ``base`` (model, data, budget, loop) for every run."""

    out: str = "runs/compare"
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS
    seeds: Sequence[int] = (0,)
    rho: str | float | Mapping | None = None
    base: PretrainConfig = field(default_factory=PretrainConfig)
    overwrite: bool = False
    title: str = "samlm compare"
    notes: str = ""
    jobs: int = 1                        # runs at a time (worker processes); 1: one after another

    def plan(self) -> list[tuple[str, PretrainConfig]]:
        """(run name, config) of every run, seed by seed (a partial comparison has every optimizer)."""
        optimizers = parse_optimizers(self.optimizers)
        seeds = parse_seeds(self.seeds)
        rhos = parse_rho(self.rho, optimizers)
        runs = []
        for seed in seeds:
            for optimizer in optimizers:
                for rho in rhos[optimizer]:
                    name = run_name(optimizer, rho, seed)
                    out = Path(self.out) / name
                    # Resume where a checkpoint exists; otherwise start clean (a run killed before
                    # its first checkpoint leaves only a partial metrics.jsonl behind).
                    resume = not self.overwrite and bool(io.checkpoint_dirs(out / CHECKPOINTS_DIR))
                    config = dataclasses.replace(
                        self.base, optimizer=optimizer, rho=rho, seed=seed, out=str(out),
                        resume=resume, overwrite=not resume)
                    runs.append((name, config))
        return runs


@dataclass
class CompareResult:
    out: Path
    summaries: dict[str, dict]           # run name -> summary (finished runs)
    skipped: list[str]                   # finished before this call
    unfinished: list[str]                # not (yet) completed
    files: dict[str, Path]               # report files
    table: str                           # the terminal table
    interrupted: str | None = None
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        return not self.unfinished


def _finished(config: PretrainConfig) -> dict | None:
    """The summary of a completed run with the same configuration in ``config.out``, else None."""
    path = Path(config.out) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(summary, dict) and summary.get("completed")):
        return None
    saved = {k: v for k, v in summary.get("config", {}).items() if k not in _SKIP_IGNORES}
    wanted = {k: v for k, v in config.as_dict().items() if k not in _SKIP_IGNORES}
    return summary if saved == wanted else None


# Relative cost of a step (forward+backward passes, ascent fraction 0.25), to start the most
# expensive runs first when several run in parallel.
_STEP_COST = {"adamw": 1.0, "sam": 1.25, "asam": 1.25, "psam": 1.25, "fsam": 1.5, "pfsam": 1.5}


def compare(config: CompareConfig, *, on_run: Callable[[str, dict], None] | None = None) -> CompareResult:
    """Run every (optimizer, ρ, seed) of ``config`` that is not finished yet, then write the report.

    ``config.jobs`` > 1 runs that many at a time in worker processes (each with
    ``base.threads`` torch threads), longest first.
    """
    started = time.perf_counter()
    plan = config.plan()
    for _, run_config in plan:
        validate(run_config)
    if not isinstance(config.jobs, int) or config.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {config.jobs!r}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    summaries: dict[str, dict] = {}
    skipped: list[str] = []
    todo: list[tuple[int, str, PretrainConfig]] = []
    for index, (name, run_config) in enumerate(plan, start=1):
        finished = None if config.overwrite else _finished(run_config)
        if finished is not None:
            say(f"[{index}/{len(plan)}] {name}: finished earlier, skipped")
            summaries[name] = finished
            skipped.append(name)
        else:
            todo.append((index, name, run_config))

    def done(index: int, name: str, summary: dict) -> bool:
        if on_run is not None:
            on_run(name, summary)
        if not summary.get("completed"):
            say(f"{name} stopped at step {summary.get('step')}: run the same command again to resume")
            return False
        summaries[name] = summary
        say(f"[{index}/{len(plan)}] {name}: val loss {summary.get('val_loss'):.4f}, "
            f"{(summary.get('step_s') or 0) * 1000:.1f} ms/step")
        return True

    if config.jobs == 1 or len(todo) <= 1:
        interrupted = _run_sequentially(todo, len(plan), done)
    else:
        interrupted = _run_in_parallel(todo, len(plan), done, config.jobs)
    unfinished = [name for name, _ in plan if name not in summaries]
    runs = [report.load_run(out / name) for name, _ in plan if name in summaries]
    files = report.write_report(out, runs, title=config.title, notes=config.notes, unfinished=unfinished)
    table = report.text_table(report.aggregate(runs))
    return CompareResult(out=out, summaries=summaries, skipped=skipped, unfinished=unfinished, files=files,
                         table=table, interrupted=interrupted, seconds=time.perf_counter() - started)


def _run_sequentially(todo, total: int, done) -> str | None:
    for index, name, run_config in todo:
        say(f"[{index}/{total}] {name}")
        summary = pretrain(run_config)
        if not done(index, name, summary):
            return summary.get("interrupted") or "interrupted"
    return None


# ---- parallel runs: worker processes in their own process group, so that a Ctrl-C reaches only
# the parent, which forwards exactly one SIGINT to each busy worker (two would abort its step).

_STOP_REQUESTED = False


def _worker_init(threads: int | None) -> None:
    global _STOP_REQUESTED
    _STOP_REQUESTED = False
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


def _worker_run(config_dict: dict) -> dict:
    def on_step(step, stats):
        global _STOP_REQUESTED
        if _STOP_REQUESTED:  # asked to stop before the loop listened: pass it on to the loop
            _STOP_REQUESTED = False
            os.kill(os.getpid(), signal.SIGINT)

    if _STOP_REQUESTED:
        return {"completed": False, "interrupted": "SIGINT", "step": 0}
    config = PretrainConfig.from_mapping(config_dict)
    return pretrain(dataclasses.replace(config, progress=False), on_step=on_step)


def _run_in_parallel(todo, total: int, done, jobs: int) -> str | None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    queue = sorted(todo, key=lambda item: -_STEP_COST.get(item[2].optimizer, 1.0))  # longest first
    threads = queue[0][2].threads
    interrupted: list[str] = []
    executor = ProcessPoolExecutor(max_workers=min(jobs, len(queue)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(threads,))
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

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    try:
        while queue or running:
            while queue and len(running) < jobs and not interrupted:
                index, name, run_config = queue.pop(0)
                say(f"[{index}/{total}] {name}")
                running[executor.submit(_worker_run, run_config.as_dict())] = (index, name)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                index, name = running.pop(future)
                if not done(index, name, future.result()) and not interrupted:
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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("comparison")
    group.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                       help=f"comma-separated (default {','.join(DEFAULT_OPTIMIZERS)})")
    group.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    group.add_argument("--rho", default=None,
                       help="one value, a list (0.02,0.05), or per optimizer (sam=0.02,fsam=0.1,pfsam=0.1)")
    group.add_argument("--out", default=CompareConfig.out, help="directory of the runs and the report")
    group.add_argument("--overwrite", action="store_true", help="rerun finished runs too")
    group.add_argument("--title", default=CompareConfig.title, help="report title")
    group.add_argument("--jobs", type=int, default=1,
                       help="runs at a time, in worker processes (default 1: one after another, so step "
                            "times are comparable); use with --threads")
    add_model_data_arguments(parser)
    add_training_arguments(parser, single_run=False)


def config_from_cli(args: argparse.Namespace) -> CompareConfig:
    base = config_from_args(args, out=args.out, resume=False, overwrite=False)
    return CompareConfig(out=args.out, optimizers=args.optimizers, seeds=args.seeds, rho=args.rho, base=base,
                         overwrite=args.overwrite, title=args.title, jobs=args.jobs)


def print_result(result: CompareResult) -> None:
    print(result.table)
    print()
    for key in ("report", "csv", "val_loss", "sharpness"):
        if key in result.files:
            print(f"{key:>10}: {result.files[key]}")
    if result.unfinished:
        print(f"unfinished runs: {', '.join(result.unfinished)} (run the same command again to resume)")


def run(args: argparse.Namespace) -> int:
    result = compare(config_from_cli(args))
    print_result(result)
    print(f"took {result.seconds:.0f} s")
    return 130 if result.interrupted else 0
