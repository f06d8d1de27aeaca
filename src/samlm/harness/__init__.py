"""The harness: the training loop and its run directory, and the two harnesses built on them,
pretraining (``pretrain``) and fine-tuning (``finetune``), with their settings."""
