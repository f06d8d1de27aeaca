"""The training loop shared by the harnesses (see :mod:`samlm.train.loop`)."""

from samlm.train.loop import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    LoopConfig,
    LoopResult,
    count_input_tokens,
    lm_evaluator,
    lower_is_better,
    train,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "METRICS_FILE",
    "LoopConfig",
    "LoopResult",
    "count_input_tokens",
    "lm_evaluator",
    "lower_is_better",
    "train",
]
