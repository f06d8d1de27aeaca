"""Prepared token data (``samlm prepare``, ``samlm.data.writer``): tokenize once, memory-map everywhere.

Pinned down here: the windows a run reads from a prepared directory equal the in-memory windows
bitwise; the split rules (tail, every k-th document, the source's own validation split through a
streamed local dataset) and budgets; idempotence and the cache (one tokenization, shared by
concurrent processes); resume after an interruption or a torn write gives the same files as an
uninterrupted prepare; the BPE tokenizer is deterministic; every bad input is one line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samlm import cli
from samlm.data import Budget, LMDataset, ensure_prepared, load_prepared, prepare, sources, store, tokenizers, writer
from samlm.errors import UserError
from tinymodels import SUBPROCESS_ENV

TINY_RUN = [
    "--layers",
    "1",
    "--width",
    "16",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch",
    "4",
    "--steps",
    "2",
    "--no-sharpness",
    "--no-progress",
    "--threads",
    "1",
    "--val-batches",
    "2",
]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "def", "return", "import", "sword", "crown", "lambda", "yield"]
    return [" ".join(rng.choice(words, size=rng.integers(20, 60))) + f" doc{i}." for i in range(n)]


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def batches_equal(a, b) -> bool:
    return all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- bitwise the in-memory windows


@pytest.mark.parametrize("spec", ["tinyshakespeare", "file"])
def test_prepared_windows_equal_the_in_memory_windows_bitwise(spec, tmp_path):
    if spec == "file":
        spec = tmp_path / "corpus.txt"
        spec.write_bytes("\ufeffTo be, or not to be — that is the question:\n".encode() * 300)
    meta = prepare(spec, tmp_path / "prep", max_chars=30_000)
    assert meta["split"] == {"rule": "tail", "fraction": 0.1}
    memory = LMDataset.from_corpus(spec, context=16, max_chars=30_000)
    mapped = LMDataset.from_prepared(tmp_path / "prep", context=16)
    assert isinstance(mapped.train_tokens, np.memmap)
    it_memory, it_mapped = memory.train_batches(8, seed=3), mapped.train_batches(8, seed=3)
    per_epoch = it_memory.batches_per_epoch()
    assert batches_equal(
        [next(it_memory) for _ in range(per_epoch + 5)], [next(it_mapped) for _ in range(per_epoch + 5)]
    )  # across an epoch boundary
    assert it_mapped.epoch == 1
    assert batches_equal(memory.val_batches(8), mapped.val_batches(8))
    assert batches_equal(memory.val_batches(8, max_batches=2), mapped.val_batches(8, max_batches=2))


def test_iterator_resume_over_a_memory_map_is_exact(tmp_path):
    prepare("tinyshakespeare", tmp_path / "prep", max_chars=5_000)
    data = LMDataset.from_prepared(tmp_path / "prep", context=8)
    first = data.train_batches(4, seed=1)
    [next(first) for _ in range(150)]
    state = first.state_dict()
    second = data.train_batches(4, seed=1)
    second.load_state_dict(state)
    assert batches_equal([next(first) for _ in range(20)], [next(second) for _ in range(20)])


# --------------------------------------------------------------------------- split rules and budgets


def test_every_kth_document_is_validation_and_documents_are_separated(tmp_path):
    docs = documents(30)
    meta = prepare(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "prep")
    assert meta["split"] == {"rule": "every_kth_document", "k": 10}
    assert meta["documents"] == {"train": 27, "val": 3}
    prepared = load_prepared(tmp_path / "prep")
    expect_val = "\n\n".join(docs[i] for i in (9, 19, 29)).encode()
    expect_train = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9).encode()
    assert bytes(np.asarray(prepared.val, dtype=np.uint8)) == expect_val
    assert bytes(np.asarray(prepared.train, dtype=np.uint8)) == expect_train
    assert prepared.meta["dtype"] == "uint16" and prepared.meta["tokens"]["val"] == len(expect_val)


def test_budgets_cap_training_tokens_and_validation_documents(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", documents(60))
    meta = prepare(source, tmp_path / "a", budget=Budget(max_tokens=1000, val_documents=2))
    assert meta["tokens"]["train"] == 1000 and meta["documents"]["val"] == 2
    meta = prepare(source, tmp_path / "b", budget=Budget(val_tokens=500))
    assert meta["tokens"]["val"] == 500
    meta = prepare("tinyshakespeare", tmp_path / "c", budget=Budget(max_tokens=9000, val_tokens=1000))
    assert meta["tokens"] == {"train": 9000, "val": 1000}


def test_token_dtype_is_uint16_when_the_vocabulary_fits():
    assert store.token_dtype(65536) == np.uint16 and store.token_dtype(65537) == np.uint32


def test_streamed_local_dataset_uses_its_own_validation_split(tmp_path):
    """The hub path (``datasets.load_dataset(..., streaming=True)``) on a local dataset folder."""
    folder = tmp_path / "ds"
    folder.mkdir()
    train, val = documents(40, seed=1), documents(5, seed=2)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", val)
    meta = prepare(f"hf:{folder}", tmp_path / "prep")
    assert meta["split"] == {"rule": "source_split", "validation_split": "validation"}
    assert meta["source"]["kind"] == "hub" and meta["documents"] == {"train": 40, "val": 5}
    prepared = load_prepared(tmp_path / "prep")
    assert bytes(np.asarray(prepared.val, dtype=np.uint8)) == "\n\n".join(val).encode()
    assert bytes(np.asarray(prepared.train, dtype=np.uint8)) == "\n\n".join(train).encode()


# --------------------------------------------------------------------------- idempotence, cache, concurrency


def test_prepare_again_does_nothing_and_another_spec_is_refused(tmp_path, capsys):
    out = tmp_path / "prep"
    code, text, _ = run_cli(["prepare", "--data", "tinyshakespeare", "--max-chars", "5000", "--out", out], capsys)
    assert code == 0 and "prepared" in text
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, text, _ = run_cli(["prepare", "--data", "tinyshakespeare", "--max-chars", "5000", "--out", out], capsys)
    assert code == 0 and "already prepared" in text and "nothing to do" in text
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(["prepare", "--data", "python-stdlib", "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "another source, tokenizer" in err and "--overwrite" in err
    code, text, _ = run_cli(["prepare", "--data", "python-stdlib", "--out", out, "--overwrite"], capsys)
    assert code == 0 and load_prepared(out).meta["source"]["spec"] == "python-stdlib"


def test_the_cache_tokenizes_a_raw_spec_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMLM_CACHE", str(tmp_path / "cache"))
    calls = []
    real = writer.Preparation.run
    monkeypatch.setattr(writer.Preparation, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, documents(50))
    first = ensure_prepared(corpus)
    second = ensure_prepared(corpus)
    assert len(calls) == 1 and first.path == second.path
    assert first.path.parent == tmp_path / "cache" / "prepared"
    ensure_prepared(corpus, budget=Budget(val_fraction=0.2))  # another split rule: another entry
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "prepared").iterdir())) == 2
    write_jsonl(corpus, documents(51))  # the file changed: prepared again
    assert ensure_prepared(corpus).path != first.path


def test_concurrent_prepares_of_one_directory_tokenize_once(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(4000))
    out = tmp_path / "prep"
    env = dict(os.environ, **SUBPROCESS_ENV)
    argv = [sys.executable, "-m", "samlm", "prepare", "--data", str(corpus), "--out", str(out), "--no-progress"]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = sorted("already prepared" in o for o, _ in outputs)
    assert said == [False, True], outputs  # one tokenized, the other waited and reused it
    load_prepared(out)


# --------------------------------------------------------------------------- interruption and resume


def test_an_interrupted_prepare_resumes_to_the_same_files(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHUNK_CHARS", 2_000)
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(300))
    prepare(corpus, tmp_path / "whole")
    real, calls = writer.SplitWriter.write, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer.SplitWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "cut")
    cut = tmp_path / "cut"
    assert not (cut / store.META_FILE).exists() and (cut / store.PROGRESS_FILE).exists()
    with pytest.raises(UserError, match="partial prepared dataset"):
        load_prepared(cut)
    with open(cut / "train.bin.partial", "ab") as f:  # a torn write after the last checkpoint (kill -9)
        f.write(b"\x07" * 13)
    monkeypatch.setattr(writer.SplitWriter, "write", real)
    meta = prepare(corpus, cut)
    assert not meta["reused"]
    for name in ("train.bin", "val.bin"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert meta["source"]["content_sha256"] == load_prepared(tmp_path / "whole").meta["source"]["content_sha256"]


def test_a_full_disk_is_one_line_and_the_prepare_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHUNK_CHARS", 2_000)
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(200))
    real, calls = store.TokenFiles.append, []

    def full(self, split, tokens):
        calls.append(1)
        if len(calls) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, split, tokens)

    monkeypatch.setattr(store.TokenFiles, "append", full)
    with pytest.raises(UserError, match="no space left on the device while preparing .* rerun the same command"):
        prepare(corpus, tmp_path / "prep")
    monkeypatch.setattr(store.TokenFiles, "append", real)
    prepare(corpus, tmp_path / "prep")
    prepare(corpus, tmp_path / "whole")
    assert (tmp_path / "prep" / "train.bin").read_bytes() == (tmp_path / "whole" / "train.bin").read_bytes()


# --------------------------------------------------------------------------- BPE


def test_bpe_is_deterministic_and_stored_with_the_data(tmp_path, capsys):
    metas = [prepare("python-stdlib", tmp_path / name, tokenizer="bpe:600", max_chars=150_000) for name in ("a", "b")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()
    assert metas[0]["tokenizer"]["vocab_size"] == 600 and metas[0]["tokenizer"]["max_id"] < 600
    # a run reads the stored tokenizer; samlm sharpness rebuilds the same data from the run
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", "--data", a, *TINY_RUN, "--out", out], capsys)
    assert code == 0, err
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["vocab_size"] == 600 and resolved["tokenizer"] == "bpe:600"
    assert resolved["data"]["tokenizer_sha256"] == metas[0]["tokenizer"]["sha256"]
    code, text, err = run_cli(["sharpness", "--run", out, "--iters", "2"], capsys)
    assert code == 0, err


def test_bpe_spec_is_checked():
    with pytest.raises(UserError, match="integer >= 257"):
        tokenizers.parse_bpe("bpe:lots")
    with pytest.raises(UserError, match="integer >= 257"):
        tokenizers.parse_bpe("bpe:100")


# --------------------------------------------------------------------------- runs through the cache


def test_pretrain_and_resume_read_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", "--max-chars", "20000", *TINY_RUN, "--out", out, "--save-every", "1"], capsys)
    assert code == 0, err
    entries = list((tmp_path / "cache" / "prepared").iterdir())
    assert len(entries) == 1
    code, _, err = run_cli(
        ["pretrain", "--max-chars", "20000", *TINY_RUN, "--out", out, "--save-every", "1", "--resume"], capsys
    )
    assert code == 0, err  # the resume identity holds the data's content and tokenizer hashes: unchanged
    assert list((tmp_path / "cache" / "prepared").iterdir()) == entries


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "prep"
    prepare("tinyshakespeare", out, max_chars=5_000)
    return out


def copy_of(good: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(good, target)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]), "not a multiple of uint16"),
        (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes() + b"\0\0"), "does not belong to this meta"),
        (lambda d: (d / "train.bin").unlink(), "train.bin is missing"),
        (
            lambda d: (d / "meta.json").write_text(
                json.dumps(dict(json.loads((d / "meta.json").read_text()), format_version=99))
            ),
            "format version 99",
        ),
        (lambda d: (d / "meta.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: ((d / "meta.json").unlink(), (d / "progress.json").write_text("{}")), "partial prepared dataset"),
    ],
)
def test_a_damaged_prepared_directory_is_one_line(good, tmp_path, capsys, damage, message):
    directory = copy_of(good, tmp_path)
    damage(directory)
    code, _, err = run_cli(["pretrain", "--data", directory, *TINY_RUN, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_an_empty_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["pretrain", "--data", tmp_path / "empty", *TINY_RUN, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "has no .txt files and is not a prepared dataset" in err


def test_a_tokenizer_that_does_not_match_the_prepared_data_is_one_line(good, tmp_path, capsys):
    code, _, err = run_cli(
        ["pretrain", "--data", good, "--tokenizer", "bpe:512", *TINY_RUN, "--out", tmp_path / "r"], capsys
    )
    assert code == 2 and "was prepared with tokenizer 'bytes'" in err


def test_prepare_flags_are_checked(tmp_path, capsys):
    code, _, err = run_cli(["prepare", "--data", "tinyshakespeare"], capsys)
    assert code == 2 and "--out is required" in err
    code, _, err = run_cli(["prepare", "--data", "tinyshakespeare", "--out", tmp_path / "x", "--workers", "0"], capsys)
    assert code == 2 and "--workers" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["prepare", "--data", "tinyshakespeare", "--out", tmp_path / "file"], capsys)
    assert code == 2 and "is a file" in err
    code, _, err = run_cli(["prepare", "--data", tmp_path / "nope.txt", "--out", tmp_path / "y"], capsys)
    assert code == 2 and "nope.txt not found" in err


# --------------------------------------------------------------------------- parallel tokenization, ranks


def test_parallel_workers_write_the_same_tokens(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(400))
    one = prepare(corpus, tmp_path / "one", tokenizer="bpe:400")
    two = prepare(corpus, tmp_path / "two", tokenizer="bpe:400", workers=2)
    assert one["tokens"] == two["tokens"]
    assert (tmp_path / "one" / "train.bin").read_bytes() == (tmp_path / "two" / "train.bin").read_bytes()


def test_two_ranks_prepare_one_cache_entry_and_train_like_one_process(tmp_path):
    """torchrun with 2 gloo processes on a raw spec and an empty cache: the ranks share one prepare
    (the lock), map the same files, and the run follows the single-process run on the same data."""
    from test_launch import PRETRAIN, assert_close, final_weights, ok, torchrun

    corpus = write_jsonl(tmp_path / "c.jsonl", documents(600))
    flags = [a for a in PRETRAIN if a not in ("--max-chars", "20000")]
    cache = tmp_path / "cache"
    os.environ["SAMLM_CACHE"], saved = str(cache), os.environ.get("SAMLM_CACHE")
    try:
        ok(
            torchrun(
                [
                    *flags,
                    "--data",
                    corpus,
                    "--sync-ascent",
                    "--optimizer",
                    "sam",
                    "--ascent-fraction",
                    "1",
                    "--out",
                    tmp_path / "two",
                ],
                tmp_path,
            )
        )
    finally:
        os.environ["SAMLM_CACHE"] = saved
    entries = list((cache / "prepared").iterdir())
    assert len(entries) == 1
    assert (
        cli.main(
            [
                *map(str, flags),
                "--data",
                str(entries[0]),
                "--optimizer",
                "sam",
                "--ascent-fraction",
                "1",
                "--out",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    assert_close(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))


def test_out_with_other_files_is_refused_and_a_one_document_source_has_no_validation_documents(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own file")
    with pytest.raises(UserError, match="is not empty and holds no prepared dataset"):
        prepare("tinyshakespeare", tmp_path / "mine", max_chars=5000)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own file"
    with pytest.raises(UserError, match="--val-documents: tinyshakespeare is one document"):
        prepare("tinyshakespeare", tmp_path / "x", budget=Budget(val_documents=3))
    assert not (tmp_path / "x").exists()  # nothing written before the failure


def test_bpe_on_a_one_document_source_never_sees_the_validation_tail(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("alpha beta gamma\n" * 900 + "zzqzzq zzqzzq\n" * 100)  # the tail: a word found nowhere else
    seen = "".join(writer.training_text(sources.open_source(text), Budget(), 10**9))
    assert "zzqzzq" not in seen and seen.count("alpha") >= 880  # 90% of the characters


def test_a_cached_hub_dataset_is_found_without_asking_the_hub(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", documents(30))
    write_jsonl(folder / "validation.jsonl", documents(4, seed=9))
    monkeypatch.setenv("SAMLM_CACHE", str(tmp_path / "cache"))
    first = ensure_prepared(f"hf:{folder}")
    assert first.meta["split"]["rule"] == "source_split"

    def offline(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(sources, "hub_split_names", offline)
    monkeypatch.setattr(sources, "hub_documents", offline)
    assert ensure_prepared(f"hf:{folder}").path == first.path


def test_a_corpus_with_too_few_documents_for_a_validation_split_is_one_line(tmp_path):
    with pytest.raises(UserError, match="corpus too small: .* gave no validation tokens .* every 10th document"):
        prepare(write_jsonl(tmp_path / "c.jsonl", documents(5)), tmp_path / "prep")
    assert not (tmp_path / "prep" / "meta.json").exists()
