"""LM windows and batches over token arrays, and the loss they are trained with.

Conventions (shared by every harness):

* A batch is ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` where
  ``labels[b, t]`` is the token that follows ``input_ids[b, t]`` (already shifted: do NOT let
  the model shift again) and ``-100`` marks a position that is not a target (padding).
* ``lm_loss(logits, batch)`` is the token-mean cross-entropy over target positions, in fp32.
* One token stream is split by the tail rule: the *last* ``val_fraction`` (default 10%) is
  validation, the rest training. It depends on no seed, so every method and every seed is
  evaluated on exactly the same tokens (as nanoGPT does for Tiny Shakespeare).
* Training windows are ``context + 1`` tokens cut from the training stream with stride
  ``context`` (each token is a target once per epoch). Each epoch draws, from
  ``(seed, epoch)`` alone, a random start offset in ``[0, context)`` and a permutation of the
  windows; batches take ``batch_size`` windows in permutation order and the incomplete last
  batch of an epoch is dropped. The iterator position is therefore just ``(epoch, index)``,
  which ``state_dict()`` captures for an exact resume.
* Validation batches are the validation stream cut the same way (offset 0, in order): a
  fixed list.
* Token streams are numpy arrays: in memory, or read-only memory maps of a prepared directory
  (:mod:`samlm.data.store`); a window is read from the map when its batch is served. The
  harnesses always read prepared data; ``LMDataset.from_corpus`` tokenizes in memory (same windows).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samlm.data.sources import DEFAULT_CORPUS, load_corpus
from samlm.data.store import load_prepared
from samlm.data.tokenizers import ByteTokenizer, encode_text, tokenizer_vocab_size
from samlm.errors import UserError

IGNORE_INDEX = -100  # label value that lm_loss skips (padding)

Batch = dict[str, torch.Tensor]


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


def _cut_windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> Batch:
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
    prepared directory, :mod:`samlm.data.store`) cut into windows of ``context + 1`` tokens.

    ``LMDataset(tokens, ...)`` splits one stream: the last ``val_fraction`` is validation."""

    val_fraction: float | None  # None: the splits came separately (a prepared directory)

    def __init__(self, tokens: torch.Tensor, *, context: int, vocab_size: int, val_fraction: float = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
        array = _token_array(tokens, vocab_size)
        if array.size and int(array.max()) >= vocab_size:
            raise UserError(f"token id {int(array.max())} is outside the vocabulary of size {vocab_size}")
        n_val = int(round(array.size * val_fraction))
        n_train = array.size - n_val
        self.serve_splits(
            array[:n_train],
            array[n_train:],
            context=context,
            vocab_size=vocab_size,
            what=f"{array.size} tokens in all, val_fraction={val_fraction}",
        )
        self.val_fraction = val_fraction

    def serve_splits(self, train, val, *, context: int, vocab_size: int, what: str) -> None:
        """Serve windows of these training and validation streams (``what`` says where they came
        from when one is too small for a window)."""
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
        dataset.serve_splits(
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
        """``text`` tokenized in memory (:func:`samlm.data.tokenizers.encode_text`), split by the tail rule."""
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
        """A corpus read (:func:`samlm.data.sources.load_corpus`) and tokenized in memory (bytes by
        default), split by the tail rule: for a one-document corpus, the windows of ``samlm prepare``."""
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
        return [_cut_windows(self.val_tokens, starts[i : i + size], self.context) for i in range(0, n_windows, size)]

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
        return _cut_windows(self.tokens, chosen, self.context)

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
