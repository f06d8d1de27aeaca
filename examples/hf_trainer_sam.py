"""Fine-tune a causal LM with the Hugging Face Trainer plus SAM or Functional-SAM.

    python examples/hf_trainer_sam.py --method fsam          # runs offline on CPU in seconds
    torchrun --nproc_per_node 2 examples/hf_trainer_sam.py   # DDP: per-replica ε, one all-reduce per step

It builds a tiny GPT-2 from a config and trains it on bytes of the Shakespeare text shipped
with samlm, so it needs no download. To fine-tune a real checkpoint instead, replace the
model and data lines with, e.g.::

    tokenizer = AutoTokenizer.from_pretrained("gpt2")
    model = AutoModelForCausalLM.from_pretrained("gpt2")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]

and use ``bf16=True`` (or ``fp16=True``) in TrainingArguments on a GPU.
"""

import argparse
from importlib import resources

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from samlm.integrations.hf import SAMTrainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fsam", choices=["sam", "asam", "fsam", "psam", "pfsam"])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/hf_trainer_sam")
    cli = parser.parse_args(argv)

    # --- the user code: a model, a dataset, TrainingArguments, SAMTrainer -----------------
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0)
    )
    text = resources.files("samlm").joinpath("resources/tinyshakespeare.txt").read_bytes()[:200_000]
    ids = torch.tensor(list(text)).view(-1, 64)  # byte-level tokens, 64 per row
    dataset = [{"input_ids": row, "labels": row} for row in ids]  # the model shifts the labels
    args = TrainingArguments(
        cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=3,
        logging_steps=5,
        save_steps=max(cli.max_steps // 2, 1),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=dataset, sam_method=cli.method, rho=0.05, ascent_fraction=0.25
    )
    result = trainer.train()  # trainer.train(resume_from_checkpoint=True) continues a run
    # ---------------------------------------------------------------------------------------

    if trainer.is_world_process_zero():
        print(
            f"{cli.method}: {result.global_step} steps, train loss {result.training_loss:.4f}, "
            f"optimizer counters {trainer.sam_optimizer.counters}"
        )
    return trainer, result


if __name__ == "__main__":
    main()
