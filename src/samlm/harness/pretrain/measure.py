"""A finished pretraining run read back (``config.json``, its model, a checkpoint's weights; what
``samlm sharpness`` and ``samlm robustness`` measure), and its (or a causal LM's) sharpness after
the fact: measured on fixed validation batches with :func:`samlm.diagnostics.measure_sharpness`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain.build import RunData, build_model, load_data, sharpness_probe
from samlm.harness.pretrain.config import PretrainConfig
from samlm.harness.rundir import CONFIG_FILE, RunDir


def read_run_config(run_dir: Path) -> tuple[dict, PretrainConfig]:
    """(``config.json``'s record, the run's settings) of a pretraining run directory; a missing
    directory, a file, no or an unreadable ``config.json`` is a one-line ``UserError``."""
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} not found")
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is a file, not a run directory")
    record = RunDir(run_dir).read_record("pretrain")
    if record is None:
        raise UserError(f"{run_dir} is not a samlm pretrain run (no {CONFIG_FILE})")
    try:
        return record, PretrainConfig.from_mapping(record["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run_dir / CONFIG_FILE} is unreadable ({exc})") from None


def build_run(config: PretrainConfig) -> tuple[RunData, Any]:
    """The run's data (read quietly) and a model of its shape, to load a checkpoint's weights into."""
    data = load_data(config, progress=False)
    return data, build_model(config, data.vocab_size)


def load_weights(model, checkpoint: io.Checkpoint) -> None:
    """The checkpoint's weights into the run's ``model``; another model's is a one-line ``UserError``."""
    loaded = model.load_state_dict(checkpoint.model_state, strict=False)
    if loaded.missing_keys or loaded.unexpected_keys:
        raise UserError(f"checkpoint {checkpoint.path} does not match the run's model")


def load_run(run_dir: Path):
    """(config, model with the latest checkpoint's weights, its optimizer (or None), dataset, checkpoint step)."""
    record, config = read_run_config(run_dir)
    checkpoint = io.load_latest_checkpoint(RunDir(run_dir).checkpoints)
    data, model = build_run(config)
    load_weights(model, checkpoint)
    total_steps = (record.get("resolved") or {}).get("total_steps") or config.steps or 1
    return config, model, _load_optimizer(config, model, checkpoint, total_steps), data.dataset, checkpoint.step


def _load_optimizer(config: PretrainConfig, model, checkpoint: io.Checkpoint, total_steps: int):
    """The run's optimizer holding the checkpoint's state (its second moments are P), or None when
    the state is not there or was saved sharded (FSDP: keyed by parameter name)."""
    extra = checkpoint.extra_state
    state = extra.get("optimizer") if isinstance(extra, Mapping) else None
    if not isinstance(state, Mapping) or state.get("sharded"):
        return None
    optimizer = settings.build_run_optimizer(config, model, total_steps=total_steps)
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
    data, model = build_run(config)
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
        assert model_config is not None  # a run_dir or a model_config (samlm sharpness passes one)
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
