"""Measure a trained run's robustness: weight noise, int8/int4 quantization and forgetting.

``samlm robustness --run DIR`` loads the latest checkpoint of a ``samlm pretrain`` run (every kept
checkpoint with ``--all-checkpoints``, oldest first, so that a gap along training shows), rebuilds
its model and validation data from ``DIR/config.json`` and measures, on the run's own validation
batches (:mod:`samlm.harness.pretrain.robustness`, formulas in docs/robustness.md):

* weight noise: Δloss under W + σ·rms(W)·z per tensor, mean ± std over seeded draws, per σ;
* quantization: Δloss under weight-only round-to-nearest int8 (per output channel) and int4
  (group-wise) of the linear layers;
* forgetting: AdamW fine-tuning runs on a second corpus (``--forget-data``, default the built-in
  ``python-stdlib``) at each lr of ``--forget-lrs``, as resumable run directories under
  ``DIR/robustness/``; the original corpus's loss increase at a matched learning level.

The robustness settings default to the run's own (``pretrain --robustness ...``), else the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.harness import settings
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.robustness import FIELDS

MEASURE_FIELDS = tuple(name for name in FIELDS if name != "robustness")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to measure")
    group.add_argument("--run", dest="run_dir", metavar="DIR", required=True, help="a samlm pretrain run directory")
    group.add_argument(
        "--all-checkpoints", action="store_true", help="every kept checkpoint (oldest first), not only the latest"
    )
    group.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    settings.add_arguments(parser, PretrainConfig, only=MEASURE_FIELDS + ("threads",))


def _num(value: Any, fmt: str = "+.4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def format_checkpoint(result: Mapping[str, Any]) -> str:
    lines = [f"step {result.get('step')}:"]
    noise = result.get("weight_noise") or {}
    if noise:
        lines.append(f"  base val loss {_num(noise.get('base_loss'), '.4f')} on {noise.get('batches')} batches")
        for sigma, mean, std in zip(noise.get("sigmas", []), noise.get("delta_mean", []), noise.get("delta_std", [])):
            lines.append(
                f"  weight noise sigma={sigma:g}: dloss {_num(mean)} +- {_num(std, '.4f')} ({noise.get('draws')} draws)"
            )
    quant = result.get("quantization") or {}
    for fmt in ("int8", "int4"):
        if isinstance(quant.get(fmt), Mapping):
            group = "" if fmt == "int8" else f", groups of {quant.get('group_size')}"
            lines.append(
                f"  {fmt} RTN{group}: dloss {_num(quant[fmt].get('delta'))} ({quant[fmt].get('tensors')} tensors)"
            )
    forget = result.get("forgetting")
    if isinstance(forget, Mapping) and forget.get("interrupted"):
        lines.append(f"  forgetting: stopped ({forget['interrupted']}) in {forget.get('run')}")
    elif isinstance(forget, Mapping):
        before = forget.get("before") or {}
        lines.append(
            f"  forgetting on {forget.get('data')} ({forget.get('steps')} AdamW steps per lr): before "
            f"{_num(before.get('learning'), '.4f')} (second corpus), {_num(before.get('original'), '.4f')} "
            "(original)"
        )
        for point in forget.get("points", []):
            lines.append(
                f"    lr {point['lr']:g}: second corpus {_num(point['learning'], '.4f')}, original "
                f"{_num(point['original'], '.4f')} ({_num(point['increase'])})"
            )
        lines.append(
            f"    original-loss increase at learning level {_num(forget.get('target'), '.4f')}: "
            f"{_num(forget.get('increase'))}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from samlm.harness.pretrain.robustness import interrupted, measure_run

    overrides = settings.given(args, PretrainConfig)
    threads = overrides.pop("threads", None)
    if threads is not None:
        settings.threads("--threads", threads)
        import torch

        torch.set_num_threads(threads)
    result = measure_run(Path(args.run_dir), overrides=overrides, all_checkpoints=args.all_checkpoints)
    print(f"run {result['run']}")
    for checkpoint in result["checkpoints"]:
        print(format_checkpoint(checkpoint))
    if args.json:
        io.atomic_write_json(args.json, result)
        print(f"  written to {args.json}")
    stopped = interrupted(result)
    if stopped:
        print(f"  stopped by {stopped}: run the same command again to continue")
        return 130
    return 0
