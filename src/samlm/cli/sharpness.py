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
import math
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.config import MODEL_DATA_FIELDS, SHAPE_FIELDS
from samlm.harness.pretrain.measure import measure as measure_run

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
    source.add_argument(
        "--run", dest="run_dir", metavar="DIR", help="a samlm pretrain run directory (its latest checkpoint)"
    )
    settings.add_arguments(parser, PretrainConfig, only=MODEL_DATA_FIELDS)
    group = parser.add_argument_group("measurement")
    group.add_argument(
        "--batches", type=int, default=None, help="validation batches (default: the run's --sharpness-batches, else 1)"
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per batch (default: the run's --sharpness-batch-size, else 8)",
    )
    group.add_argument("--iters", type=int, default=20, help="Lanczos / power iterations (default 20)")
    group.add_argument("--method", choices=("lanczos", "power"), default="lanczos")
    group.add_argument(
        "--rho",
        type=float,
        default=None,
        help="rho of the SAM path split (default: the run's --sharpness-rho, else 0.05)",
    )
    group.add_argument("--seed", type=int, default=0, help="start vector of the eigensolver")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags, then measure what they name (:func:`samlm.harness.pretrain.measure.measure`)."""
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
        settings.threads("--threads", args.threads)
        import torch

        torch.set_num_threads(args.threads)
    return measure_run(
        run_dir=args.run_dir and Path(args.run_dir),
        model_config=None if args.run_dir is not None else PretrainConfig(**model_data),
        batches=args.batches,
        batch_size=args.batch_size,
        iters=args.iters,
        seed=args.seed,
        rho=args.rho,
        method=args.method,
    )


def format_measurement(result: dict) -> str:
    where = f"run {result['run']} (step {result['step']})" if result.get("run") else f"model {result.get('model')}"
    lines = [
        f"{where}: {result['batches']} validation batch(es) x {result['batch_size']} sequences of "
        f"{result['context']} tokens, {result['method']}, rho={result.get('rho')}"
    ]
    width = max(len(label) for _, label in ROWS)
    for key, label in ROWS:
        if key in OPTIONAL_ROWS and key not in result:
            continue
        value = result.get(key)
        text = format(value, ".6g") if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        lines.append(f"  {label.ljust(width)}  {text}")
    lines.append(
        f"  {'iterations'.ljust(width)}  {result.get('iters')} (converged: {result.get('converged')}), "
        f"{result.get('seconds', 0):.1f} s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(format_measurement(result))
    if args.json:
        io.atomic_write_json(args.json, result)
        print(f"  written to {args.json}")
    return 0
