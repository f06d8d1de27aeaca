"""Pretrain a decoder-only language model with AdamW or a SAM-family optimizer.

``config`` (the settings), ``build`` (data, model, budget, schedule, sharpness probe) and
``run`` (:func:`pretrain`: one run, its run directory and summary). The command is
``samlm pretrain`` (:mod:`samlm.cli.pretrain`).

    from samlm.harness.pretrain import PretrainConfig, pretrain
    summary = pretrain(PretrainConfig(optimizer="fsam", rho=0.1, steps=400, out="runs/fsam"))
"""

from samlm.harness.pretrain import robustness  # noqa: F401  (registers the --robustness run hook)
from samlm.harness.pretrain.config import PretrainConfig, config_from_args, validate
from samlm.harness.pretrain.run import TIMING_KEYS, pretrain

__all__ = ["PretrainConfig", "TIMING_KEYS", "config_from_args", "pretrain", "validate"]
