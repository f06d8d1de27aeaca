"""Integrations with the tools users train with: torch.distributed / accelerate (``distributed``),
the Hugging Face Trainer (``hf``; TRL's ``SFTTrainer``: ``sft``) and experiment trackers (``tracking``)."""
