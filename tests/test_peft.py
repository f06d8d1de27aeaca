"""A LoRA adapter (PEFT) on a tiny GPT-2 through PreconditionedFunctionalSAM: only the adapter's
trainable weights are perturbed and updated, and a saved model+optimizer resumes bitwise."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import samlm

peft = pytest.importorskip("peft")
VOCAB = 32


def lora_gpt2(seed=0):
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )  # random B too: both factors get gradients from step 1
    return peft.get_peft_model(base, config)


def batches(steps=4, rows=8, length=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (rows, length), generator=g) for _ in range(steps)]


def forward_of(model):
    return lambda ids: model(input_ids=ids).logits


def causal_ce(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def make_opt(model):
    # all parameters, frozen ones included: the frozen ones get no gradient, so neither ε nor the step touches them
    return samlm.PreconditionedFunctionalSAM(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.05)


def test_only_the_lora_weights_are_perturbed_and_updated():
    model, data = lora_gpt2(), batches(steps=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and frozen
    params = dict(model.named_parameters())
    seen = []  # at every forward pass: frozen weights intact, and the LoRA weights the pass ran at

    def forward(ids):
        seen.append(
            (
                all(torch.equal(params[n], w) for n, w in frozen.items()),
                torch.cat([params[n].detach().reshape(-1) for n in lora]),
            )
        )
        return model(input_ids=ids).logits

    opt = make_opt(model)
    for ids in data:
        seen.clear()
        start = torch.cat([params[n].detach().reshape(-1) for n in lora])
        opt.train_step(ids, forward, causal_ce)
        assert all(intact for intact, _ in seen)
        assert any(not torch.equal(at, start) for _, at in seen)  # the descent ran at w+ε on the LoRA weights
    assert all(torch.equal(params[n], w) for n, w in frozen.items())  # bitwise
    assert all(not torch.equal(params[n], w) for n, w in lora.items())
    assert opt.counters["steps"] == 3


def test_save_after_two_steps_and_resume_equals_four_straight_steps():
    data = batches(steps=4)
    straight = lora_gpt2()
    opt = make_opt(straight)
    for ids in data:
        opt.train_step(ids, forward_of(straight), causal_ce)

    first = lora_gpt2()
    opt = make_opt(first)
    for ids in data[:2]:
        opt.train_step(ids, forward_of(first), causal_ce)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = lora_gpt2(seed=99)  # different weights until the checkpoint is loaded
    resumed.load_state_dict(saved["model"])
    opt = make_opt(resumed)
    opt.load_state_dict(saved["optimizer"])
    for ids in data[2:]:
        opt.train_step(ids, forward_of(resumed), causal_ce)
    assert opt.counters["steps"] == 4
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_sam_trainer_fsam_trains_a_lora_sequence_classifier(tmp_path):
    """SAMTrainer finds the head under the PEFT wrapper, so Functional-SAM needs no sam_loss=."""
    from transformers import GPT2ForSequenceClassification, TrainingArguments

    from samlm.integrations.hf import SAMTrainer, head_kind

    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(
        GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            pad_token_id=0,
            num_labels=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    model = peft.get_peft_model(
        base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    assert head_kind(model) == "ForSequenceClassification"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = [{"input_ids": ids, "labels": ids[0] % 2} for ids in batches(steps=1, rows=16)[0].clamp(min=1)]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, sam_method="fsam")
    trainer.train()
    assert trainer.sam_optimizer.counters["steps"] == 2
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
