"""samlm.data.sources, tokenizers and windows: corpora, tokenizers, split, resumable batches, lm_loss."""

import hashlib
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from samlm.data import ByteTokenizer, LMDataset, encode_text, lm_loss, load_corpus, load_tokenizer
from samlm.errors import UserError

# --------------------------------------------------------------------------- tokenizers


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text
    assert encode_text(tokenizer, text).tolist() == ids


def test_byte_tokenizer_vocab_and_specials():
    tokenizer = load_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert len(tokenizer) == tokenizer.vocab_size == 257
    assert tokenizer.encode("hé", add_special_tokens=True) == [104, 195, 169, 256]
    assert tokenizer.decode([104, 256, 105]) == "hi"


def test_missing_tokenizer_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer directory .*nope not found"):
        load_tokenizer(str(tmp_path / "nope"))


def test_local_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path)

    tokenizer = load_tokenizer(str(tmp_path))
    assert encode_text(tokenizer, "to be or not to be\nhmm", chunk_chars=8).tolist() == [1, 2, 3, 4, 1, 2, 0]
    assert len(tokenizer) == 5


# --------------------------------------------------------------------------- corpora


def test_builtin_corpus():
    text = load_corpus()
    assert text.startswith("First Citizen") and len(text) > 1_000_000
    assert load_corpus("tinyshakespeare", max_chars=100) == text[:100]


def test_local_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.json").write_text("{}")
    assert load_corpus(tmp_path / "a.txt") == "first"
    assert load_corpus(tmp_path) == "first\n\nsecond"


def test_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        load_corpus(tmp_path / "nothing")


def test_non_utf8_names_file_and_position(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"line one\nna\xefve\n")
    with pytest.raises(UserError) as info:
        load_corpus(path)
    message = str(info.value)
    assert str(path) in message and "byte 11" in message and "line 2" in message


def test_a_byte_order_mark_does_not_shift_the_location_of_invalid_utf8(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfTo be\nto b\xe9, that")
    with pytest.raises(UserError, match=r"byte 13 \(line 2, column 5\) is b'\\xe9'$"):
        load_corpus(path)


class FakeDatasets:
    """Stands in for the ``datasets`` module: records calls, never touches the network."""

    def __init__(self, rows=None, fail=None):
        self.calls = []
        self.rows = rows or [{"text": "doc one"}, {"text": ""}, {"text": "doc two"}]
        self.fail = fail

    def load_dataset(self, name, config=None, split=None, streaming=False):
        self.calls.append((name, config, split, streaming))
        if self.fail:
            raise ConnectionError(self.fail)
        return _Rows(self.rows)


class _Rows(list):
    """A list of rows with a ``column_names`` like a ``datasets.Dataset``."""

    @property
    def column_names(self):
        return list(self[0])


@pytest.fixture
def fake_datasets(monkeypatch):
    fake = FakeDatasets()
    module = types.ModuleType("datasets")
    module.load_dataset = fake.load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return fake


def test_hub_dataset_specs(fake_datasets):
    assert load_corpus("hf:wikitext:wikitext-2-raw-v1:validation") == "doc one\n\ndoc two"
    assert load_corpus("wikitext:wikitext-2-raw-v1") == "doc one\n\ndoc two"
    assert load_corpus("allenai/c4:en", max_chars=5) == "doc o"
    assert fake_datasets.calls == [
        ("wikitext", "wikitext-2-raw-v1", "validation", False),
        ("wikitext", "wikitext-2-raw-v1", "train", False),
        ("allenai/c4", "en", "train", True),  # C4 is streamed
    ]


def test_hub_dataset_failure_is_one_line_user_error(fake_datasets):
    fake_datasets.fail = "offline\nlong traceback text"
    with pytest.raises(UserError, match="loading its split .* as a Hugging Face dataset failed: offline$"):
        load_corpus("no-such-dataset")


# --------------------------------------------------------------------------- dataset + batches


def small_dataset(context=8, chars=4000):
    return LMDataset.from_corpus("tinyshakespeare", context=context, max_chars=chars)


def test_the_quickstart_windows_are_pinned_bitwise():
    """``LMDataset.from_corpus`` (read by samlm.data.sources, encoded by samlm.data.tokenizers):
    its tokens and windows are pinned, so the demo's numbers cannot move."""
    data = small_dataset(context=16, chars=50_000)
    iterator = data.train_batches(8, seed=3)
    digest = hashlib.sha256(data.train_tokens.tobytes() + data.val_tokens.tobytes())
    for batch in [next(iterator) for _ in range(3)] + data.val_batches(8, max_batches=2):
        digest.update(batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes())
    assert data.train_tokens.dtype == np.int32
    assert digest.hexdigest() == "e2e12f12c64eafe608b046cb3d9d45dcf9fc2fa5fcd3074a7fe6426923dc3c81"


def test_split_is_the_last_tenth_and_batches_are_shifted():
    dataset = small_dataset()
    tokens = torch.tensor(ByteTokenizer().encode(load_corpus(max_chars=4000)))
    assert len(dataset.val_tokens) == 400
    assert torch.equal(torch.from_numpy(dataset.val_tokens).long(), tokens[-400:])
    assert torch.equal(torch.from_numpy(dataset.train_tokens).long(), tokens[:-400])
    batch = next(dataset.train_batches(batch_size=3, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 8)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_batches_are_deterministic_per_seed():
    dataset = small_dataset()
    first = take(dataset.train_batches(4, seed=1), 5)
    assert same_batches(first, take(dataset.train_batches(4, seed=1), 5))
    assert not same_batches(first, take(dataset.train_batches(4, seed=2), 5))
    # The split itself depends on no seed.
    assert (small_dataset().val_tokens == dataset.val_tokens).all()


def test_iterator_resume_gives_identical_batches_across_epochs():
    dataset = small_dataset(chars=1000)  # 900 train tokens, 112 windows: 28 batches per epoch
    iterator = dataset.train_batches(4, seed=3)
    take(iterator, 25)
    state = iterator.state_dict()
    expected = take(iterator, 10)  # crosses into epoch 1
    assert iterator.state_dict()["epoch"] >= 1

    resumed = dataset.train_batches(4, seed=0)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 10), expected)


def test_epoch_serves_each_window_at_most_once():
    # Token i is the number i, so a window's first token is its start position.
    dataset = LMDataset(torch.arange(1000), context=8, vocab_size=1000)
    iterator = dataset.train_batches(4, seed=0)
    starts = [int(row[0]) for batch in take(iterator, iterator.batches_per_epoch()) for row in batch["input_ids"]]
    assert len(set(starts)) == len(starts) == 4 * iterator.batches_per_epoch()
    offset = starts[0] % 8
    assert all(s % 8 == offset for s in starts)  # one stride-8 grid per epoch
    assert iterator.batches_per_epoch() == (900 - offset - 1) // 8 // 4


def test_resume_with_other_batch_shape_is_refused():
    dataset = small_dataset()
    state = dataset.train_batches(4).state_dict()
    with pytest.raises(UserError, match="batch_size=4, now 2"):
        dataset.train_batches(2).load_state_dict(state)


def test_validation_batches_are_fixed_and_cover_the_split():
    dataset = small_dataset()
    batches = dataset.val_batches(batch_size=16)
    assert same_batches(batches, dataset.val_batches(batch_size=16))
    assert sum(b["labels"].numel() for b in batches) == (400 - 1) // 8 * 8
    assert len(dataset.val_batches(batch_size=16, max_batches=2)) == 2


def test_too_small_corpus_is_a_user_error():
    with pytest.raises(UserError, match="corpus too small"):
        LMDataset(torch.arange(20), context=8, vocab_size=257)
    with pytest.raises(UserError, match="training split too small"):
        LMDataset(torch.arange(100), context=8, vocab_size=257).train_batches(batch_size=64)


# --------------------------------------------------------------------------- loss


def test_lm_loss_is_token_mean_over_targets_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    loss = lm_loss(logits, {"input_ids": labels.clamp(min=0), "labels": labels})
    keep = labels != -100
    expected = F.cross_entropy(logits.float()[keep], labels[keep])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    assert torch.equal(lm_loss(logits, (None, labels)), loss)


def test_lm_loss_without_targets_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = lm_loss(logits, {"labels": torch.full((1, 3), -100)})
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
