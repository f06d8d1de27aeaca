"""Language-model data: corpora, tokenizers, train/validation split, resumable batches.

Conventions (shared by every harness):

* A batch is ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` where
  ``labels[b, t]`` is the token that follows ``input_ids[b, t]`` (already shifted: do NOT let
  the model shift again) and ``-100`` marks a position that is not a target (padding).
* ``lm_loss(logits, batch)`` is the token-mean cross-entropy over target positions, in fp32.
* Split: the *last* ``val_fraction`` (default 10%) of the token stream is validation, the rest
  training. It depends on no seed, so every method and every seed is evaluated on exactly the
  same tokens (as nanoGPT does for Tiny Shakespeare).
* Training windows are ``context + 1`` tokens cut from the training stream with stride
  ``context`` (each token is a target once per epoch). Each epoch draws, from
  ``(seed, epoch)`` alone, a random start offset in ``[0, context)`` and a permutation of the
  windows; batches take ``batch_size`` windows in permutation order and the incomplete last
  batch of an epoch is dropped. The iterator position is therefore just ``(epoch, index)``,
  which ``state_dict()`` captures for an exact resume.
* Validation batches are the validation stream cut the same way (offset 0, in order): a
  fixed list.
* Token streams are numpy arrays: in memory, or read-only memory maps of a prepared directory
  (:mod:`samlm.data.prepared`); a window is read from the map when its batch is served. The
  harnesses always read prepared data; ``LMDataset.from_corpus`` tokenizes in memory (same windows).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samlm.errors import UserError, first_line

# Built-in corpora (shipped in samlm/resources; provenance in docs/pretraining.md):
# Tiny Shakespeare (public domain), and a second domain for forgetting studies: 48 modules of
# CPython 3.11.7's standard library source, one document per module (PSF license, beside it).
BUILTIN_CORPORA = {"tinyshakespeare": "tinyshakespeare.txt", "python-stdlib": "python_stdlib.jsonl"}
DEFAULT_CORPUS = "tinyshakespeare"
DOCUMENT_SEPARATOR = "\n\n"  # between files of a directory / documents of a hub dataset
IGNORE_INDEX = -100  # label value that lm_loss skips (padding)
# Hub datasets too large to download whole: streamed, and cut at max_chars.
STREAMING_DATASETS = {"c4", "allenai/c4", "HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu", "openwebtext"}
DEFAULT_STREAMING_MAX_CHARS = 50_000_000
_PATH_SUFFIXES = {".txt", ".text", ".md", ".raw", ".jsonl", ".json", ".csv", ".tsv", ".gz"}
JSONL_TEXT_FIELD = "text"
# Files that make a directory a tokenizer directory (one of them is enough).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- corpora


def load_corpus(
    spec: str | os.PathLike = DEFAULT_CORPUS,
    *,
    max_chars: int | None = None,
    streaming: bool | None = None,
) -> str:
    """The text of a corpus.

    ``spec`` is one of:

    * ``"tinyshakespeare"`` (default): shipped in ``samlm/resources``;
    * a local text file (UTF-8) or a directory of ``*.txt`` files (recursive, sorted by
      relative path, joined with a blank line);
    * a local ``.jsonl`` file: one JSON object per line, whose ``"text"`` field is a
      document (documents joined with a blank line; blank lines skipped);
    * ``"hf:NAME[:CONFIG][:SPLIT]"`` or a bare ``"NAME[:CONFIG][:SPLIT]"`` that is not a local
      path: a Hugging Face ``datasets`` dataset (split defaults to ``train``; the ``text``
      column, documents joined with a blank line). ``streaming`` defaults to True for the
      very large corpora in ``STREAMING_DATASETS`` (C4, FineWeb, ...), which are then cut at
      ``max_chars`` (default 50M characters).

    ``max_chars`` truncates any corpus. Raises ``UserError`` for a missing file, invalid UTF-8
    (naming the file, byte offset and line), a ``.jsonl`` line that is not JSON or has no
    ``"text"`` string (naming the file and line), an empty corpus, or a dataset that fails to load.
    """
    spec = os.fspath(spec)
    text, origin = _read_corpus(spec, max_chars=max_chars, streaming=streaming)
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise UserError(f"corpus {origin} is empty")
    return text


def _read_corpus(spec: str, *, max_chars, streaming) -> tuple[str, str]:
    if spec in BUILTIN_CORPORA:
        resource = importlib.resources.files("samlm.resources").joinpath(BUILTIN_CORPORA[spec])
        if resource.name.endswith(".jsonl"):
            with importlib.resources.as_file(resource) as path:
                return _read_jsonl_corpus(Path(path)), f"'{spec}'"
        return resource.read_text(encoding="utf-8"), f"'{spec}'"
    if spec.startswith("hf:"):
        return _read_hub_dataset(spec[3:], max_chars=max_chars, streaming=streaming), f"'{spec}'"
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl_corpus(path), str(path)
        return read_utf8(path), str(path)
    if path.is_dir():
        return _read_directory(path), str(path)
    if _looks_like_path(spec):
        raise UserError(f"corpus file {spec} not found")
    return _read_hub_dataset(spec, max_chars=max_chars, streaming=streaming), f"'{spec}'"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or Path(spec).suffix.lower() in _PATH_SUFFIXES
        or (os.sep in spec and Path(spec.split(os.sep)[0]).exists())
    )


def utf8_error(
    path: Path | str, data: bytes, exc: UnicodeDecodeError, *, offset: int = 0, lines_before: int = 0
) -> UserError:
    """The one-line error for invalid UTF-8 in ``data``, a piece of ``path`` that starts at byte
    ``offset`` after ``lines_before`` newlines: the file's byte offset, line, column and bad byte."""
    line = lines_before + data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return UserError(
        f"{path} is not valid UTF-8: byte {offset + exc.start} (line {line}, column {column}) "
        f"is {data[exc.start : exc.start + 1]!r}"
    )


def read_utf8(path: Path) -> str:
    """A file's text; invalid UTF-8 is a ``UserError`` naming the file, byte offset and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise utf8_error(path, data, exc) from None


def _read_jsonl_corpus(path: Path) -> str:
    """The ``"text"`` fields of a JSON-lines file, joined with a blank line."""
    return DOCUMENT_SEPARATOR.join(read_jsonl_documents(path))


def read_jsonl_documents(path: Path) -> Iterator[str]:
    """The non-empty ``"text"`` fields of a JSON-lines file, read line by line (a file of any size);
    a bad line is a ``UserError`` naming the file and line."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise utf8_error(path, raw, exc, offset=start, lines_before=number - 1) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UserError(
                    f"{path}:{number}: expected a JSON object with a '{JSONL_TEXT_FIELD}' field, "
                    f"found {type(record).__name__}"
                )
            if JSONL_TEXT_FIELD not in record:
                fields = ", ".join(map(str, list(record)[:8])) or "none"
                raise UserError(f"{path}:{number}: no '{JSONL_TEXT_FIELD}' field (fields: {fields})")
            text = record[JSONL_TEXT_FIELD]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{number}: '{JSONL_TEXT_FIELD}' should be a string, found {type(text).__name__}"
                )
            if text:
                yield text


def _read_directory(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"corpus directory {directory} has no .txt files")
    return DOCUMENT_SEPARATOR.join(read_utf8(p) for p in files)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``"NAME[:CONFIG][:SPLIT]"`` -> (name, config or None, split defaulting to "train")."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"dataset spec '{spec}' is not NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _read_hub_dataset(spec: str, *, max_chars: int | None, streaming: bool | None) -> str:
    name, config, split = parse_hub_spec(spec)
    if streaming is None:
        streaming = name in STREAMING_DATASETS
    if streaming and max_chars is None:
        max_chars = DEFAULT_STREAMING_MAX_CHARS
    pieces, total = [], 0
    for document in hub_documents(spec, name, config, split, streaming=streaming):
        pieces.append(document)
        total += len(document) + len(DOCUMENT_SEPARATOR)
        if max_chars is not None and total >= max_chars:
            break
    return DOCUMENT_SEPARATOR.join(pieces)


def hub_documents(spec: str, name: str, config: str | None, split: str, *, streaming: bool) -> Iterator[str]:
    """The non-empty documents of a Hugging Face dataset's split (its ``text`` column, or its only
    one); a failed load, a missing column or a stream lost part way is a one-line ``UserError``."""
    import datasets  # slow import: only when a hub dataset is asked for

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # network, unknown name, bad config: one clear line
        raise UserError(
            f"corpus '{spec}' is not a local file or directory, and loading its split '{split}' as a "
            f"Hugging Face dataset failed: {first_line(exc)}"
        ) from None
    column = _text_column(dataset, spec)
    try:
        for example in dataset:
            document = example[column]
            if document:
                yield document
    except UserError:
        raise
    except Exception as exc:  # a stream lost in the middle: prepare resumes from its last chunk
        raise UserError(
            f"corpus '{spec}': the stream of split '{split}' failed part way: {first_line(exc)}; "
            "rerun the same command to resume from the last complete chunk"
        ) from None


def _text_column(dataset, spec: str) -> str:
    names = list(getattr(dataset, "column_names", None) or [])
    if not names:  # some streaming datasets do not know their columns up front
        first = next(iter(dataset), None)
        names = list(first) if isinstance(first, Mapping) else []
    if "text" in names:
        return "text"
    if len(names) == 1:
        return names[0]
    raise UserError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(names) or 'none'})")


# --------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens; needs no download.

    Ids 0-255 are the bytes; id 256 is EOS, also used as the pad *input* id (padded *labels*
    are ``-100``). ``vocab_size == len(tokenizer) == 257``.
    """

    name = "bytes"
    vocab_size = 257
    eos_token_id = 256
    pad_token_id = 256

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(i for i in ids if 0 <= i < 256)  # specials have no bytes
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


BYTE_TOKENIZER_NAMES = {"bytes", "byte", "utf8", "utf-8"}


def load_tokenizer(name_or_path: str | os.PathLike = "bytes", *, trust_remote_code: bool = False):
    """``"bytes"`` -> :class:`ByteTokenizer`; otherwise a Hugging Face tokenizer by path or hub id.

    A local path that does not exist, or a tokenizer that fails to load, is a ``UserError``.
    """
    spec = os.fspath(name_or_path)
    if spec.lower() in BYTE_TOKENIZER_NAMES:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists() and (_looks_like_path(spec) or path.is_absolute()):
        raise UserError(f"tokenizer directory {spec} not found")
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from a bare config.json (every text -> 0 tokens)
        raise UserError(
            f"{spec} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:4])}, ...); "
            "pass --tokenizer bytes or a directory/hub id with a tokenizer"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"could not load tokenizer '{spec}': {first_line(exc)}") from None


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of token ids the model must embed (``len`` counts added tokens, unlike ``.vocab_size``)."""
    return len(tokenizer)


def encode_text(tokenizer, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of a whole corpus as a 1-D int64 tensor (no special tokens added).

    Hugging Face tokenizers get the text in newline-aligned chunks, which is much faster for
    large corpora and avoids "sequence longer than model_max_length" warnings.
    """
    if isinstance(tokenizer, ByteTokenizer):
        data = text.encode("utf-8")
        if not data:  # frombuffer rejects an empty buffer
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    chunks = list(_newline_chunks(text, chunk_chars))
    if not chunks:
        return torch.empty(0, dtype=torch.long)
    encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.cat([torch.tensor(ids, dtype=torch.long) for ids in encoded])
    if tokens.numel() == 0 and text.strip():
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise UserError(
            f"tokenizer '{name}' turned {len(text)} characters into no tokens (an empty vocabulary?); "
            "use another --tokenizer"
        )
    return tokens


def _newline_chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        stop = min(len(text), start + size)
        if stop < len(text):
            newline = text.rfind("\n", start, stop)
            if newline > start:
                stop = newline + 1
        yield text[start:stop]
        start = stop


# --------------------------------------------------------------------------- loss


def lm_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy of ``logits [B, T, V]`` against the batch's labels, in fp32.

    Positions whose label is ``-100`` are skipped. A batch with no target at all gives a zero
    loss that still carries the graph (instead of 0/0 = NaN).
    """
    labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).to(flat_logits.device)
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)


def count_targets(batch: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Number of target tokens (labels that are not ``-100``): the weight of a batch's mean loss."""
    labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
    return int((labels != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- dataset


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> Batch:
    """The windows ``tokens[s : s + context + 1]`` for each start ``s`` (a memory map reads only them)."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + 1, dtype=np.int64)
    window = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return {"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous()}


def _token_array(tokens, vocab_size: int) -> np.ndarray:
    """A 1-D numpy token array (a memory map stays one); in-memory tensors are stored in int32
    when the vocabulary allows: half the memory of int64."""
    if isinstance(tokens, np.ndarray):
        return tokens.reshape(-1)
    tokens = torch.as_tensor(tokens).reshape(-1)
    return tokens.to(torch.int32 if vocab_size < 2**31 else torch.int64).numpy()


class LMDataset:
    """Training and validation token streams (numpy arrays: in memory, or memory-mapped from a
    prepared directory, :mod:`samlm.data.prepared`) cut into windows of ``context + 1`` tokens.

    ``LMDataset(tokens, ...)`` splits one stream: the last ``val_fraction`` is validation."""

    def __init__(self, tokens: torch.Tensor, *, context: int, vocab_size: int, val_fraction: float = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
        tokens = _token_array(tokens, vocab_size)
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise UserError(f"token id {int(tokens.max())} is outside the vocabulary of size {vocab_size}")
        n_val = int(round(tokens.size * val_fraction))
        n_train = tokens.size - n_val
        self._setup(
            tokens[:n_train],
            tokens[n_train:],
            context=context,
            vocab_size=vocab_size,
            what=f"{tokens.size} tokens in all, val_fraction={val_fraction}",
        )
        self.val_fraction = val_fraction

    def _setup(self, train, val, *, context: int, vocab_size: int, what: str) -> None:
        if context < 1:
            raise UserError(f"context must be >= 1, got {context}")
        for part, size in (("validation", len(val)), ("training", len(train))):
            if size < context + 1:
                raise UserError(
                    f"corpus too small: the {part} split has {size} tokens, fewer than one window of "
                    f"context+1={context + 1} tokens ({what})"
                )
        self.context = context
        self.vocab_size = vocab_size
        self.val_fraction = None
        self.train_tokens = train
        self.val_tokens = val

    @classmethod
    def from_splits(cls, train, val, *, context: int, vocab_size: int, what: str = "") -> LMDataset:
        """A dataset of given training and validation streams (numpy arrays or memory maps, used as they are)."""
        dataset = cls.__new__(cls)
        dataset._setup(
            _token_array(train, vocab_size),
            _token_array(val, vocab_size),
            context=context,
            vocab_size=vocab_size,
            what=what or f"{len(train)} training and {len(val)} validation tokens",
        )
        return dataset

    @classmethod
    def from_prepared(cls, path, *, context: int) -> LMDataset:
        """The memory-mapped splits of a prepared directory (``samlm prepare``)."""
        from samlm.data.prepared import load_prepared

        prepared = load_prepared(path)
        return cls.from_splits(
            prepared.train,
            prepared.val,
            context=context,
            vocab_size=prepared.vocab_size,
            what=f"prepared dataset {prepared.path}",
        )

    @classmethod
    def from_text(cls, text: str, tokenizer, *, context: int, val_fraction: float = 0.1) -> LMDataset:
        tokens = encode_text(tokenizer, text)
        return cls(tokens, context=context, vocab_size=tokenizer_vocab_size(tokenizer), val_fraction=val_fraction)

    @classmethod
    def from_corpus(
        cls,
        spec: str | os.PathLike = DEFAULT_CORPUS,
        tokenizer=None,
        *,
        context: int,
        val_fraction: float = 0.1,
        max_chars: int | None = None,
    ) -> LMDataset:
        """Load a corpus (see :func:`load_corpus`) and tokenize it in memory (byte tokenizer by default)."""
        text = load_corpus(spec, max_chars=max_chars)
        return cls.from_text(text, tokenizer or ByteTokenizer(), context=context, val_fraction=val_fraction)

    def train_batches(self, batch_size: int, seed: int = 0) -> LMBatchIterator:
        """An endless, deterministic, resumable iterator of training batches."""
        return LMBatchIterator(self.train_tokens, context=self.context, batch_size=batch_size, seed=seed)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> list[Batch]:
        """The validation windows in order, as a fixed list of batches (last one may be smaller);
        only the first ``max_batches`` are read."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        n_windows = (len(self.val_tokens) - 1) // self.context
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        starts = np.arange(n_windows, dtype=np.int64) * self.context
        size = min(batch_size, max(n_windows, 1))
        return [_windows(self.val_tokens, starts[i : i + size], self.context) for i in range(0, n_windows, size)]

    @property
    def train_windows(self) -> int:
        return (len(self.train_tokens) - 1) // self.context


class LMBatchIterator:
    """Endless iterator over training batches with an exact ``state_dict`` position.

    Epoch ``e`` is fully determined by ``(seed, e)``: a start offset in ``[0, context)`` and a
    permutation of the windows (see the module docstring). The position is ``(epoch, index)``.
    The permutation is kept in int32 (the same permutation torch draws in int64), and the start
    positions of a batch are computed when it is served: 4 bytes per window of the training split.
    """

    def __init__(self, tokens, *, context: int, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.tokens = tokens if isinstance(tokens, np.ndarray) else _token_array(tokens, 2**31)
        self.context = context
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0  # batches already taken from the current epoch
        self._plan_epoch: int | None = None
        self._offset = 0
        self._order = torch.empty(0, dtype=torch.int32)
        if self._windows_in_epoch(offset=context - 1) < batch_size:
            raise UserError(
                f"training split too small: {len(self.tokens)} tokens give fewer than batch_size={batch_size} "
                f"windows of context+1={context + 1} tokens; use a smaller batch or context, or a larger corpus"
            )

    def _windows_in_epoch(self, offset: int) -> int:
        return (len(self.tokens) - offset - 1) // self.context

    def _plan(self, epoch: int) -> None:
        """The start offset and window order of ``epoch``."""
        if self._plan_epoch != epoch:
            entropy = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint64)
            generator = torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))
            self._offset = int(torch.randint(self.context, (1,), generator=generator))
            n_windows = self._windows_in_epoch(self._offset)
            dtype = torch.int32 if n_windows < 2**31 else torch.int64
            self._order = torch.randperm(n_windows, generator=generator, dtype=dtype)
            self._plan_epoch = epoch

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        self._plan(self.epoch if epoch is None else epoch)
        return len(self._order) // self.batch_size

    def __iter__(self) -> LMBatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch():
            self.epoch += 1
            self.index = 0
        self._plan(self.epoch)
        order = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        chosen = self._offset + order.numpy().astype(np.int64) * self.context
        self.index += 1
        return _windows(self.tokens, chosen, self.context)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "batch_size": self.batch_size,
            "context": self.context,
            "num_tokens": int(len(self.tokens)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; the data and batch shape must be the same."""
        for key, mine in (
            ("batch_size", self.batch_size),
            ("context", self.context),
            ("num_tokens", int(len(self.tokens))),
        ):
            if int(state[key]) != mine:
                raise UserError(
                    f"cannot resume the data iterator: saved {key}={state[key]}, now {mine} "
                    "(the corpus, tokenizer, context or batch size changed)"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
