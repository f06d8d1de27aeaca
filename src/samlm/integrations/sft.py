"""``SAMSFTTrainer``: TRL's ``SFTTrainer`` with SAM-family steps (needs ``trl``).

    from samlm.hf import SAMSFTTrainer   # or: from samlm.integrations.sft import SAMSFTTrainer
    trainer = SAMSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chat_data,
                            processing_class=tokenizer, sam_method="fsam", rho=0.05)

What SFTTrainer trains on survives: its collator's labels (prompt tokens masked with
``completion_only_loss``, non-assistant tokens with ``assistant_only_loss``) are the labels of
every SAM pass, token-weighted across micro-batches by ``num_items_in_batch`` as SFTTrainer
weights them. Its metrics are logged as in a plain run: ``num_tokens`` (the window's attention
mask), and ``entropy`` and ``mean_token_accuracy`` from the clean logits at w, computed as
SFTTrainer computes them (over the positions whose next-token label is not -100). When the step
saw only its ascent rows at w (SAM with ``ascent_fraction < 1`` and ``clean_loss`` unset), they
are logged as ``ascent_entropy`` and ``ascent_mean_token_accuracy``, beside ``ascent_loss``.

SFTTrainer's ``compute_loss`` is not called in the SAM step: it runs the model itself through
TRL's fused LM head, which never builds the logits, while SAM's passes need the loss as a
function of the logits at w and w+ε (and Functional-SAM its derivative r(w)). So
``loss_type="dft"`` or a ``compute_loss_func`` (another loss than the causal LM's) need
``sam_loss=fn(logits, batch)``; evaluation still goes through SFTTrainer's own ``compute_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from trl import SFTTrainer
from trl.trainer.utils import entropy_from_logits

from samlm.integrations.hf import SAMTrainerMixin

__all__ = ["SAMSFTTrainer"]


class SAMSFTTrainer(SAMTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` taking SAM-family steps; see the module docstring and
    :class:`samlm.integrations.hf.SAMTrainerMixin` for the SAM arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        custom = getattr(self.args, "loss_type", "nll") != "nll" or self.compute_loss_func is not None
        if custom and self.sam_loss is None:
            what = f"loss_type={self.args.loss_type!r}" if self.args.loss_type != "nll" else "compute_loss_func"
            raise ValueError(
                f"SAMSFTTrainer with {what} trains on another loss than the causal LM's: pass "
                "sam_loss=fn(logits, batch) -> mean loss, the same loss as a function of the logits"
            )
        self._sam_sft_sums = torch.zeros(3, dtype=torch.float64)  # entropy, correct, valid positions

    def sam_clean_outputs(self, logits: torch.Tensor, batch: Mapping) -> None:
        labels = batch.get("labels")
        if labels is None or logits.dim() != 3:
            return
        with torch.no_grad():
            logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
            mask = labels != -100
            entropy = (entropy_from_logits(logits) * mask).sum()
            correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
            self._sam_sft_sums += torch.stack([entropy, correct.to(entropy), mask.sum().to(entropy)]).double().cpu()

    def sam_clean_outputs_done(self, micro_batches: list, complete: bool) -> None:
        gather = self.accelerator.gather_for_metrics
        entropy, correct, valid = (gather(self._sam_sft_sums.to(self.args.device)).reshape(-1, 3).sum(0)).tolist()
        self._sam_sft_sums.zero_()
        prefix = "" if complete else "ascent_"
        metrics = self._metrics["train"]
        metrics[prefix + "entropy"].append(entropy / valid if valid > 0 else 0.0)
        metrics[prefix + "mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        tokens = 0
        for batch in micro_batches:
            if "attention_mask" in batch:
                tokens += int(gather(batch["attention_mask"].sum()).sum())
            elif "position_ids" in batch:  # padding-free batches
                tokens += int(gather(torch.tensor(batch["position_ids"].size(1), device=self.args.device)).sum())
        self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]
