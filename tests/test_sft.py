"""SAMSFTTrainer (SAMTrainerMixin + TRL's SFTTrainer) on a tiny GPT-2, a BPE tokenizer trained
here with ``tokenizers`` and a small prompt-completion chat dataset written here: SFT with SAM
and F-SAM, LoRA, accumulation over sequences of unequal length, resume, and ρ = 0 equal to a
plain SFTTrainer (weights and logged losses)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from samlm.integrations.sft import SAMSFTTrainer

hf_logging.set_verbosity_error()

# prompts and completions of very different lengths (1 to 12 words)
PAIRS = [
    ("what is two plus two", "four"),
    ("name a color", "blue is a color"),
    ("say hello", "hello there friend"),
    ("count to three", "one two three"),
    ("what is the sky", "the sky is above us and it is blue all day long"),
    ("pick a fruit", "apple"),
    ("tell me a long story please", "once upon a time a small model learned to talk"),
    ("yes or no", "no"),
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [f"user: {p} assistant: {c}" for p, c in PAIRS],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return hf


@pytest.fixture(scope="module")
def chat():
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in PAIRS
        ]
    )


def tiny_lm(tokenizer, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(tokenizer),
            n_positions=64,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )


def sft_args(out, **overrides):
    kwargs = dict(
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.1,
        optim="sgd",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_length=64,
        bf16=False,
    )
    kwargs.update(overrides)
    return SFTConfig(str(out), **kwargs)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def logs(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log and "train_runtime" not in log]


@pytest.mark.parametrize(
    "method, fraction, optim",
    [("fsam", 0.25, "sgd"), ("sam", 1.0, "sgd"), ("looksam", 0.25, "sgd")],
)
def test_rho_zero_equals_plain_sft_with_accumulation_over_unequal_lengths(
    tmp_path, tokenizer, chat, method, fraction, optim
):
    """ρ = 0, two micro-batches of different padded lengths per step: the weights and the logged
    loss are plain SFTTrainer's (its token weighting through num_items_in_batch, its
    completion-only labels), and its entropy / accuracy / num_tokens are logged too."""
    plain = SFTTrainer(
        model=tiny_lm(tokenizer),
        args=sft_args(tmp_path / "plain", optim=optim),
        train_dataset=chat,
        processing_class=tokenizer,
    )
    plain.train()
    sam = SAMSFTTrainer(
        model=tiny_lm(tokenizer),
        args=sft_args(tmp_path / "sam", optim=optim),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method=method,
        rho=0.0,
        ascent_fraction=fraction,
    )
    sam.train()
    assert torch.allclose(flat(sam.model), flat(plain.model), atol=1e-5, rtol=0)
    # LookSAM's full step (the first) has no pass at w over the whole batch: no "loss" there
    full_steps = 1 if method == "looksam" else 0
    assert logs(sam, "loss") == pytest.approx(logs(plain, "loss")[full_steps:], rel=1e-5)
    assert logs(sam, "num_tokens") == logs(plain, "num_tokens")
    assert logs(sam, "entropy") == pytest.approx(logs(plain, "entropy")[full_steps:], rel=1e-3)
    assert len(logs(sam, "mean_token_accuracy")) == 3 - full_steps


def test_accumulated_window_equals_one_step_on_the_whole_batch(tmp_path, tokenizer, chat):
    """F-SAM with 2 micro-batches of 2 unequal-length conversations equals F-SAM on the 4 at
    once: the loss is weighted by label tokens (row weighting would differ here)."""
    one = SAMSFTTrainer(
        model=tiny_lm(tokenizer),
        args=sft_args(tmp_path / "one", per_device_train_batch_size=4, gradient_accumulation_steps=1),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method="fsam",
        rho=0.05,
    )
    one.train()
    two = SAMSFTTrainer(
        model=tiny_lm(tokenizer),
        args=sft_args(tmp_path / "two"),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method="fsam",
        rho=0.05,
    )
    two.train()
    assert torch.allclose(flat(one.model), flat(two.model), atol=1e-5, rtol=0)
    assert logs(one, "loss") == pytest.approx(logs(two, "loss"), rel=1e-5)


def test_sft_with_sam_and_fsam_logs_its_signals(tmp_path, tokenizer, chat):
    """SAM (ascent on a quarter of the rows) logs its loss at w on those rows as ascent_loss,
    never as loss; F-SAM, which evaluates every row at w, logs the clean loss; clean_loss=True
    gives SAM the clean loss for one more forward. Weights move, losses are finite."""
    runs = {}
    for name, kwargs in {
        "sam": dict(sam_method="sam"),
        "fsam": dict(sam_method="fsam"),
        "sam-clean": dict(sam_method="sam", clean_loss=True),
    }.items():
        trainer = SAMSFTTrainer(
            model=tiny_lm(tokenizer),
            args=sft_args(tmp_path / name, learning_rate=0.05),
            train_dataset=chat,
            processing_class=tokenizer,
            rho=0.05,
            **kwargs,
        )
        before = flat(trainer.model).clone()
        trainer.train()
        assert not torch.equal(before, flat(trainer.model))
        runs[name] = trainer
    assert not logs(runs["sam"], "loss") and len(logs(runs["sam"], "ascent_loss")) == 3
    assert len(logs(runs["sam"], "ascent_entropy")) == 3 and len(logs(runs["sam"], "num_tokens")) == 3
    for name in ("fsam", "sam-clean"):
        assert len(logs(runs[name], "loss")) == 3 and not logs(runs[name], "ascent_loss")
        assert len(logs(runs[name], "entropy")) == 3
    for trainer in runs.values():
        assert all(0 < v < 20 for v in logs(trainer, "loss_perturbed")) and logs(trainer, "sam_eps_norm")[0] > 0
    # the same first step at w: SAM's clean loss is F-SAM's (both on every row, same weights)
    assert logs(runs["sam-clean"], "loss")[0] == pytest.approx(logs(runs["fsam"], "loss")[0], rel=1e-6)


def test_lora_peft_config_trains_only_the_adapters(tmp_path, tokenizer, chat):
    from peft import LoraConfig

    trainer = SAMSFTTrainer(
        model=tiny_lm(tokenizer),
        args=sft_args(tmp_path / "lora", learning_rate=0.05),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method="fsam",
        rho=0.05,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"),
    )
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items() if "lora_B" in n)
    assert len(logs(trainer, "loss")) == 3


def test_resume_equals_an_uninterrupted_run(tmp_path, tokenizer, chat):
    save = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.05, optim="adamw_torch")
    straight = SAMSFTTrainer(
        model=tiny_lm(tokenizer, dropout=0.1),
        args=sft_args(tmp_path / "straight", **save),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method="fsam",
        rho=0.05,
    )
    straight.train()
    resumed = SAMSFTTrainer(
        model=tiny_lm(tokenizer, seed=7, dropout=0.1),
        args=sft_args(tmp_path / "resumed", **save),
        train_dataset=chat,
        processing_class=tokenizer,
        sam_method="fsam",
        rho=0.05,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.sam_optimizer.counters["steps"] == 4
    assert torch.equal(flat(resumed.model), flat(straight.model))
    later = lambda t: [log["loss"] for log in t.state.log_history if "loss" in log and log["step"] > 2]  # noqa: E731
    assert later(resumed) == later(straight)


def test_another_loss_needs_sam_loss(tmp_path, tokenizer, chat):
    with pytest.raises(ValueError, match="sam_loss"):
        SAMSFTTrainer(
            model=tiny_lm(tokenizer),
            args=sft_args(tmp_path / "dft", loss_type="dft"),
            train_dataset=chat,
            processing_class=tokenizer,
            sam_method="fsam",
        )


def test_the_short_import_path():
    """``samlm.hf`` is the alias of ``samlm.integrations.hf`` (scripts written for it keep working)
    and the short path of ``samlm.integrations.sft.SAMSFTTrainer``."""
    import samlm.hf
    import samlm.integrations.hf as full
    from samlm.hf import SAMSFTTrainer as short

    assert samlm.hf.SAMTrainer is full.SAMTrainer and samlm.hf.SAMTrainerMixin is full.SAMTrainerMixin
    assert short is SAMSFTTrainer and issubclass(SAMSFTTrainer, SFTTrainer)
    assert samlm.hf.head_loss is full.head_loss and samlm.hf.SamLoss is full.SamLoss


def test_example_script_runs(tmp_path, capsys):
    """examples/sft_sam.py as shipped (fewer steps), reporting to TensorBoard through TRL's own report_to."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sft_sam.py"
    spec = importlib.util.spec_from_file_location("sft_sam", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer, result = example.main(["--max-steps", "4", "--output-dir", str(tmp_path), "--report-to", "tensorboard"])
    assert result.global_step == 4 and trainer.sam_optimizer.counters["steps"] == 4
    assert "fsam: 4 steps" in capsys.readouterr().out and list(tmp_path.rglob("events.out.tfevents.*"))
