"""Data layer: text corpora, tokenizers and language-model batches (see :mod:`samlm.data.text`)."""

from samlm.data.text import (
    DEFAULT_CORPUS,
    IGNORE_INDEX,
    ByteTokenizer,
    LMBatchIterator,
    LMDataset,
    count_targets,
    encode_text,
    lm_loss,
    load_corpus,
    load_tokenizer,
    tokenizer_vocab_size,
)

__all__ = [
    "DEFAULT_CORPUS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "LMBatchIterator",
    "LMDataset",
    "count_targets",
    "encode_text",
    "lm_loss",
    "load_corpus",
    "load_tokenizer",
    "tokenizer_vocab_size",
]
