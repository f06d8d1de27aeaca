"""Measuring a pretraining run's (or a causal LM's) sharpness after the fact: rebuild its model,
optimizer state and validation data from the run directory, then measure on fixed validation
batches with :func:`samlm.diagnostics.measure_sharpness` (``samlm sharpness``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain.build import (
    build_model,
    build_run_optimizer,
    load_data,
    sharpness_probe,
)
from samlm.harness.pretrain.config import PretrainConfig
from samlm.harness.rundir import CONFIG_FILE, RunDir


def read_run_config(run_dir: Path) -> tuple[dict, PretrainConfig]:
    """(``config.json``'s record, the run's settings) of a pretraining run directory; a missing
    directory, a file, no or an unreadable ``config.json`` is a one-line ``UserError``."""
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} not found")
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is a file, not a run directory")
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a samlm pretrain run (no {CONFIG_FILE})")
    try:
        record = json.loads(config_file.read_text())
        return record, PretrainConfig.from_mapping(record["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_file} is unreadable ({exc})") from None


def load_run(run_dir: Path):
    """(config, model with the latest checkpoint's weights, its optimizer (or None), dataset, checkpoint step)."""
    record, config = read_run_config(run_dir)
    checkpoint = io.load_latest_checkpoint(RunDir(run_dir).checkpoints)
    data = load_data(config, progress=False)
    dataset = data.dataset
    model = build_model(config, data.vocab_size)
    result = model.load_state_dict(checkpoint.model_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"checkpoint {checkpoint.path} does not match the run's model")
    total_steps = (record.get("resolved") or {}).get("total_steps") or config.steps or 1
    return config, model, _load_optimizer(config, model, checkpoint, total_steps), dataset, checkpoint.step


def _load_optimizer(config: PretrainConfig, model, checkpoint: io.Checkpoint, total_steps: int):
    """The run's optimizer holding the checkpoint's state (its second moments are P), or None when
    the state is not there or was saved sharded (FSDP: keyed by parameter name)."""
    extra = checkpoint.extra_state
    state = extra.get("optimizer") if isinstance(extra, Mapping) else None
    if not isinstance(state, Mapping) or state.get("sharded"):
        return None
    optimizer = build_run_optimizer(config, model, total_steps=total_steps)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(
            f"checkpoint {checkpoint.path} does not hold the state of the run's {config.optimizer} "
            f"optimizer ({type(exc).__name__})"
        ) from None
    return optimizer


def load_model(config: PretrainConfig):
    """(config, the ``config.model`` causal LM, dataset): a model without a run (no optimizer state)."""

    config = dataclasses.replace(config, tokenizer=config.tokenizer or config.model)
    settings.validate(config)
    data = load_data(config, progress=False)
    model = build_model(config, data.vocab_size)
    return config, model, data.dataset


def measure(
    *,
    run_dir: Path | None = None,
    model_config: PretrainConfig | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    iters: int = 20,
    seed: int = 0,
    rho: float | None = None,
    method: str = "lanczos",
) -> dict[str, Any]:
    """Measure a run (its latest checkpoint) or a model; the JSON-ready result. ``batches``,
    ``batch_size``, ``rho`` None: the run's own sharpness settings (a model: 1, 8, 0.05)."""
    if run_dir is not None:
        config, model, optimizer, dataset, step = load_run(Path(run_dir))
        source = {"run": str(run_dir), "step": step}
        defaults = (config.sharpness_batches, config.sharpness_batch_size, config.sharpness_rho)
    else:
        config, model, dataset = load_model(model_config)
        optimizer = None
        source = {"model": config.model, "step": None}
        defaults = (1, 8, 0.05)
    batches = batches or defaults[0]
    batch_size = batch_size or defaults[1]
    rho = rho if rho is not None else defaults[2]
    val = dataset.val_batches(batch_size, max_batches=batches)
    probe = sharpness_probe(val, iters=iters, seed=seed, rho=rho, method=method, optimizer=optimizer)
    values = probe(model)
    return io.json_safe(
        {
            **source,
            "data": config.data,
            "context": config.context,
            "batches": len(val),
            "batch_size": batch_size,
            "method": method,
            "iters_requested": iters,
            **values,
        }
    )
