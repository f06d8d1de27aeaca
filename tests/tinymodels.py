"""Tiny model directories for CLI-level tests (built from configs and saved locally: no downloads).

Shared by tests/test_crash_safety.py, test_bad_input.py and test_fuzz_cli.py. Each builder writes
what ``from_pretrained`` reads (config.json, model.safetensors, tokenizer files) into ``path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from samlm.harness.pretrain.run import TIMING_KEYS as RUN_TIMING_KEYS

# A run's wall-clock keys (their one home is the harness), and the "seconds" of measurements.
TIMING_KEYS = RUN_TIMING_KEYS | {"seconds"}
# Environment of a samlm subprocess: offline, one torch thread (bitwise equal to the in-process
# runs, which tests/conftest.py pins to one thread), no progress bars.
SUBPROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def save_t5(path: Path) -> Path:
    """A 2-layer, 32-wide T5 with the ByT5 byte tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        vocab_size=384,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def save_gpt2(path: Path, *, vocab_size: int = 300) -> Path:
    """A 1-layer, 16-wide GPT-2 without tokenizer files (use ``--tokenizer bytes`` with it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(
            GPT2Config(
                n_layer=1,
                n_embd=16,
                n_head=2,
                vocab_size=vocab_size,
                n_positions=32,
                bos_token_id=None,
                eos_token_id=None,
            )
        ).save_pretrained(path)
    return path


def run_samlm(argv, **kwargs) -> subprocess.Popen:
    """``python -m samlm ARGV`` in a subprocess with :data:`SUBPROCESS_ENV` (stdout/stderr piped)."""
    env = dict(os.environ, **SUBPROCESS_ENV)
    return subprocess.Popen(
        [sys.executable, "-m", "samlm", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def without_timing(value):
    """``value`` with wall-clock fields removed at every depth (they differ between equal runs)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_bert(path: Path, words, *, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide BERT whose word-level vocabulary is ``words`` (plus the special tokens)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(path)
    return path


class Crash(Exception):
    """Raised by :func:`crash_at` to simulate a crash in the middle of a run."""


def crash_at(step):
    """An ``on_step`` hook that raises :class:`Crash` after ``step``."""

    def on_step(current, stats):
        if current == step:
            raise Crash(f"simulated crash after step {step}")

    return on_step
