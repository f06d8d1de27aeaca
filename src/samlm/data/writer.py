"""Preparing: tokenize a corpus once into a prepared directory (:mod:`samlm.data.store`).

The pattern of nanoGPT's ``prepare.py``: the documents of a source (:mod:`samlm.data.sources`)
are read as a stream, tokenized in parallel (:mod:`samlm.data.tokenizers`) and appended to
``train.bin`` / ``val.bin``; training reads windows from ``np.memmap`` views, so a run's memory
does not grow with the corpus.

The split rule (recorded in meta.json):

* ``source_split``: the dataset's own validation split (a hub dataset that has one);
* ``every_kth_document``: document i (0-based, empty documents skipped) is validation when
  ``i % k == k - 1``, ``k = round(1 / val_fraction)`` (10), until the validation budget is met;
* ``tail``: a single-document source (a text file, Tiny Shakespeare): the last ``val_fraction``
  of the token stream, exactly as :class:`samlm.data.windows.LMDataset` splits one stream, so
  runs read bitwise the same windows as the in-memory path.

Documents in one split are separated by the tokens of a blank line (``"\\n\\n"``), which is how
:func:`samlm.data.sources.load_corpus` joins them.

Preparing is resumable: after each chunk of documents the token files are flushed and fsynced and
``progress.json`` records their lengths atomically; a rerun truncates the files to those lengths
and skips the documents already done.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import samlm.data.store as store
from samlm import io
from samlm.data.sources import DOCUMENT_SEPARATOR, Source, open_source
from samlm.data.tokenizers import (
    DEFAULT_BPE_TRAIN_CHARS,
    Encoder,
    EncoderPool,
    describe_tokenizer,
    load_tokenizer,
    parse_bpe,
    train_bpe,
)
from samlm.errors import UserError
from samlm.progress import progress_enabled, say

CHUNK_CHARS = 4_000_000  # characters per chunk: one progress checkpoint, one parallel map


# --------------------------------------------------------------------------- the plan


@dataclass
class Budget:
    """How much of the source a prepare reads (``None``: no limit)."""

    max_tokens: int | None = None  # training tokens
    val_tokens: int | None = None
    val_documents: int | None = None
    val_fraction: float = 0.1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        "format_version": store.FORMAT_VERSION,
        "source": source.identity,
        "tokenizer": {"bpe": bpe, "train_chars": bpe_train_chars} if bpe else {"sha256": tokenizer_sha},
        "split": split_rule(source, budget),
        "budget": budget.as_dict(),
    }


def identity_key(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def training_text(source: Source, budget: Budget, limit: int) -> Iterator[str]:
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


# --------------------------------------------------------------------------- routing documents to splits


class SplitWriter:
    """Routes each document to its split by the rule and the budgets, appends its tokens (after
    the separator's, between documents) and keeps the counts that meta.json reports."""

    def __init__(self, files: store.TokenFiles, rule: dict, budget: Budget, encoder: Encoder, single_document: bool):
        self.files, self.rule, self.budget = files, rule, budget
        self.separator = encoder.encode([DOCUMENT_SEPARATOR])[0]
        self.vocab_size = encoder.vocab_size
        self.single_document = single_document
        self.counts = {"val_documents": 0, "train_documents": 0, "chars": 0, "max_id": -1}
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

    def val_full(self) -> bool:
        b = self.budget
        return (self.val_cap is not None and self.files.tokens["val"] >= self.val_cap) or (
            b.val_documents is not None and self.counts["val_documents"] >= b.val_documents
        )

    def val_limited(self) -> bool:
        return self.val_cap is not None or self.budget.val_documents is not None

    def train_full(self) -> bool:
        if self.rule["rule"] == "tail":
            return self.stream_cap is not None and self.files.tokens["train"] >= self.stream_cap
        return self.budget.max_tokens is not None and self.files.tokens["train"] >= self.budget.max_tokens

    def done(self, phase: str) -> bool:
        if self.rule["rule"] == "source_split":
            return self.val_full() if phase == "val" else self.train_full()
        if self.rule["rule"] == "tail":
            return self.train_full()
        return self.train_full() and (self.val_full() or not self.val_limited())

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
        if split == "train":
            cap = self.stream_cap if self.rule["rule"] == "tail" else self.budget.max_tokens
        else:
            cap = self.val_cap
        if self.files.tokens[split] and not self.single_document:
            tokens = np.concatenate([self.separator, tokens])
        if cap is not None:
            tokens = tokens[: max(0, cap - self.files.tokens[split])]
        self.files.append(split, tokens)
        self.counts[f"{split}_documents"] += 1

    def write(self, chunk: Chunk) -> None:
        """Append each document of a tokenized chunk to its split, routed in order (a budget met
        part way through the chunk counts at once)."""
        for _, document in chunk.documents:
            self.counts["chars"] += len(document)
            self.counts["nonblank"] = self.counts.get("nonblank") or bool(document.strip())
        for (index, _), tokens in zip(chunk.candidates, chunk.encoded(), strict=True):
            split = self.destination(chunk.phase, index)
            if split is None:
                continue
            if tokens.size:
                if int(tokens.max()) >= self.vocab_size:
                    raise UserError(
                        f"the tokenizer produced token id {int(tokens.max())}, outside its vocabulary of "
                        f"{self.vocab_size}: the tokenizer is inconsistent"
                    )
                self.counts["max_id"] = max(self.counts["max_id"], int(tokens.max()))
            self.add(split, tokens)


@dataclass
class Chunk:
    """``(index, document)`` pairs of one phase, their tokens on the way (a pool's futures, or
    encoded at once), and where the phase's document count stands after them."""

    documents: list
    phase: str
    end: int
    chars: int
    candidates: list
    parts: list

    @classmethod
    def start(cls, documents, phase, end, chars, writer: SplitWriter, encoder: Encoder, pool) -> Chunk:
        # a document not needed now is not needed later either: budgets only fill up
        candidates = [(i, d) for i, d in documents if writer.destination(phase, i) is not None]
        texts = [d for _, d in candidates]
        if pool is not None and len(texts) > 1:
            size = max(1, math.ceil(len(texts) / (pool.workers * 2)))
            parts = [pool.submit(texts[i : i + size]) for i in range(0, len(texts), size)]
        else:
            parts = [encoder.encode(texts)]
        return cls(documents, phase, end, chars, candidates, parts)

    def encoded(self) -> list[np.ndarray]:
        return [ids for part in self.parts for ids in (part.result() if hasattr(part, "result") else part)]


# --------------------------------------------------------------------------- a prepare


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
    encoder = None
    if bpe is None:
        encoder = describe_tokenizer(load_tokenizer(tokenizer, trust_remote_code=trust_remote_code), tokenizer)
    sha = encoder.sha256 if encoder else None
    identity = prepare_identity(source, tokenizer, sha, budget, bpe_train_chars if bpe else None)
    if (
        directory.is_dir()
        and not store.is_prepared_dir(directory)
        and not overwrite
        and any(
            p.name not in (store.LOCK_FILE, store.TOKENIZER_DIR) and not p.name.endswith(".partial")
            for p in directory.iterdir()
        )
    ):
        raise UserError(
            f"--out {directory} is not empty and holds no prepared dataset: choose an empty or new "
            "directory (--overwrite prepares there anyway, replacing only train.bin, val.bin, "
            "meta.json and tokenizer/)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with store.DirectoryLock(directory):
        return Preparation(
            source=source,
            directory=directory,
            identity=identity,
            tokenizer_name=tokenizer,
            encoder=encoder,
            bpe=bpe,
            budget=budget,
            workers=workers,
            bpe_train_chars=bpe_train_chars,
            overwrite=overwrite,
            progress=progress,
        ).run()


@dataclass(kw_only=True)
class Preparation:
    """One prepare of ``directory``, under its lock: reuse or refuse what is there, resume or start
    over, get the tokenizer ready (a BPE is trained here), tokenize, then write meta.json last."""

    source: Source
    directory: Path
    identity: dict
    tokenizer_name: str
    encoder: Encoder | None  # None: a BPE, trained (or found from an interrupted prepare) by run()
    bpe: int | None
    budget: Budget
    workers: int
    bpe_train_chars: int
    overwrite: bool
    progress: bool
    content: Any = field(init=False, default=None)  # the sha256 of every document read
    started: float = field(init=False, default=0.0)

    def ready_encoder(self) -> Encoder:
        """The encoder, once :meth:`ready_tokenizer` has trained or found it."""
        assert self.encoder is not None, "ready_tokenizer() runs first"
        return self.encoder

    def run(self) -> dict:
        existing = self.existing()
        if existing is not None:
            return dict(existing, reused=True)
        state = self.resume_state()
        self.source.resolve_splits()
        self.ready_tokenizer()
        files, writer = self.tokenize(state)
        return dict(self.finish(files, writer), reused=False)

    def existing(self) -> dict | None:
        """The meta.json of a complete directory with this identity (None: prepare there)."""
        meta_path = self.directory / store.META_FILE
        existing = store.read_record(meta_path) if meta_path.exists() else None
        if existing is None:
            return None
        if existing.get("identity") == self.identity and not self.overwrite:
            store.load_prepared(self.directory)  # complete and consistent, or one line saying what is wrong
            (self.directory / store.PROGRESS_FILE).unlink(missing_ok=True)  # a crash between meta.json and its removal
            return existing
        if not self.overwrite:
            raise UserError(
                f"{self.directory} holds a prepared dataset of another source, tokenizer, split or budget; "
                "choose another --out, or --overwrite to prepare again there"
            )
        return None

    def resume_state(self) -> dict | None:
        """The progress record of an interrupted prepare of this identity (None: start over)."""
        progress_path = self.directory / store.PROGRESS_FILE
        state = store.read_record(progress_path) if progress_path.exists() else None
        if state is not None and state.get("identity") != self.identity and not self.overwrite:
            raise UserError(
                f"{self.directory} holds a partial prepare of another source, tokenizer, split or budget; "
                "rerun that command to finish it, or --overwrite to start again"
            )
        if self.overwrite or state is None or state.get("identity") != self.identity:
            store.clear(self.directory)  # start over (a resume keeps the partial files and the trained tokenizer)
            state = None
        for leftover in self.directory.glob(f".tmp-{store.TOKENIZER_DIR}-*"):  # a tokenizer save that was cut short
            shutil.rmtree(leftover, ignore_errors=True)
        return state

    def ready_tokenizer(self) -> None:
        """Train a BPE on the training split (or reuse the one trained before an interruption), or
        store the Hugging Face tokenizer in the directory."""
        tokenizer_dir = self.directory / store.TOKENIZER_DIR
        if self.bpe is not None:
            if not (tokenizer_dir / "tokenizer.json").exists():
                say(
                    f"training a byte-level BPE of {self.bpe} tokens on up to {self.bpe_train_chars:,} characters of "
                    "training text"
                )
                train_bpe(training_text(self.source, self.budget, self.bpe_train_chars), self.bpe, tokenizer_dir)
            self.encoder = describe_tokenizer(load_tokenizer(str(tokenizer_dir)), self.tokenizer_name)
        elif not self.ready_encoder().is_bytes and not tokenizer_dir.exists():
            io.atomic_save_pretrained(self.ready_encoder().tokenizer, tokenizer_dir)

    def tokenize(self, state: dict | None) -> tuple[store.TokenFiles, SplitWriter]:
        """Tokenize the source's documents chunk by chunk, workers running ahead of the writer, with
        a checkpoint after each chunk (from ``state``'s, when resuming)."""
        rule = split_rule(self.source, self.budget)
        files = store.TokenFiles(self.directory, store.token_dtype(self.ready_encoder().vocab_size))
        writer = SplitWriter(files, rule, self.budget, self.ready_encoder(), self.source.single_document)
        done = {"train": 0, "val": 0}
        if state is not None:
            files.tokens, done, writer.counts = dict(state["tokens"]), dict(state["documents"]), dict(state["counts"])
            say(f"resuming the prepare in {self.directory}: {sum(files.tokens.values()):,} tokens already written")
        self.content = hashlib.sha256()
        pool = None
        definition = self.ready_encoder().definition
        if self.workers > 1 and definition is not None:
            pool = EncoderPool(definition, self.workers)
        bar = _bar(self.progress)
        self.started = time.perf_counter()
        files.open()
        try:
            pending: list[Chunk] = []  # tokenizing in the pool, written in order

            def write(chunk: Chunk) -> None:
                writer.write(chunk)
                done[chunk.phase] = chunk.end
                files.checkpoint(self.identity, done, writer.counts)
                bar.update(chunk.chars)
                seconds = max(time.perf_counter() - self.started, 1e-9)
                bar.set_postfix_str(f"{sum(files.tokens.values()) / seconds / 1e6:.2f}M tokens/s", refresh=False)

            def submit(documents, phase, end, chars) -> None:
                pending.append(Chunk.start(documents, phase, end, chars, writer, self.ready_encoder(), pool))
                while len(pending) > (pool.workers if pool is not None else 0):
                    write(pending.pop(0))

            for phase in ("train", "val") if rule["rule"] == "source_split" else ("train",):
                index, documents, chars = 0, [], 0
                for document in self.source.documents(phase):
                    self.content.update(document.encode("utf-8"))
                    self.content.update(b"\0")
                    if index < done[phase]:  # done before an interruption: only hashed again
                        index += 1
                        continue
                    if writer.done(phase):
                        break
                    documents.append((index, document))
                    chars += len(document)
                    index += 1
                    if chars >= CHUNK_CHARS:
                        submit(documents, phase, index, chars)
                        documents, chars = [], 0
                if documents:
                    submit(documents, phase, index, chars)
                while pending:  # a phase ends with its chunks written: the next phase's budget sees them
                    write(pending.pop(0))
            files.sync()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"no space left on the device while preparing {self.directory} "
                    f"({sum(files.tokens.values()):,} tokens written): free space and rerun the same "
                    "command to resume from the last complete chunk"
                ) from None
            raise
        finally:
            files.close()
            bar.close()
            if pool is not None:
                pool.shutdown()
        return files, writer

    def finish(self, files: store.TokenFiles, writer: SplitWriter) -> dict:
        """Split the tail, refuse an empty or too small corpus, publish the token files, write meta.json."""
        rule, counts, budget = writer.rule, writer.counts, self.budget
        if rule["rule"] == "tail":
            total = files.tokens["train"]
            n_val = budget.val_tokens if budget.val_tokens is not None else int(round(total * budget.val_fraction))
            files.split_tail(min(n_val, total))  # round(n · val_fraction), as LMDataset splits one stream
        if not counts.get("nonblank"):
            raise UserError(f"corpus {self.source.spec} is empty")
        for split, name in (("train", "training"), ("val", "validation")):
            if files.tokens[split] == 0:
                documents = counts["train_documents"] + counts["val_documents"]
                every_kth = f", every {rule['k']}th document is validation" if "k" in rule else ""
                raise UserError(
                    f"corpus too small: {self.source.spec} gave no {name} tokens ({documents} documents, split "
                    f"rule {rule['rule']}{every_kth}); use a larger corpus"
                )
        files.publish()
        from samlm import __version__

        meta = {
            "format": store.FORMAT,
            "format_version": store.FORMAT_VERSION,
            "identity": self.identity,
            "tokenizer": {
                "name": self.tokenizer_name,
                "kind": "bytes" if self.ready_encoder().is_bytes else "huggingface",
                "sha256": self.ready_encoder().sha256,
                "vocab_size": self.ready_encoder().vocab_size,
                "max_id": counts["max_id"],
            },
            "dtype": files.dtype.name,
            "source": {
                "spec": str(self.source.spec),
                "kind": self.source.kind,
                "identity": self.source.identity,
                "documents": counts["train_documents"] + counts["val_documents"],
                "characters": counts["chars"],
                "content_sha256": self.content.hexdigest(),
            },
            "tokens": dict(files.tokens),
            "documents": {"train": counts["train_documents"], "val": counts["val_documents"]},
            "split": rule,
            "budget": budget.as_dict(),
            "document_separator": DOCUMENT_SEPARATOR,
            "samlm_version": __version__,
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        io.atomic_write_json(self.directory / store.META_FILE, meta)
        (self.directory / store.PROGRESS_FILE).unlink(missing_ok=True)
        io.fsync_dir(self.directory)
        return meta


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
