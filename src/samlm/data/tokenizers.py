"""Tokenizers: loading one (UTF-8 bytes, or a Hugging Face tokenizer by path or hub id), its
identity (the sha256 of its definition), training a byte-level BPE, and the one encoder that
every path (``samlm prepare``, its worker processes, :func:`encode_text`) tokenizes with."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samlm import io
from samlm.data.sources import looks_like_path
from samlm.errors import UserError, first_line

BYTE_TOKENIZER_NAMES = {"bytes", "byte", "utf8", "utf-8"}
BYTES_IDENTITY = "samlm.ByteTokenizer/utf-8+eos256"
# Files that make a directory a tokenizer directory (one of them is enough).
TOKENIZER_FILES = (
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
PIECE_CHARS = 1 << 16  # long texts reach a subword tokenizer in newline-aligned pieces
BPE_PREFIX = "bpe:"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_TRAIN_CHARS = 50_000_000


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


def load_tokenizer(name_or_path: str | os.PathLike = "bytes", *, trust_remote_code: bool = False):
    """``"bytes"`` -> :class:`ByteTokenizer`; otherwise a Hugging Face tokenizer by path or hub id.

    A local path that does not exist, or a tokenizer that fails to load, is a ``UserError``.
    """
    spec = os.fspath(name_or_path)
    if spec.lower() in BYTE_TOKENIZER_NAMES:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists() and (looks_like_path(spec) or path.is_absolute()):
        raise UserError(f"tokenizer directory {spec} not found")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from a bare config.json (every text -> 0 tokens)
        raise UserError(
            f"{spec} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
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


# --------------------------------------------------------------------------- the one encoder


def newline_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, each cut after a newline where one is."""
    start = 0
    while start < len(text):
        stop = min(len(text), start + size)
        if stop < len(text):
            newline = text.rfind("\n", start, stop)
            if newline > start:
                stop = newline + 1
        yield text[start:stop]
        start = stop


def encode(tokenizer, texts: Sequence[str], piece_chars: int = PIECE_CHARS) -> list[np.ndarray]:
    """Token ids (int64, no special tokens added) of each text: its UTF-8 bytes for a
    :class:`ByteTokenizer`; for a subword tokenizer (a Hugging Face tokenizer, or the
    ``tokenizers.Tokenizer`` of a worker process) a long text goes in newline-aligned pieces of
    ``piece_chars``, which is much faster and avoids "sequence longer than model_max_length" warnings."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    pieces, owners = [], []
    for i, text in enumerate(texts):
        for piece in newline_pieces(text, piece_chars) if len(text) > piece_chars else [text]:
            pieces.append(piece)
            owners.append(i)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a fast tokenizer's tokenizers.Tokenizer
    if hasattr(backend, "encode_batch"):
        encode_batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        encoded = [e.ids for e in encode_batch(pieces, add_special_tokens=False)]
    else:  # a slow (Python) tokenizer
        encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for owner, ids in zip(owners, encoded, strict=True):
        out[owner].append(np.asarray(ids, dtype=np.int64))
    return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in out]


def encode_text(tokenizer, text: str, chunk_chars: int = PIECE_CHARS) -> torch.Tensor:
    """Token ids of a whole corpus as a 1-D int64 tensor (:func:`encode`, no special tokens added)."""
    tokens = torch.from_numpy(encode(tokenizer, [text], chunk_chars)[0])
    if tokens.numel() == 0 and text.strip():
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise UserError(
            f"tokenizer '{name}' turned {len(text)} characters into no tokens (an empty vocabulary?); "
            "use another --tokenizer"
        )
    return tokens


@dataclass
class Encoder:
    """A loaded tokenizer as a prepare uses it: its name, its identity, its vocabulary and :func:`encode`."""

    name: str  # as given: "bytes", a hub id or path, "bpe:8192"
    sha256: str  # of its definition (tokenizer.json, or the byte rule)
    vocab_size: int
    tokenizer: Any  # a ByteTokenizer or a Hugging Face tokenizer
    definition: str | None = None  # tokenizers' JSON, what a worker process rebuilds it from (None: bytes, slow)

    @property
    def is_bytes(self) -> bool:
        return isinstance(self.tokenizer, ByteTokenizer)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return encode(self.tokenizer, texts)


def describe_tokenizer(tokenizer, name: str) -> Encoder:
    """The :class:`Encoder` of a loaded tokenizer (:func:`load_tokenizer`); its ``sha256`` is the
    one identity that prepared data, the cache and a run's checks compare."""
    if isinstance(tokenizer, ByteTokenizer):
        return Encoder(name, _sha256(BYTES_IDENTITY), tokenizer.vocab_size, tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
        digest = _sha256(definition)
    else:  # a slow (Python) tokenizer: its vocabulary stands for it
        definition = None
        digest = _sha256(type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items())))
    return Encoder(name, digest, tokenizer_vocab_size(tokenizer), tokenizer, definition)


def tokenizer_sha256(spec: str, *, trust_remote_code: bool = False) -> str:
    """The identity of tokenizer ``spec`` (``bytes``, a directory or a hub id): what prepared data
    records of the tokenizer it was made with; one that does not load is a ``UserError``."""
    return describe_tokenizer(load_tokenizer(spec, trust_remote_code=trust_remote_code), spec).sha256


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EncoderPool:
    """``workers`` processes that each rebuild a tokenizer from its definition once, then encode
    the lists of texts submitted to them (:func:`encode`)."""

    def __init__(self, definition: str, workers: int):
        import multiprocessing

        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(definition,)
        )

    def submit(self, texts: list[str]) -> Future:
        return self.executor.submit(_worker_encode, texts)

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)


_WORKER_TOKENIZER = None


def _worker_init(definition: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(definition)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return encode(_WORKER_TOKENIZER, texts)


# --------------------------------------------------------------------------- BPE


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
