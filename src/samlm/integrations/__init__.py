"""Integrations with the tools users train with: torch.distributed / accelerate (``distributed``)
and the Hugging Face Trainer (``hf``)."""
