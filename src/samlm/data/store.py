"""The prepared directory on disk: its layout and ``meta.json``, reading one back
(:func:`load_prepared`: memory maps, every inconsistency one line), the token files while a prepare
appends to them and the record that lets it resume, and the lock that lets one process at a time
prepare a directory.

A prepared directory holds::

    meta.json         format version, tokenizer identity (name, sha256 of its definition), vocabulary
                      size, dtype, source (spec, identity, documents, content sha256), tokens per
                      split, the split rule, the budgets, the samlm version; written LAST, so a
                      directory with a valid meta.json is complete by construction
    train.bin         training tokens, flat (uint16 when the vocabulary fits, uint32 otherwise)
    val.bin           validation tokens, flat
    tokenizer/        the tokenizer (a Hugging Face tokenizer directory; absent for bytes), so every
                      run, ``samlm sharpness`` and ``samlm robustness`` load the same one
    progress.json     only while preparing: how far the stream got (for resume)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samlm import io
from samlm.errors import UserError, first_line
from samlm.progress import say

FORMAT = "samlm-prepared-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """A directory that a prepare wrote into (complete or not): it has meta.json or progress.json."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / META_FILE).exists() or (p / PROGRESS_FILE).exists())


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
        """What :func:`samlm.data.tokenizers.load_tokenizer` takes: ``bytes`` or the stored tokenizer."""
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
class TokenFiles:
    """The partial token files of a prepare (``train.bin.partial``, ``val.bin.partial``) and how
    many tokens each holds; :meth:`checkpoint` records those counts for a resume."""

    directory: Path
    dtype: np.dtype
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    files: dict = field(default_factory=dict)

    def partial(self, split: str) -> Path:
        return self.directory / (SPLIT_FILES[split] + ".partial")

    def open(self) -> None:
        for split in SPLIT_FILES:
            path = self.partial(split)
            f = open(path, "r+b" if path.exists() else "w+b")
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

    def checkpoint(self, identity: dict, documents: dict, counts: dict) -> None:
        """Make the tokens durable, then record how far the prepare got in ``progress.json``."""
        self.sync()  # the tokens first, then the record that counts them
        record = {
            "identity": identity,
            "tokens": dict(self.tokens),
            "documents": dict(documents),
            "counts": dict(counts),
        }
        io.atomic_write_json(self.directory / PROGRESS_FILE, record)

    def split_tail(self, n_val: int) -> None:
        """Move the last ``n_val`` training tokens to the validation file (the tail rule)."""
        n_train = self.tokens["train"] - n_val
        item = self.dtype.itemsize
        with open(self.partial("train"), "r+b") as src, open(self.partial("val"), "wb") as dst:
            src.seek(n_train * item)
            shutil.copyfileobj(src, dst, 1 << 22)
            dst.flush()
            os.fsync(dst.fileno())
            src.truncate(n_train * item)
            src.flush()
            os.fsync(src.fileno())
        self.tokens = {"train": n_train, "val": n_val}

    def publish(self) -> None:
        """Rename the partial files to ``train.bin`` and ``val.bin``."""
        for split in SPLIT_FILES:
            os.replace(self.partial(split), self.directory / SPLIT_FILES[split])


def read_record(path: Path) -> dict:
    """A prepare's ``meta.json`` or ``progress.json`` as a dict; anything else is one line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path} is not valid JSON ({first_line(exc)}); --overwrite prepares the directory again"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a samlm prepare record; --overwrite prepares the directory again")
    return value


def clear(directory: Path) -> None:
    """Remove what an earlier prepare wrote (meta.json first: the directory stops being complete)."""
    (directory / META_FILE).unlink(missing_ok=True)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
    for name in SPLIT_FILES.values():
        (directory / name).unlink(missing_ok=True)
        (directory / (name + ".partial")).unlink(missing_ok=True)
    shutil.rmtree(directory / TOKENIZER_DIR, ignore_errors=True)


class DirectoryLock:
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
