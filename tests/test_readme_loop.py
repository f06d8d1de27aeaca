"""The README's code runs on a user's own data, not only on the built-in corpus.

The optimizer quickstart's loop is read from README.md (so the test fails when the README
drifts), its commented ``LMDataset.from_prepared`` line is switched on, and it runs on a corpus
prepared with ``tokenizer="bpe:512"`` (what ``samlm prepare`` runs) from a text file written here: token ids past the
byte vocabulary (257) reach the model, so a loop that hardcodes ``vocab_size`` fails. The Hugging
Face snippet's comment names the keys its log has; the test runs it and checks them."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from test_docs_code import blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREPARED_LINE = re.compile(r"^# (data = LMDataset\.from_prepared\(\"data/corpus\".*)$", re.M)


def readme_block(needle: str) -> str:
    found = [code for _, code, skip, _ in blocks(README) if needle in code and skip is None]
    assert len(found) == 1, f"README.md should have one Python block with {needle!r}, found {len(found)}"
    return found[0]


def write_corpus(path: Path) -> None:
    """About 23 kB of made-up English-like lines (deterministic)."""
    rng = random.Random(0)
    words = (
        "the a of and to in is was for on that with as by at from his her they we you it this be are "
        "king queen lord lady sword crown night day river stone bread water fire wind heart hand"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(600)]
    path.write_text("\n".join(lines) + "\n")


def test_the_readme_loop_trains_and_evaluates_on_a_prepared_bpe_corpus(tmp_path, monkeypatch, capsys):
    from samlm.data import prepare  # what `samlm prepare --data corpus.txt --tokenizer bpe:512` runs

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt")
    prepare("corpus.txt", "data/corpus", tokenizer="bpe:512", progress=False)

    block = readme_block("LMDataset.from_prepared")
    code, switched = PREPARED_LINE.subn(r"\1", block)
    assert switched == 1, 'the README loop should show `# data = LMDataset.from_prepared("data/corpus", ...)`'
    assert "vocab_size=data.vocab_size" in code, "the README loop should size the model by data.vocab_size"

    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (the optimizer quickstart, on a prepared corpus)", "exec"), namespace)

    data, model = namespace["data"], namespace["model"]
    assert 257 < data.vocab_size <= 512  # a BPE vocabulary: the byte vocabulary of 257 would not do
    assert int(data.train_tokens.max()) >= 257  # ... and its ids past the bytes are in the data
    assert model.get_input_embeddings().num_embeddings == data.vocab_size
    assert math.isfinite(namespace["val_loss"]) and namespace["val_loss"] > 0
    assert "val loss" in capsys.readouterr().out


def test_the_hf_snippet_logs_the_keys_its_comment_names(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    block = readme_block("SAMTrainer(")
    named = {"loss", "loss_perturbed", "sam_eps_norm", "sam_ascent_grad_norm", "sam_skipped_steps"}
    for key in named | {"logging_steps"}:
        assert key in block, f"the README's Hugging Face snippet should name {key}"
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, "README.md (the Hugging Face quickstart)", "exec"), namespace)
    logged = namespace["trainer"].state.log_history[0]
    assert named <= set(logged), sorted(logged)
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["loss_perturbed"])
