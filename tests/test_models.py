"""samlm.models: build tiny decoders from configs, load from disk, forward adapter."""

import json

import pytest
import torch

from samlm.errors import UserError
from samlm.models import build_decoder, count_parameters, lm_forward, load_causal_lm

TINY = dict(layers=2, width=32, heads=4, context=16, vocab_size=257)


@pytest.mark.parametrize("arch, cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_tiny_decoders_build_and_run(arch, cls):
    rng_before = torch.get_rng_state()
    model = build_decoder(arch, seed=1, **TINY)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the global RNG alone
    assert type(model).__name__ == cls and model.training
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    input_ids = torch.randint(0, 257, (3, 16))
    for batch in ({"input_ids": input_ids, "labels": input_ids}, (input_ids, input_ids), input_ids):
        logits = lm_forward(model)(batch)
        assert logits.shape == (3, 16, 257) and logits.dtype == torch.float32

    same = build_decoder(arch, seed=1, **TINY)
    other = build_decoder(arch, seed=2, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_untied_and_parameter_counts():
    tied = build_decoder("gpt2", **TINY)
    untied = build_decoder("gpt2", tie_embeddings=False, **TINY)
    embedding = 257 * 32
    assert count_parameters(untied) == count_parameters(tied) + embedding
    positions = 16 * 32
    assert count_parameters(tied, exclude_embeddings=True) == count_parameters(tied) - embedding - positions
    assert (
        count_parameters(untied, exclude_embeddings=True) == count_parameters(tied, exclude_embeddings=True) + embedding
    )
    tied.transformer.h[0].requires_grad_(False)
    assert count_parameters(tied, trainable_only=True) < count_parameters(tied)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="bert"), "unknown architecture"),
        (dict(width=30), "not divisible"),
        (dict(layers=0), "layers must be a positive integer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_shapes_are_user_errors(kwargs, message):
    args = dict(TINY, arch="gpt2") | kwargs
    with pytest.raises(UserError, match=message):
        build_decoder(**args)


def test_load_round_trip(tmp_path):
    model = build_decoder("llama", **TINY)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match=r"model directory .*missing not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(UserError, match="has no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(UserError, match="'t5' model, not a causal"):
        load_causal_lm(tmp_path)
