"""Equal compute by the clock: the ``time`` budget of a comparison (``--budget time``).

The FLOP model (``Method.step_cost``, :func:`samlm.studies.grid.compute_factors`) transfers across
machines, but a step's measured time also holds what the model leaves out (the perturbation and its
restore, the optimizer's own arithmetic, small kernels), so the SAM family's steps are slower than
modelled, most at small sizes. The clock budget gives each method the steps that make its *measured*
time equal the costliest method's measured time, on this machine.

The measurement is a short calibration before the comparison's runs, in its process: every method
of the comparison, on the run's own model, data, batch and precision, steps side by side in
:func:`samlm.studies.bench.round_robin` (the timer of ``samlm bench``: rounds in a fresh order, each
a whole cycle of every method's SAM schedule, untimed rounds first); a method's ratio is the median
of its per-round ratios to the reference (the first method, AdamW where it runs), so that a drift in
the machine's speed hits every method alike. The result is stored in ``OUT/calibration.json`` with
what it was measured on, and reused as long as that is the same: a resumed comparison keeps its
runs' step counts (only ``--overwrite`` measures again).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.progress import say
from samlm.studies.grid import method_cost, parse_method

CALIBRATION_FILE = "calibration.json"
FORMAT = "samlm-clock-calibration"
CLOCK_SUFFIX = "-equal-clock"
ROUNDS = 10  # timed rounds per method
UNTIMED = 3  # warm-up rounds (allocator, caches, compile) before them
BATCHES = 4  # distinct batches the rounds cycle through
# The run settings a step's time depends on: a calibration is reused only while they are the same.
TIMING_FIELDS = (
    "arch",
    "layers",
    "width",
    "heads",
    "context",
    "model",
    "data",
    "tokenizer",
    "max_chars",
    "batch",
    "grad_accum",
    "dropout",
    "base",
    "ascent_fraction",
    "m",
    "device",
    "mixed_precision",
    "compile",
    "strategy",
)  # not --threads or --jobs: a comparison continued with others keeps its runs' steps


def identity(configs: Mapping[str, Any]) -> dict:
    """What a calibration of ``configs`` (method label -> the run settings of its runs) was measured on."""
    first = next(iter(configs.values())).as_dict()
    record = {
        "methods": {label: {"optimizer": c.optimizer, "sam_every": c.sam_every} for label, c in configs.items()},
        **{key: first.get(key) for key in TIMING_FIELDS},
    }
    return json.loads(json.dumps(record))  # as the file holds it (tuples as lists)


def check(configs: Mapping[str, Any]) -> None:
    """The clock budget's own checks: two methods or more, and whole SAM cycles to time."""
    if len(configs) < 2:
        raise UserError(
            "--budget time equalises measured step times between methods: it needs two or more optimizers, "
            f"got {', '.join(configs) or 'none'}"
        )
    if any(float(c.sam_start or 0) for c in configs.values()):
        raise UserError(
            "--budget time with --sam-start: the calibration times whole SAM cycles, not a run's plain start; "
            "use --budget compute"
        )


def stored(out: str | Path, configs: Mapping[str, Any]) -> dict | None:
    """The calibration in ``out`` if it was measured on the same settings, else None."""
    path = Path(out) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("format") == FORMAT and record.get("identity") == identity(configs)
    return record if ok else None


def calibrate(
    out: str | Path,
    configs: Mapping[str, Any],
    *,
    overwrite: bool = False,
    rounds: int = ROUNDS,
    untimed: int = UNTIMED,
) -> dict:
    """The stored calibration of ``configs`` in ``out``, else a fresh one (measured and stored)."""
    check(configs)
    record = None if overwrite else stored(out, configs)
    if record is not None:
        say(f"clock budget: the calibration in {Path(out) / CALIBRATION_FILE} (measured earlier)")
        return record
    say(f"clock budget: timing {', '.join(configs)} side by side ({untimed} + {rounds} rounds)")
    record = measure(configs, rounds=rounds, untimed=untimed)
    Path(out).mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(Path(out) / CALIBRATION_FILE, record)
    say(
        "clock budget: step time over "
        + record["reference"]
        + "'s: "
        + ", ".join(f"{label} {row['ratio']:.2f}x" for label, row in record["methods"].items())
    )
    return record


def measure(configs: Mapping[str, Any], *, rounds: int = ROUNDS, untimed: int = UNTIMED) -> dict:
    """Time one step of every method (label -> run settings) side by side on the runs' model and data."""
    import torch

    from samlm.data import lm_loss
    from samlm.harness import parallel
    from samlm.harness.pretrain.build import build_model, load_data
    from samlm.harness.settings import build_run_optimizer
    from samlm.models import lm_forward
    from samlm.optim import train_step
    from samlm.optim.registry import method
    from samlm.studies.bench import machine_description, round_robin

    started = time.perf_counter()
    first = next(iter(configs.values()))
    threads = torch.get_num_threads()
    if first.threads:
        torch.set_num_threads(first.threads)  # the runs' own threads
    try:
        info = parallel.setup(first.device)
        data = load_data(first, progress=False)
        per_round = math.lcm(*(cycle(label, c) for label, c in configs.items()))
        source = data.dataset.train_batches(first.micro_batch, seed=first.seed)
        batches = [[_to_device(next(source), info.device) for _ in range(first.grad_accum)] for _ in range(BATCHES)]
        total = (untimed + rounds) * per_round

        def stepper(config):
            # the schedule's first lr: timing does not depend on it, and a peak lr without warmup may diverge
            start_lr = None if config.lr is None else config.lr * config.min_lr_ratio
            config = dataclasses.replace(config, lr=start_lr, sam_start=0)
            par = parallel.parallelize(
                build_model(config, data.vocab_size),
                info,
                strategy=config.strategy,
                sync_ascent=config.sync_ascent,
                mixed_precision=config.mixed_precision,
                sam=method(config.optimizer).is_sam,
            )
            optimizer = build_run_optimizer(config, par.module, total_steps=total, sam_kwargs=par.sam_kwargs)
            forward = lm_forward(torch.compile(par.model) if config.compile else par.model)
            kwargs = par.step_kwargs or {}

            def step(k: int) -> None:
                batch = batches[k % len(batches)]
                train_step(optimizer, batch if len(batch) > 1 else batch[0], forward, lm_loss, **kwargs)

            return step

        steps = {label: stepper(config) for label, config in configs.items()}
        times = round_robin(steps, rounds=rounds, untimed=untimed, per_round=per_round, device=str(info.device))
        machine = machine_description(str(info.device))
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    reference = next(iter(configs))
    methods = {}
    for label, config in configs.items():
        ratio = statistics.median(t / r for t, r in zip(times[label], times[reference]))
        model = method_cost(label, config.ascent_fraction, sam_every=config.sam_every) / method_cost(
            reference, first.ascent_fraction, sam_every=first.sam_every
        )
        methods[label] = {
            "step_s": round(statistics.median(times[label]), 6),
            "ratio": round(ratio, 4),
            "model": round(model, 4),
        }
    return {
        "format": FORMAT,
        "identity": identity(configs),
        "reference": reference,
        "methods": methods,
        "rounds": rounds,
        "untimed_rounds": untimed,
        "steps_per_round": per_round,
        "machine": machine,
        "threads": used_threads,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }


def cycle(label: str, config: Any) -> int:
    """Steps per SAM step of a method's runs: its ``sam_every`` × LookSAM's ``look_every``."""
    from samlm.optim.registry import METHODS

    entry = METHODS[parse_method(label)[0]]
    looks = hasattr(entry.cls, "default_look_every")  # LookSAM: its period is the run's --look-every
    return int(config.sam_every) * (int(config.look_every) if looks else 1) if entry.is_sam else 1


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) if hasattr(v, "to") else v for v in batch)
    return batch.to(device)


def time_factors(record: Mapping[str, Any]) -> dict[str, float]:
    """Steps multiplier of each method under the clock budget: the costliest method's measured
    step time over its own (the measured ratios are per round against one reference)."""
    ratios = {label: float(row["ratio"]) for label, row in record["methods"].items()}
    most = max(ratios.values())
    return {label: round(most / ratio, 4) for label, ratio in ratios.items()}


def calibration_table(record: Mapping[str, Any], steps: Mapping[str, Any] | None = None) -> str:
    """Markdown: each method's median step time, its measured and modelled ratio to the reference,
    their quotient and the steps the clock budget gives it (``steps``: label -> steps, where known)."""
    factors = time_factors(record)
    reference = record.get("reference", "?")
    lines = [
        f"| method | median step (ms) | ratio to {reference} (measured) | ratio (model) | measured / model | "
        "steps factor (clock) | steps (equal compute (clock)) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in record["methods"].items():
        model = row.get("model")
        quotient = f"{row['ratio'] / model:.2f}" if model else "n/a"
        cells = [
            label,
            f"{row['step_s'] * 1000:.2f}",
            f"{row['ratio']:.2f}x",
            "n/a" if model is None else f"{model:.3g}x",
            quotient,
            f"{factors[label]:.3f}",
            str((steps or {}).get(label, "–")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_section(
    record: Mapping[str, Any], steps: Mapping[str, Any] | None = None, heading: str = "##"
) -> list[str]:
    """The report's section on the clock budget's calibration (``heading``: its Markdown level)."""
    return [
        f"{heading} Equal compute by the clock: the calibration",
        "",
        "**Equal compute (clock)** gives every method the steps whose *measured* time on this machine equals "
        "the costliest method's; **equal compute (model)** gives it the steps whose modelled forward+backward "
        "compute does (a backward counted as 2 forwards; it transfers across machines, the clock does not). The "
        f"step times below were measured before the runs, in one process ({record.get('machine', '?')}, "
        f"torch {record.get('torch', '?')}): every method on the "
        f"runs' model, data and batch, {record.get('untimed_rounds', '?')} untimed then {record.get('rounds', '?')} "
        f"timed rounds of {record.get('steps_per_round', '?')} step(s) each (a whole cycle of every SAM schedule), "
        "side by side in a fresh order each round; the ratio is the median of the per-round ratios "
        f"(`{CALIBRATION_FILE}`, reused on resume). measured / model > 1: the method's steps cost more time "
        "than its passes count.",
        "",
        calibration_table(record, steps),
        "",
    ]
