"""Pretrain a decoder-only language model with AdamW or a SAM-family optimizer."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig, config_from_args, pretrain
from samlm.harness.rundir import SUMMARY_FILE
from samlm.progress import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, PretrainConfig)


def format_result(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines about a finished (or interrupted) run."""

    def num(key, fmt=".4f"):
        value = summary.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "n/a"

    lines = [
        f"{summary['optimizer']}"
        + (f" rho={summary['rho']:g}" if summary.get("rho") is not None else "")
        + f" seed={summary['seed']}: step {summary['step']}/{summary['steps']}"
        + ("" if summary.get("completed") else f" (stopped by {summary.get('interrupted')})"),
        f"  val loss {num('val_loss')} (ppl {num('val_ppl', '.6g')}), best {num('best_val_loss')}"
        f" at step {summary.get('best_val_loss_step')}, train loss {num('train_loss')}",
    ]
    if summary.get("hessian_lambda_max") is not None:
        lines.append(
            f"  lambda_max(H) {num('hessian_lambda_max', '.4g')}, lambda_max(GN) "
            f"{num('gauss_newton_lambda_max', '.4g')}, logit/functional path ratio "
            f"{num('logit_functional_ratio', '.3g')} (step {summary.get('sharpness_step')})"
        )
    if isinstance(summary.get("weight_noise"), Mapping):  # --robustness
        from samlm.cli.robustness import format_checkpoint

        lines.append("  robustness at " + format_checkpoint(summary).replace("\n", "\n  "))
    step_ms = summary.get("step_s")
    lines.append(
        f"  {step_ms * 1000:.1f} ms/step, {num('tokens_per_s', ',.0f')} tokens/s"
        if isinstance(step_ms, (int, float))
        else "  no steps taken"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from samlm.integrations.distributed import is_main_process

    config = config_from_args(args)
    summary = pretrain(config)
    if summary.get("dry_run"):
        if is_main_process():
            print(json.dumps(summary, indent=2, default=str))
            say(f"dry run: flags, data, model and {config.out} are fine; nothing was written")
        return 0
    if is_main_process():
        print(format_result(summary))
        print(f"  results: {Path(config.out) / SUMMARY_FILE}")
        if not summary.get("completed"):
            print(f"  resume with the same flags and --resume (out: {config.out})")
    return 0 if summary.get("completed") else 130
