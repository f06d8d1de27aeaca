"""Supervised fine-tuning (TRL's SFTTrainer) with Functional-SAM: SAMSFTTrainer.

    python examples/sft_sam.py --method fsam                 # offline on CPU in seconds
    python examples/sft_sam.py --report-to tensorboard       # then: tensorboard --logdir runs/sft_sam

It trains a byte-level BPE tokenizer and a tiny GPT-2 from scratch on a small prompt-completion
chat dataset written here, so it needs no download. SFTTrainer's own settings all apply:
completion-only loss (the prompt's tokens are not trained on), ``peft_config`` for LoRA,
gradient accumulation (weighted by tokens, as SFTTrainer weights it), ``report_to``. To
fine-tune a real model, replace the tokenizer and model lines with e.g.::

    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")

and the dataset with your conversations (``trl-lib/Capybara``, ...).
"""

import argparse

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import SFTConfig

from samlm.hf import SAMSFTTrainer

QUESTIONS = [
    ("What is the capital of France?", "Paris."),
    ("What is two plus three?", "Five."),
    ("Name a primary colour.", "Red, yellow or blue."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("What do bees make?", "Honey, from the nectar of flowers."),
    ("How many legs has a spider?", "Eight."),
    ("What is the opposite of hot?", "Cold."),
    ("Which planet is the largest?", "Jupiter, by far."),
]


def tiny_tokenizer(texts):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fsam", choices=["sam", "asam", "fsam", "psam", "pfsam"])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, mlflow, trackio, all")
    parser.add_argument("--output-dir", default="runs/sft_sam")
    cli = parser.parse_args(argv)

    # --- the user code: a tokenizer, a model, a chat dataset, SFTConfig, SAMSFTTrainer ---------
    tokenizer = tiny_tokenizer([f"user: {q} assistant: {a}" for q, a in QUESTIONS] * 4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=128,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    chat = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in QUESTIONS * 4
        ]
    )
    args = SFTConfig(
        cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=5,
        save_steps=cli.max_steps,
        report_to=cli.report_to,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        max_length=128,
    )
    trainer = SAMSFTTrainer(
        model=model, args=args, train_dataset=chat, processing_class=tokenizer, sam_method=cli.method, rho=0.05
    )
    result = trainer.train()  # trainer.train(resume_from_checkpoint=True) continues a run
    # -------------------------------------------------------------------------------------------

    if trainer.is_world_process_zero():
        last = [log for log in trainer.state.log_history if "mean_token_accuracy" in log][-1]
        print(
            f"{cli.method}: {result.global_step} steps, train loss {result.training_loss:.4f}, "
            f"token accuracy {last['mean_token_accuracy']:.3f}, {int(last['num_tokens'])} tokens"
        )
    return trainer, result


if __name__ == "__main__":
    main()
