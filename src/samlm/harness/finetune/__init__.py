"""Fine-tune a T5 or an encoder classifier on GLUE/SuperGLUE/QA tasks, with or without SAM.

``config`` (the settings, the model's defaults), ``build`` (tasks, data, training stream,
evaluator, score) and ``run`` (:func:`prepare` then :func:`execute`). The command is
``samlm finetune`` (:mod:`samlm.cli.finetune`).

    from samlm.harness.finetune import FinetuneConfig, finetune
    summary = finetune(FinetuneConfig(model="t5-small", task="glue/rte", optimizer="sam", out="runs/rte"))
"""

from samlm.harness.finetune.build import overall_score
from samlm.harness.finetune.config import FinetuneConfig, config_from_args, resolve, validate
from samlm.harness.finetune.run import Plan, execute, prepare


def finetune(config: FinetuneConfig, *, on_step=None) -> dict:
    """Prepare and run one fine-tuning run; returns its summary (also ``OUT/summary.json``)."""
    return execute(prepare(config), on_step=on_step)


__all__ = [
    "FinetuneConfig",
    "Plan",
    "config_from_args",
    "execute",
    "finetune",
    "overall_score",
    "prepare",
    "resolve",
    "validate",
]
