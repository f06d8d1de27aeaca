"""The settings of ``samlm prepare``: tokenize a corpus once into a prepared directory.

``--data``, ``--tokenizer``, ``--max-chars`` and ``--trust-remote-code`` are the pretraining
settings themselves (one definition, the same meaning in every command); ``--out``,
``--overwrite`` and ``--no-progress`` are the loop's. The work is :func:`samlm.data.writer.prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass

from samlm.data import writer
from samlm.data.tokenizers import DEFAULT_BPE_TRAIN_CHARS
from samlm.errors import UserError
from samlm.harness import settings as s
from samlm.harness.pretrain.config import ModelSettings, TextDataSettings
from samlm.harness.settings import override, setting


@dataclass
class PrepareConfig:
    """prepare"""

    data: str = override(
        TextDataSettings,
        "data",
        help="the corpus: 'tinyshakespeare' or 'python-stdlib' (built "
        "in), a text file, a .jsonl file, a directory of .txt files, or a datasets hub id "
        "[hf:]NAME[:CONFIG][:SPLIT] (streamed)",
        group="data",
    )
    tokenizer: str = override(TextDataSettings, "tokenizer", default="bytes", default_text="bytes", group="data")
    max_chars: int | None = override(TextDataSettings, "max_chars", group="data")
    out: str | None = override(
        s.LoopSettings,
        "out",
        default=None,
        help="the prepared directory to write",
        required=True,
        group="output",
    )
    max_tokens: int | None = setting(
        None, "at most this many training tokens (default: the whole source)", check=s.positive_int, group="budget"
    )
    val_tokens: int | None = setting(None, "at most this many validation tokens", check=s.positive_int, group="budget")
    val_documents: int | None = setting(
        None, "at most this many validation documents", check=s.positive_int, group="budget"
    )
    workers: int = setting(
        1, "processes that tokenize in parallel (Hugging Face and BPE tokenizers)", check=s.threads, group="speed"
    )
    tokenizer_train_chars: int = setting(
        DEFAULT_BPE_TRAIN_CHARS,
        "with --tokenizer bpe:VOCAB: characters of training text the BPE is trained on",
        check=s.positive_int,
        group="data",
    )
    trust_remote_code: bool = override(ModelSettings, "trust_remote_code", group="data")
    overwrite: bool = override(
        s.LoopSettings,
        "overwrite",
        help="prepare again in an --out that holds another prepared dataset",
        group="output",
    )
    progress: bool = override(s.LoopSettings, "progress", group="output")

    def check(self) -> None:
        if self.out is None:
            raise UserError("--out is required: the directory to write the prepared dataset to")

    def budget(self) -> writer.Budget:
        return writer.Budget(max_tokens=self.max_tokens, val_tokens=self.val_tokens, val_documents=self.val_documents)


def prepare(config: PrepareConfig) -> dict:
    """Run a prepare from its settings; returns the directory's meta.json (``reused``: it was complete)."""
    s.validate(config)
    assert config.out is not None  # check() refuses None
    return writer.prepare(
        config.data,
        config.out,
        tokenizer=config.tokenizer,
        budget=config.budget(),
        workers=config.workers,
        max_chars=config.max_chars,
        bpe_train_chars=config.tokenizer_train_chars,
        overwrite=config.overwrite,
        trust_remote_code=config.trust_remote_code,
        progress=config.progress,
    )
