"""Measure the sharpness of a trained model: λ_max of the Hessian and Gauss-Newton matrix, SAM path norms.

``samlm sharpness --run DIR`` loads the latest checkpoint of a ``samlm pretrain`` run (and
rebuilds its model, optimizer and validation data from ``DIR/config.json``); ``--model DIR_OR_HUB_ID``
loads a causal LM (with ``--data``, ``--tokenizer``, ``--context``). Measured with
:func:`samlm.diagnostics.sharpness.measure_sharpness` on the first ``--batches`` validation batches of
``--batch-size`` sequences (fixed, the same ones the run's own measurements use), in fp32 and
eval mode: λ_max(H) and λ_max(GN) by Lanczos (or power iteration) on Hessian / Gauss-Newton
vector products, λ_max of the functional Hessian, and SAM's logit/functional path norms at ρ.
With ``--run``, also the preconditioned λ_max(P^{-1/2} H P^{-1/2}), P = √v̂ + eps from the checkpoint's
optimizer state (left out for ``--model``, SGD, or optimizer state saved sharded under FSDP).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.build import (build_model, build_run_optimizer, load_dataset, resolve_tokenizer_name,
                                          sharpness_probe)
from samlm.harness.pretrain.config import MODEL_DATA_FIELDS, SHAPE_FIELDS
from samlm.harness.rundir import CONFIG_FILE, RunDir

ROWS = (
    ("hessian_lambda_max", "lambda_max(H)  Hessian"),
    ("gauss_newton_lambda_max", "lambda_max(GN) Gauss-Newton"),
    ("functional_lambda", "lambda_max(H_F) functional Hessian"),
    ("functional_lambda_min", "lambda_min(H_F)"),
    ("preconditioned_lambda_max", "lambda_max(P^-1/2 H P^-1/2) preconditioned"),
    ("logit_path_norm", "|delta_logit|  logit path"),
    ("functional_path_norm", "|delta_func|   functional path"),
    ("logit_functional_ratio", "logit/functional ratio"),
    ("grad_norm", "|g|"),
    ("loss", "loss on these batches"),
)
OPTIONAL_ROWS = {"preconditioned_lambda_max"}  # printed only when measured


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to measure (one of)")
    source.add_argument("--run", dest="run_dir", metavar="DIR", help="a samlm pretrain run directory (its latest checkpoint)")
    settings.add_arguments(parser, PretrainConfig, only=MODEL_DATA_FIELDS)
    group = parser.add_argument_group("measurement")
    group.add_argument("--batches", type=int, default=None,
                       help="validation batches (default: the run's --sharpness-batches, else 1)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="sequences per batch (default: the run's --sharpness-batch-size, else 8)")
    group.add_argument("--iters", type=int, default=20, help="Lanczos / power iterations (default 20)")
    group.add_argument("--method", choices=("lanczos", "power"), default="lanczos")
    group.add_argument("--rho", type=float, default=None,
                       help="rho of the SAM path split (default: the run's --sharpness-rho, else 0.05)")
    group.add_argument("--seed", type=int, default=0, help="start vector of the eigensolver")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _load_run(run_dir: Path):
    """(config, model with the latest checkpoint's weights, its optimizer (or None), dataset, checkpoint step)."""
    from samlm.data.text import load_tokenizer, tokenizer_vocab_size

    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a samlm pretrain run (no {CONFIG_FILE})")
    try:
        record = json.loads(config_file.read_text())
        config = PretrainConfig.from_mapping(record["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_file} is unreadable ({exc})") from None
    checkpoint = io.load_latest_checkpoint(RunDir(run_dir).checkpoints)
    tokenizer = load_tokenizer(resolve_tokenizer_name(config), trust_remote_code=config.trust_remote_code)
    dataset = load_dataset(config, tokenizer)
    model = build_model(config, tokenizer_vocab_size(tokenizer))
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
    optimizer = build_run_optimizer(config, model.parameters(), total_steps=total_steps)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"checkpoint {checkpoint.path} does not hold the state of the run's {config.optimizer} "
                        f"optimizer ({type(exc).__name__})") from None
    return optimizer


def _load_model(args):
    from samlm.data.text import load_tokenizer, tokenizer_vocab_size

    given = settings.given(args, PretrainConfig)
    config = PretrainConfig(**dict(given, tokenizer=given.get("tokenizer") or given["model"]))
    settings.validate(config)
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    dataset = load_dataset(config, tokenizer)
    model = build_model(config, tokenizer_vocab_size(tokenizer))
    return config, model, dataset


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load what ``args`` names and measure it; returns the JSON-ready result."""
    model_data = settings.given(args, PretrainConfig)
    if (args.run_dir is None) == (model_data.get("model") is None):
        raise UserError("give exactly one of --run DIR or --model DIR_OR_HUB_ID")
    if args.run_dir is not None:
        given = [settings.flag(PretrainConfig, k) for k in SHAPE_FIELDS if k in model_data]
        if given:
            raise UserError(f"--run rebuilds the run's own model: {', '.join(given)} do not apply")
    for name in ("batches", "batch_size", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.rho is not None and not (math.isfinite(args.rho) and args.rho > 0):
        raise UserError(f"--rho must be a finite number > 0, got {args.rho}")
    if not 0 <= args.seed < 2**63:  # torch generators take a 64-bit signed seed
        raise UserError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)

    if args.run_dir is not None:
        config, model, optimizer, dataset, step = _load_run(Path(args.run_dir))
        source = {"run": str(args.run_dir), "step": step}
        defaults = (config.sharpness_batches, config.sharpness_batch_size, config.sharpness_rho)
    else:
        config, model, dataset = _load_model(args)
        optimizer = None
        source = {"model": model_data["model"], "step": None}
        defaults = (1, 8, 0.05)
    batches = args.batches or defaults[0]
    batch_size = args.batch_size or defaults[1]
    rho = args.rho if args.rho is not None else defaults[2]
    val = dataset.val_batches(batch_size, max_batches=batches)
    probe = sharpness_probe(val, iters=args.iters, seed=args.seed, rho=rho, method=args.method, optimizer=optimizer)
    values = probe(model)
    return io.json_safe({
        **source, "data": config.data, "context": config.context, "batches": len(val), "batch_size": batch_size,
        "method": args.method, "iters_requested": args.iters, **values,
    })


def format_measurement(result: dict) -> str:
    where = f"run {result['run']} (step {result['step']})" if result.get("run") else f"model {result.get('model')}"
    lines = [f"{where}: {result['batches']} validation batch(es) x {result['batch_size']} sequences of "
             f"{result['context']} tokens, {result['method']}, rho={result.get('rho')}"]
    width = max(len(label) for _, label in ROWS)
    for key, label in ROWS:
        if key in OPTIONAL_ROWS and key not in result:
            continue
        value = result.get(key)
        text = format(value, ".6g") if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        lines.append(f"  {label.ljust(width)}  {text}")
    lines.append(f"  {'iterations'.ljust(width)}  {result.get('iters')} (converged: {result.get('converged')}), "
                 f"{result.get('seconds', 0):.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(format_measurement(result))
    if args.json:
        io.atomic_write_json(args.json, result)
        print(f"  written to {args.json}")
    return 0
