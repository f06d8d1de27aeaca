"""Models: decoder-only LMs built from a few shape flags or loaded from a directory/hub id
(``causal``), and the seq2seq / encoder models of fine-tuning (``finetune``)."""

from samlm.models.causal import (
    ARCHITECTURES,
    build_decoder,
    count_parameters,
    estimate_parameters,
    lm_forward,
    load_causal_lm,
    load_model_config,
)

__all__ = [
    "ARCHITECTURES",
    "build_decoder",
    "count_parameters",
    "estimate_parameters",
    "lm_forward",
    "load_causal_lm",
    "load_model_config",
]
