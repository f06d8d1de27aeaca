"""Prepared token datasets: tokenize a corpus once into flat token files that every run memory-maps.

The pattern of nanoGPT's ``prepare.py``: documents are read as a stream, tokenized in parallel and
appended to ``train.bin`` / ``val.bin`` (uint16 when the vocabulary fits, uint32 otherwise);
training reads windows from ``np.memmap`` views, so a run's memory does not grow with the corpus.

A prepared directory holds::

    meta.json         format version, tokenizer identity (name, sha256 of its definition), vocabulary
                      size, dtype, source (spec, identity, documents, content sha256), tokens per
                      split, the split rule, the budgets, the samlm version; written LAST, so a
                      directory with a valid meta.json is complete by construction
    train.bin         training tokens, flat
    val.bin           validation tokens, flat
    tokenizer/        the tokenizer (a Hugging Face tokenizer directory; absent for bytes), so every
                      run, ``samlm sharpness`` and ``samlm robustness`` load the same one
    progress.json     only while preparing: how far the stream got (for resume)

The split rule (recorded in meta.json):

* ``source_split``: the dataset's own validation split (a hub dataset that has one);
* ``every_kth_document``: document i (0-based, empty documents skipped) is validation when
  ``i % k == k - 1``, ``k = round(1 / val_fraction)`` (10), until the validation budget is met;
* ``tail``: a single-document source (a text file, Tiny Shakespeare): the last ``val_fraction``
  of the token stream, exactly as the in-memory path always split it, so runs read bitwise the
  same windows as before.

Documents in one stream are separated by the tokens of a blank line (``"\\n\\n"``), which is how
the in-memory path joined them.

Preparing is resumable: after each chunk of documents the token files are flushed and fsynced and
``progress.json`` records their lengths atomically; a rerun truncates the files to those lengths
and skips the documents already done. :func:`ensure_prepared` prepares a raw ``--data`` spec once
into a cache keyed by (source, tokenizer, split rule) under ``$SAMLM_CACHE`` (default
``$XDG_CACHE_HOME/samlm``, else ``~/.cache/samlm``); a lock serialises processes that prepare the
same entry at once (the second waits and then reuses it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.resources
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samlm import io
from samlm.errors import UserError, first_line
from samlm.progress import progress_enabled, say

FORMAT = "samlm-prepared-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
DOCUMENT_SEPARATOR = "\n\n"
CHUNK_CHARS = 4_000_000  # characters per chunk: one progress checkpoint, one parallel map
BLOCK_BYTES = 4 << 20  # a single-document file is read in newline-aligned blocks of this size
PIECE_CHARS = 1 << 16  # long documents reach a subword tokenizer in newline-aligned pieces
DEFAULT_BPE_TRAIN_CHARS = 50_000_000
BPE_PREFIX = "bpe:"
EOS_TOKEN = "<|endoftext|>"
BYTES_IDENTITY = "samlm.ByteTokenizer/utf-8+eos256"


# --------------------------------------------------------------------------- where the cache lives


def cache_root() -> Path:
    """``$SAMLM_CACHE``, else ``$XDG_CACHE_HOME/samlm``, else ``~/.cache/samlm``."""
    if os.environ.get("SAMLM_CACHE"):
        return Path(os.environ["SAMLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "samlm"


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """A directory that a prepare wrote into (complete or not): it has meta.json or progress.json."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / META_FILE).exists() or (p / PROGRESS_FILE).exists())


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A corpus as a stream of documents (see :func:`open_source`)."""

    spec: str
    kind: str  # builtin | text-file | jsonl-file | directory | hub
    single_document: bool  # one document, read in pieces: split by the tail rule
    identity: dict  # what the cache key and a resume compare
    has_validation_split: bool | None = False  # None: a hub dataset not asked yet (resolve_splits)
    max_chars: int | None = None
    _hub: tuple | None = None  # (name, config, split) of a hub dataset
    _path: Path | None = None
    _resource: Any = None

    def resolve_splits(self) -> None:
        """For a hub dataset whose split was not named: does it have a ``validation`` split?"""
        if self.has_validation_split is None:
            name, config, _ = self._hub
            self.has_validation_split = "validation" in _hub_split_names(self.spec, name, config)

    def documents(self, split: str = "train") -> Iterator[str]:
        """The documents of the source (of its own ``split`` for a hub dataset with one), in order,
        cut at ``max_chars`` characters in all; empty documents are skipped."""
        stream = self._stream(split)
        if self.max_chars is None:
            yield from stream
            return
        left = self.max_chars
        for document in stream:
            if left <= 0:
                return
            yield document[:left]
            left -= len(document)

    def _stream(self, split: str) -> Iterator[str]:
        from samlm.data.text import read_jsonl_documents

        if self.kind == "builtin":
            with importlib.resources.as_file(self._resource) as path:
                if str(path).endswith(".jsonl"):
                    yield from read_jsonl_documents(Path(path))
                else:
                    yield from _text_blocks(Path(path))
        elif self.kind == "text-file":
            yield from _text_blocks(self._path)
        elif self.kind == "jsonl-file":
            yield from read_jsonl_documents(self._path)
        elif self.kind == "directory":
            from samlm.data.text import read_utf8

            for path in _directory_files(self._path):
                text = read_utf8(path)
                if text:
                    yield text
        else:
            from samlm.data.text import hub_documents

            name, config, own_split = self._hub
            yield from hub_documents(
                self.spec, name, config, own_split if split == "train" else "validation", streaming=True
            )


def _directory_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(
            f"corpus directory {directory} has no .txt files and is not a prepared dataset (no {META_FILE})"
        )
    return files


def _text_blocks(path: Path) -> Iterator[str]:
    """A UTF-8 text file in newline-aligned blocks (a leading BOM dropped, as ``utf-8-sig``);
    invalid UTF-8 is a ``UserError`` naming the file, byte offset and line."""
    from samlm.data.text import utf8_error

    lines_before, offset, carry = 0, 0, b""
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(BLOCK_BYTES)
            buffer = carry + data
            if first and buffer.startswith(b"\xef\xbb\xbf"):
                buffer, offset = buffer[3:], 3
            first = False
            if not buffer:
                return
            if data:
                cut = buffer.rfind(b"\n") + 1
                if cut == 0:  # no newline in a whole block: cut before a partial UTF-8 character
                    cut = len(buffer)
                    while cut > len(buffer) - 4 and cut > 0 and (buffer[cut - 1] & 0xC0) == 0x80:
                        cut -= 1
                    if cut > 0 and buffer[cut - 1] >= 0xC0:
                        cut -= 1
                    cut = cut or len(buffer)
            else:
                cut = len(buffer)
            block, carry = buffer[:cut], buffer[cut:]
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise utf8_error(path, block, exc, offset=offset, lines_before=lines_before) from None
            lines_before += block.count(b"\n")
            offset += len(block)
            if text:
                yield text
            if not data:
                return


def open_source(spec: str | os.PathLike, *, max_chars: int | None = None) -> Source:
    """The documents of a ``--data`` spec, as :func:`samlm.data.text.load_corpus` reads them:
    a built-in corpus, a text file (one document), a ``.jsonl`` file (one document per line), a
    directory of ``.txt`` files (one document per file), or a Hugging Face dataset
    ``[hf:]NAME[:CONFIG][:SPLIT]`` (streamed; its ``validation`` split is used for validation
    when it has one and no split is named)."""
    from samlm.data.text import BUILTIN_CORPORA, _looks_like_path, parse_hub_spec

    spec = os.fspath(spec)
    if spec in BUILTIN_CORPORA:
        resource = importlib.resources.files("samlm.resources").joinpath(BUILTIN_CORPORA[spec])
        digest = _sha256(resource.read_bytes())
        return Source(
            spec,
            "builtin",
            not resource.name.endswith(".jsonl"),
            {"builtin": spec, "sha256": digest, "max_chars": max_chars},
            max_chars=max_chars,
            _resource=resource,
        )
    if not spec.startswith("hf:"):
        path = Path(spec).expanduser()
        if path.is_file():
            stat = path.stat()
            identity = {
                "path": str(path.resolve()),
                "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "max_chars": max_chars,
            }
            jsonl = path.suffix.lower() == ".jsonl"
            return Source(
                spec, "jsonl-file" if jsonl else "text-file", not jsonl, identity, max_chars=max_chars, _path=path
            )
        if path.is_dir():
            files = _directory_files(path)
            listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            identity = {"path": str(path.resolve()), "files": _sha256(json.dumps(listing)), "max_chars": max_chars}
            return Source(spec, "directory", False, identity, max_chars=max_chars, _path=path)
        if _looks_like_path(spec):
            raise UserError(f"corpus file {spec} not found")
    hub = spec[3:] if spec.startswith("hf:") else spec
    name, config, split = parse_hub_spec(hub)
    split_named = len(hub.split(":")) > 2 and bool(hub.split(":")[2])
    identity = {"hub": name, "config": config, "split": split, "max_chars": max_chars}
    # Whether it has a validation split is asked of the hub only when preparing (resolve_splits):
    # a cached entry is found offline.
    return Source(
        spec,
        "hub",
        False,
        identity,
        has_validation_split=False if split_named else None,
        max_chars=max_chars,
        _hub=(name, config, split),
    )


def _hub_split_names(spec: str, name: str, config: str | None) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as exc:
        raise UserError(
            f"corpus '{spec}' is not a local file, directory or prepared dataset, and reading it as a "
            f"Hugging Face dataset failed: {first_line(exc)}"
        ) from None


# --------------------------------------------------------------------------- tokenizers


@dataclass
class PrepTokenizer:
    """What a prepare needs of a tokenizer: its identity, vocabulary and a batch encoder."""

    name: str  # as given: "bytes", a hub id or path, "bpe:8192"
    sha256: str  # of its definition (tokenizer.json, or the byte rule)
    vocab_size: int
    definition: str | None = None  # tokenizers' JSON (None: bytes, or a slow tokenizer)
    hf: Any = None  # the Hugging Face tokenizer (None: bytes)

    @property
    def is_bytes(self) -> bool:
        return self.hf is None

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return _encode_batch(texts, self.definition if self.hf is not None else None, self.hf)


def describe_tokenizer(tokenizer, name: str) -> PrepTokenizer:
    """The :class:`PrepTokenizer` of a loaded tokenizer (:func:`samlm.data.text.load_tokenizer`)."""
    from samlm.data.text import ByteTokenizer, tokenizer_vocab_size

    if isinstance(tokenizer, ByteTokenizer):
        return PrepTokenizer(name, _sha256(BYTES_IDENTITY), tokenizer.vocab_size)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
        digest = _sha256(definition)
    else:  # a slow (Python) tokenizer: its vocabulary stands for it
        definition = None
        vocab = sorted(tokenizer.get_vocab().items())
        digest = _sha256(type(tokenizer).__name__ + json.dumps(vocab))
    return PrepTokenizer(name, digest, tokenizer_vocab_size(tokenizer), definition, tokenizer)


_WORKER_TOKENIZER = None


def _worker_init(definition: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(definition)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return _encode_with(_WORKER_TOKENIZER, texts)


def _encode_with(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text with a ``tokenizers.Tokenizer``; a long text in newline-aligned pieces."""
    from samlm.data.text import _newline_chunks

    pieces, owners = [], []
    for i, text in enumerate(texts):
        for piece in _newline_chunks(text, PIECE_CHARS) if len(text) > PIECE_CHARS else [text]:
            pieces.append(piece)
            owners.append(i)
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    encoded = encode(pieces, add_special_tokens=False)
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for owner, enc in zip(owners, encoded):
        out[owner].append(np.asarray(enc.ids, dtype=np.int64))
    return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in out]


def _encode_batch(texts: Sequence[str], definition: str | None, hf) -> list[np.ndarray]:
    if hf is None:  # UTF-8 bytes
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    if definition is not None:
        from tokenizers import Tokenizer

        return _encode_with(Tokenizer.from_str(definition), texts)
    return [np.asarray(hf(t, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64) for t in texts]


def train_bpe(documents: Iterator[str], vocab_size: int, out_dir: Path) -> None:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) of ``vocab_size`` tokens, trained with
    Hugging Face ``tokenizers`` on ``documents`` and saved as a tokenizer directory in ``out_dir``
    (written to a temp directory and renamed: never half a tokenizer). Deterministic: the same
    documents give the same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    io.atomic_save_pretrained(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN), out_dir)


def parse_bpe(name: str) -> int | None:
    """``"bpe:8192"`` -> 8192; ``None`` for any other tokenizer name."""
    if not str(name).lower().startswith(BPE_PREFIX):
        return None
    text = str(name)[len(BPE_PREFIX) :]
    try:
        size = int(text)
    except ValueError:
        size = -1
    if not 257 <= size <= 2**31 - 1:
        raise UserError(
            f"--tokenizer {name}: the BPE vocabulary size must be an integer >= 257 "
            "(the 256 bytes and an end-of-text token), like bpe:8192"
        )
    return size


# --------------------------------------------------------------------------- the plan


@dataclass
class Budget:
    """How much of the source a prepare reads (``None``: no limit)."""

    max_tokens: int | None = None  # training tokens
    val_tokens: int | None = None
    val_documents: int | None = None
    val_fraction: float = 0.1

    def as_dict(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "val_tokens": self.val_tokens,
            "val_documents": self.val_documents,
            "val_fraction": self.val_fraction,
        }


def split_rule(source: Source, budget: Budget) -> dict:
    """The split rule of a source (module docstring), as recorded in meta.json."""
    k = max(2, round(1 / budget.val_fraction))
    if source.single_document:
        return {"rule": "tail", "fraction": budget.val_fraction}
    if source.has_validation_split is None:  # decided when preparing; what a cache key can know offline
        return {"rule": "source_split, else every_kth_document", "k": k}
    if source.has_validation_split:
        return {"rule": "source_split", "validation_split": "validation"}
    return {"rule": "every_kth_document", "k": k}


def prepare_identity(
    source: Source, tokenizer_name: str, tokenizer_sha: str | None, budget: Budget, bpe_train_chars: int | None
) -> dict:
    """What makes two prepares the same (the cache key, and what a rerun on a directory compares)."""
    bpe = parse_bpe(tokenizer_name)
    return {
        "format_version": FORMAT_VERSION,
        "source": source.identity,
        "tokenizer": {"bpe": bpe, "train_chars": bpe_train_chars} if bpe else {"sha256": tokenizer_sha},
        "split": split_rule(source, budget),
        "budget": budget.as_dict(),
    }


def identity_key(identity: Mapping[str, Any]) -> str:
    return _sha256(json.dumps(identity, sort_keys=True))[:24]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- reading a prepared dataset


@dataclass
class PreparedTokens:
    """A complete prepared directory: its meta.json and read-only memory maps of its splits."""

    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]["name"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    def tokenizer_path(self) -> str:
        """What :func:`samlm.data.text.load_tokenizer` takes: ``bytes`` or the stored tokenizer."""
        return "bytes" if self.meta["tokenizer"]["kind"] == "bytes" else str(self.path / TOKENIZER_DIR)

    def summary(self) -> dict:
        """What a run records of its data (and what its resume compares)."""
        return {
            "content_sha256": self.meta["source"]["content_sha256"],
            "tokenizer_sha256": self.tokenizer_sha256,
            "split": self.meta["split"],
            "tokens": self.meta["tokens"],
            "path": str(self.path),
        }


def load_prepared(path: str | os.PathLike) -> PreparedTokens:
    """Open a prepared directory; every inconsistency is a one-line ``UserError``."""
    directory = Path(path).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.exists():
        if (directory / PROGRESS_FILE).exists():
            raise UserError(
                f"{directory} is a partial prepared dataset (its prepare did not finish): rerun "
                "'samlm prepare' with the same flags to resume it"
            )
        raise UserError(f"{directory} is not a prepared dataset: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_path} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a samlm prepared-dataset meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{meta_path} has format version {meta.get('format_version')!r}, this samlm reads version "
            f"{FORMAT_VERSION}: prepare the data again with this samlm ('samlm prepare ... --overwrite')"
        )
    try:
        dtype = np.dtype(meta["dtype"])
        counts = {split: int(meta["tokens"][split]) for split in SPLIT_FILES}
        int(meta["tokenizer"]["vocab_size"]), meta["tokenizer"]["sha256"], meta["tokenizer"]["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{meta_path} is missing or has a bad field ({first_line(exc)})") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise UserError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    arrays = {}
    for split, name in SPLIT_FILES.items():
        file = directory / name
        if not file.exists():
            raise UserError(f"{file} is missing (the prepared dataset is incomplete)")
        size = file.stat().st_size
        if size % dtype.itemsize:
            raise UserError(
                f"{file} has {size} bytes, not a multiple of {meta['dtype']}'s {dtype.itemsize}: "
                "the file is truncated or corrupt"
            )
        if size // dtype.itemsize != counts[split]:
            raise UserError(
                f"{file} holds {size // dtype.itemsize} tokens but {META_FILE} says {counts[split]}: "
                "the file does not belong to this meta.json"
            )
        arrays[split] = np.memmap(file, dtype=dtype, mode="r") if size else np.empty(0, dtype)
    if meta["tokenizer"]["kind"] != "bytes" and not (directory / TOKENIZER_DIR).is_dir():
        raise UserError(f"{directory / TOKENIZER_DIR} is missing: the prepared dataset's tokenizer is not there")
    return PreparedTokens(directory, meta, arrays["train"], arrays["val"])


# --------------------------------------------------------------------------- writing one


@dataclass
class _Streams:
    """The partial token files of a prepare and how far they got."""

    directory: Path
    dtype: np.dtype
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    files: dict = field(default_factory=dict)

    def partial(self, split: str) -> Path:
        return self.directory / (SPLIT_FILES[split] + ".partial")

    def open(self) -> None:
        for split in SPLIT_FILES:
            path = self.partial(split)
            mode = "r+b" if path.exists() else "w+b"
            f = open(path, mode)
            f.truncate(self.tokens[split] * self.dtype.itemsize)  # drop what the last checkpoint did not record
            f.seek(0, os.SEEK_END)
            self.files[split] = f

    def append(self, split: str, tokens: np.ndarray) -> None:
        if tokens.size:
            self.files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
            self.tokens[split] += int(tokens.size)

    def sync(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}


class _Writer:
    """Routes each document to its split by the rule and the budgets, and appends its tokens."""

    def __init__(self, streams: _Streams, rule: dict, budget: Budget, separator: np.ndarray, single_document: bool):
        self.streams, self.rule, self.budget = streams, rule, budget
        self.separator = separator
        self.single_document = single_document
        self.val_documents = 0
        self.train_documents = 0
        if rule["rule"] == "tail":  # one stream, cut at the end: its cap covers both splits
            self.stream_cap = None
            if budget.max_tokens is not None:
                val = (
                    budget.val_tokens
                    if budget.val_tokens is not None
                    else math.ceil(budget.max_tokens * budget.val_fraction / (1 - budget.val_fraction))
                )
                self.stream_cap = budget.max_tokens + val
        self.val_cap = budget.val_tokens
        if (
            rule["rule"] == "source_split"
            and self.val_cap is None
            and budget.val_documents is None
            and budget.max_tokens is not None
        ):
            self.val_cap = math.ceil(budget.max_tokens * budget.val_fraction / (1 - budget.val_fraction))

    # -- budgets
    def val_full(self) -> bool:
        b = self.budget
        return (self.val_cap is not None and self.streams.tokens["val"] >= self.val_cap) or (
            b.val_documents is not None and self.val_documents >= b.val_documents
        )

    def val_limited(self) -> bool:
        return self.val_cap is not None or self.budget.val_documents is not None

    def train_full(self) -> bool:
        if self.rule["rule"] == "tail":
            return self.stream_cap is not None and self.streams.tokens["train"] >= self.stream_cap
        return self.budget.max_tokens is not None and self.streams.tokens["train"] >= self.budget.max_tokens

    def done(self, phase: str) -> bool:
        if self.rule["rule"] == "source_split":
            return self.val_full() if phase == "val" else self.train_full()
        if self.rule["rule"] == "tail":
            return self.train_full()
        return self.train_full() and (self.val_full() or not self.val_limited())

    # -- routing
    def destination(self, phase: str, index: int) -> str | None:
        """The split of document ``index`` of ``phase`` (None: not needed)."""
        if self.rule["rule"] == "tail":
            return "train"
        if self.rule["rule"] == "source_split":
            return phase
        wants_val = index % self.rule["k"] == self.rule["k"] - 1
        if wants_val and not self.val_full():
            return "val"
        if not self.train_full():
            return "train"
        return None

    def add(self, split: str, tokens: np.ndarray) -> None:
        cap = (
            self.stream_cap
            if (split == "train" and self.rule["rule"] == "tail")
            else (self.budget.max_tokens if split == "train" else self.val_cap)
        )
        if self.streams.tokens[split] and not self.single_document:
            tokens = np.concatenate([self.separator, tokens])
        if cap is not None:
            tokens = tokens[: max(0, cap - self.streams.tokens[split])]
        self.streams.append(split, tokens)
        if split == "val":
            self.val_documents += 1
        else:
            self.train_documents += 1


def _check_dtype(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise UserError(
            f"the tokenizer produced token id {int(tokens.max())}, outside its vocabulary of "
            f"{vocab_size}: the tokenizer is inconsistent"
        )


def prepare(
    spec: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str = "bytes",
    budget: Budget | None = None,
    workers: int = 1,
    max_chars: int | None = None,
    bpe_train_chars: int = DEFAULT_BPE_TRAIN_CHARS,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``spec`` into the prepared directory ``out`` (module docstring); returns its meta.json.

    Idempotent: on a complete directory with the same identity it does nothing (``meta["reused"]``
    is True); a different one is refused unless ``overwrite``. A partial one with the same identity
    is resumed. ``workers`` processes tokenize each chunk in parallel."""
    budget = budget or Budget()
    directory = Path(out).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--out {directory} is a file, not a directory")
    source = open_source(spec, max_chars=max_chars)
    if source.single_document and budget.val_documents is not None:
        raise UserError(
            f"--val-documents: {source.spec} is one document (its validation split is the last "
            f"{budget.val_fraction:g} of its tokens); use --val-tokens"
        )
    bpe = parse_bpe(tokenizer)
    described = None
    if bpe is None:
        from samlm.data.text import load_tokenizer

        described = describe_tokenizer(load_tokenizer(tokenizer, trust_remote_code=trust_remote_code), tokenizer)
    identity = prepare_identity(
        source, tokenizer, described.sha256 if described else None, budget, bpe_train_chars if bpe else None
    )
    if (
        directory.is_dir()
        and not is_prepared_dir(directory)
        and not overwrite
        and any(
            p.name not in (LOCK_FILE, TOKENIZER_DIR) and not p.name.endswith(".partial") for p in directory.iterdir()
        )
    ):
        raise UserError(
            f"--out {directory} is not empty and holds no prepared dataset: choose an empty or new "
            "directory (--overwrite prepares there anyway, replacing only train.bin, val.bin, "
            "meta.json and tokenizer/)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        return _prepare_locked(
            source,
            directory,
            identity,
            tokenizer,
            described,
            bpe,
            budget,
            workers,
            bpe_train_chars,
            overwrite,
            progress,
        )


def _prepare_locked(
    source, directory, identity, tokenizer_name, described, bpe, budget, workers, bpe_train_chars, overwrite, progress
) -> dict:
    meta_path, progress_path = directory / META_FILE, directory / PROGRESS_FILE
    existing = _read_json(meta_path) if meta_path.exists() else None
    if existing is not None:
        if existing.get("identity") == identity and not overwrite:
            load_prepared(directory)  # complete and consistent, or one line saying what is wrong
            progress_path.unlink(missing_ok=True)  # a crash between meta.json and its removal
            return dict(existing, reused=True)
        if not overwrite:
            raise UserError(
                f"{directory} holds a prepared dataset of another source, tokenizer, split or budget; "
                "choose another --out, or --overwrite to prepare again there"
            )
    state = _read_json(progress_path) if progress_path.exists() else None
    if state is not None and state.get("identity") != identity and not overwrite:
        raise UserError(
            f"{directory} holds a partial prepare of another source, tokenizer, split or budget; "
            "rerun that command to finish it, or --overwrite to start again"
        )
    if overwrite or state is None or state.get("identity") != identity:
        _clear(directory)  # start over (a resume keeps the partial files and the trained tokenizer)
        state = None
    for leftover in directory.glob(f".tmp-{TOKENIZER_DIR}-*"):  # a tokenizer save that was cut short
        shutil.rmtree(leftover, ignore_errors=True)

    source.resolve_splits()
    if bpe is not None:  # train (or reuse the one trained before an interruption) on the training split
        tokenizer_dir = directory / TOKENIZER_DIR
        if not (tokenizer_dir / "tokenizer.json").exists():
            say(f"training a byte-level BPE of {bpe} tokens on up to {bpe_train_chars:,} characters of training text")
            train_bpe(_training_text(source, budget, bpe_train_chars), bpe, tokenizer_dir)
        from samlm.data.text import load_tokenizer

        described = describe_tokenizer(load_tokenizer(str(tokenizer_dir)), tokenizer_name)
    elif described.hf is not None and not (directory / TOKENIZER_DIR).exists():
        io.atomic_save_pretrained(described.hf, directory / TOKENIZER_DIR)

    source.resolve_splits()
    rule = split_rule(source, budget)
    dtype = token_dtype(described.vocab_size)
    streams = _Streams(directory, dtype)
    done_documents = {"train": 0, "val": 0}
    counts = {"val_documents": 0, "train_documents": 0, "chars": 0, "max_id": -1}
    if state is not None:
        streams.tokens = dict(state["tokens"])
        done_documents = dict(state["documents"])
        counts = dict(state["counts"])
        say(f"resuming the prepare in {directory}: {sum(streams.tokens.values()):,} tokens already written")
    separator = np.asarray(described.encode_batch([DOCUMENT_SEPARATOR])[0], dtype=np.int64)
    writer = _Writer(streams, rule, budget, separator, source.single_document)
    writer.val_documents, writer.train_documents = counts["val_documents"], counts["train_documents"]
    content = hashlib.sha256()
    phases = ("train", "val") if rule["rule"] == "source_split" else ("train",)
    pool = _pool(described, workers)
    bar = _bar(progress)
    started, chars_this_call = time.perf_counter(), 0
    streams.open()
    try:
        pending: list[_Chunk] = []  # tokenizing in the pool, written in order (workers run ahead)

        def finish(job: _Chunk) -> None:
            nonlocal chars_this_call
            chars_this_call += job.chars
            _write_chunk(job, writer, described, counts)
            done_documents[job.phase] = job.end
            _checkpoint(progress_path, identity, streams, done_documents, counts)
            _advance(bar, job.chars, streams, started, chars_this_call)

        def submit(chunk, phase, end, chars) -> None:
            pending.append(_Chunk.start(chunk, phase, end, chars, writer, described, pool))
            while len(pending) > (pool._max_workers if pool is not None else 0):
                finish(pending.pop(0))

        for phase in phases:
            index, chunk, chunk_chars = 0, [], 0
            for document in source.documents(phase):
                content.update(document.encode("utf-8"))
                content.update(b"\0")
                if index < done_documents[phase]:  # done before an interruption: only hashed again
                    index += 1
                    continue
                if writer.done(phase):
                    break
                chunk.append((index, document))
                chunk_chars += len(document)
                index += 1
                if chunk_chars >= CHUNK_CHARS:
                    submit(chunk, phase, index, chunk_chars)
                    chunk, chunk_chars = [], 0
            if chunk:
                submit(chunk, phase, index, chunk_chars)
            while pending:  # a phase ends with its chunks written: the next phase's budget sees them
                finish(pending.pop(0))
        streams.sync()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no space left on the device while preparing {directory} "
                f"({sum(streams.tokens.values()):,} tokens written): free space and rerun the same "
                "command to resume from the last complete chunk"
            ) from None
        raise
    finally:
        streams.close()
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if rule["rule"] == "tail":
        _split_tail(streams, budget)
    if not counts.get("nonblank"):
        raise UserError(f"corpus {source.spec} is empty")
    for split, name in (("train", "training"), ("val", "validation")):
        if streams.tokens[split] == 0:
            documents = counts["train_documents"] + counts["val_documents"]
            every_kth = f", every {rule['k']}th document is validation" if "k" in rule else ""
            raise UserError(
                f"corpus too small: {source.spec} gave no {name} tokens ({documents} documents, split "
                f"rule {rule['rule']}{every_kth}); "
                "use a larger corpus"
            )
    for split in SPLIT_FILES:
        os.replace(streams.partial(split), directory / SPLIT_FILES[split])
    from samlm import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "tokenizer": {
            "name": tokenizer_name,
            "kind": "bytes" if described.is_bytes else "huggingface",
            "sha256": described.sha256,
            "vocab_size": described.vocab_size,
            "max_id": counts["max_id"],
        },
        "dtype": dtype.name,
        "source": {
            "spec": str(source.spec),
            "kind": source.kind,
            "identity": source.identity,
            "documents": counts["train_documents"] + counts["val_documents"],
            "characters": counts["chars"],
            "content_sha256": content.hexdigest(),
        },
        "tokens": dict(streams.tokens),
        "documents": {"train": counts["train_documents"], "val": counts["val_documents"]},
        "split": rule,
        "budget": budget.as_dict(),
        "document_separator": DOCUMENT_SEPARATOR,
        "samlm_version": __version__,
        "seconds": round(time.perf_counter() - started, 3),
    }
    io.atomic_write_json(directory / META_FILE, meta)
    progress_path.unlink(missing_ok=True)
    io.fsync_dir(directory)
    return dict(meta, reused=False)


def _training_text(source: Source, budget: Budget, limit: int) -> Iterator[str]:
    """The text a BPE is trained on: the training documents by the split rule, up to ``limit``
    characters (a single-document source: its first 1 - val_fraction)."""
    rule = split_rule(source, budget)
    left = limit
    if source.single_document:  # the tail is validation: count the text first, then stop before it
        total = sum(len(block) for block in source.documents())
        left = min(limit, int(total * (1 - budget.val_fraction)))
        for block in source.documents():
            if left <= 0:
                return
            yield block[:left]
            left -= len(block)
        return
    for index, document in enumerate(source.documents("train")):
        if left <= 0:
            return
        if rule["rule"] == "every_kth_document" and index % rule["k"] == rule["k"] - 1:
            continue
        yield document[:left]
        left -= len(document)


@dataclass
class _Chunk:
    """A chunk of ``(index, document)`` of one phase, its tokens on the way (a pool's futures, or
    encoded at once), and where the phase's document count stands after it."""

    chunk: list
    phase: str
    end: int
    chars: int
    candidates: list
    parts: list

    @classmethod
    def start(cls, chunk, phase, end, chars, writer: _Writer, described: PrepTokenizer, pool) -> _Chunk:
        # a document not needed now is not needed later either: budgets only fill up
        candidates = [(i, d) for i, d in chunk if writer.destination(phase, i) is not None]
        texts = [d for _, d in candidates]
        if pool is not None and len(texts) > 1:
            parts = [pool.submit(_worker_encode, part) for part in _split_evenly(texts, pool._max_workers * 2)]
        else:
            parts = [described.encode_batch(texts)]
        return cls(chunk, phase, end, chars, candidates, parts)

    def encoded(self) -> list[np.ndarray]:
        return [ids for part in self.parts for ids in (part.result() if hasattr(part, "result") else part)]


def _write_chunk(job: _Chunk, writer: _Writer, described: PrepTokenizer, counts) -> None:
    """Append each document of a tokenized chunk to its split, routed in order (a budget met part
    way through the chunk counts at once)."""
    for _, document in job.chunk:
        counts["chars"] += len(document)
        counts["nonblank"] = counts.get("nonblank") or bool(document.strip())
    for (index, _), tokens in zip(job.candidates, job.encoded(), strict=True):
        split = writer.destination(job.phase, index)
        if split is None:
            continue
        if tokens.size:
            _check_dtype(tokens, described.vocab_size)
            counts["max_id"] = max(counts["max_id"], int(tokens.max()))
        writer.add(split, tokens)
    counts["val_documents"], counts["train_documents"] = writer.val_documents, writer.train_documents


def _split_evenly(items: list, parts: int) -> list[list]:
    size = max(1, math.ceil(len(items) / parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _split_tail(streams: _Streams, budget: Budget) -> None:
    """The tail rule: the last ``val_fraction`` (or ``val_tokens``) of the one stream is validation,
    ``n_val = round(n · val_fraction)`` as in :class:`samlm.data.text.LMDataset`."""
    total = streams.tokens["train"]
    n_val = budget.val_tokens if budget.val_tokens is not None else int(round(total * budget.val_fraction))
    n_val = min(n_val, total)
    n_train = total - n_val
    item = streams.dtype.itemsize
    with open(streams.partial("train"), "r+b") as src, open(streams.partial("val"), "wb") as dst:
        src.seek(n_train * item)
        shutil.copyfileobj(src, dst, 1 << 22)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(n_train * item)
        src.flush()
        os.fsync(src.fileno())
    streams.tokens = {"train": n_train, "val": n_val}


def _checkpoint(path: Path, identity, streams: _Streams, documents, counts) -> None:
    streams.sync()  # the tokens first, then the record that counts them
    io.atomic_write_json(
        path,
        {"identity": identity, "tokens": dict(streams.tokens), "documents": dict(documents), "counts": dict(counts)},
    )


def _pool(described: PrepTokenizer, workers: int):
    if workers <= 1 or described.definition is None:
        return None
    import multiprocessing

    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(described.definition,),
    )


def _bar(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        desc="prepare",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        dynamic_ncols=True,
        disable=not progress_enabled(enabled),
    )


def _advance(bar, chars: int, streams: _Streams, started: float, chars_this_call: int) -> None:
    bar.update(chars)
    seconds = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{sum(streams.tokens.values()) / seconds / 1e6:.2f}M tokens/s", refresh=False)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path} is not valid JSON ({first_line(exc)}); --overwrite prepares the directory again"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a samlm prepare record; --overwrite prepares the directory again")
    return value


def _clear(directory: Path) -> None:
    """Remove what an earlier prepare wrote (meta.json first: the directory stops being complete)."""
    (directory / META_FILE).unlink(missing_ok=True)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
    for name in SPLIT_FILES.values():
        (directory / name).unlink(missing_ok=True)
        (directory / (name + ".partial")).unlink(missing_ok=True)
    shutil.rmtree(directory / TOKENIZER_DIR, ignore_errors=True)


class _locked:
    """An exclusive ``flock`` on ``DIR/.lock``: one prepare of a directory at a time, across processes."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is preparing {self.path.parent}")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        return False


# --------------------------------------------------------------------------- the cache


def ensure_prepared(
    spec: str | os.PathLike,
    tokenizer: str = "bytes",
    *,
    budget: Budget | None = None,
    max_chars: int | None = None,
    workers: int = 1,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> PreparedTokens:
    """The prepared tokens of a ``--data`` spec: a prepared directory as it is, or a raw spec
    prepared once into the cache (:func:`cache_root`), keyed by (source, tokenizer, split rule).
    Processes that ask for the same entry at once share one prepare (a lock; the others wait)."""
    if is_prepared_dir(spec):
        return load_prepared(spec)
    budget = budget or Budget()
    source = open_source(spec, max_chars=max_chars)
    bpe = parse_bpe(tokenizer)
    sha = None
    if bpe is None:
        from samlm.data.text import load_tokenizer

        sha = describe_tokenizer(load_tokenizer(tokenizer, trust_remote_code=trust_remote_code), tokenizer).sha256
    identity = prepare_identity(source, tokenizer, sha, budget, DEFAULT_BPE_TRAIN_CHARS if bpe else None)
    directory = cache_root() / "prepared" / identity_key(identity)
    if (directory / META_FILE).exists():
        try:
            prepared = load_prepared(directory)
            if prepared.meta.get("identity") == identity:
                return prepared
        except UserError:
            pass  # a damaged cache entry is prepared again below
    prepare(
        spec,
        directory,
        tokenizer=tokenizer,
        budget=budget,
        workers=workers,
        max_chars=max_chars,
        bpe_train_chars=DEFAULT_BPE_TRAIN_CHARS,
        trust_remote_code=trust_remote_code,
        progress=progress,
        overwrite=(directory / META_FILE).exists() and not _complete(directory, identity),
    )
    return load_prepared(directory)


def _complete(directory: Path, identity) -> bool:
    try:
        return load_prepared(directory).meta.get("identity") == identity
    except UserError:
        return False
