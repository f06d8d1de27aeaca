"""The settings of a pretraining run (``samlm pretrain``, and every run of ``samlm compare``).

Shared groups from :mod:`samlm.harness.settings`, with the pretraining study's defaults
(methods.md §3: AdamW β=(0.9, 0.98), eps 1e-9, decoupled weight decay 0.1, warmup then cosine to
10% of the peak), plus the model, text data, budget and sharpness groups of this harness.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samlm.errors import UserError
from samlm.harness import settings as s
from samlm.harness.settings import override, setting
from samlm.models.causal import ARCHITECTURES

PARAM_COUNTS = ("total", "non-embedding")
SHAPE_FIELDS = ("arch", "layers", "width", "heads")


@dataclass
class ModelSettings:
    """model"""

    arch: str = setting(
        "gpt2", "decoder family: gpt2 (learned positions, GELU) or llama (RoPE, RMSNorm, SwiGLU)", choices=ARCHITECTURES
    )
    layers: int = setting(4, "transformer blocks", check=s.positive_int)
    width: int = setting(128, "model width", check=s.positive_int)
    heads: int = setting(4, "attention heads", check=s.positive_int)
    context: int = setting(128, "tokens per training window", check=s.positive_int)
    dropout: float = setting(0.0, "dropout", check=s.finite(0.0, 1.0, high_open=True))
    model: str | None = setting(
        None,
        "start from this causal LM (directory or hub id) instead of a fresh one built from --arch/--layers/...",
        metavar="DIR_OR_HUB_ID",
    )
    trust_remote_code: bool = setting(False, "allow model code from the model repository")


@dataclass
class TextDataSettings:
    """data"""

    data: str = setting(
        "tinyshakespeare",
        "a prepared directory (samlm prepare), or a corpus prepared once into the "
        "cache ($SAMLM_CACHE): 'tinyshakespeare' or 'python-stdlib' (built in), a text file, a .jsonl "
        "file or a directory of .txt files, or a datasets hub id [hf:]NAME[:CONFIG][:SPLIT]",
    )
    tokenizer: str | None = setting(
        None,
        "'bytes' (UTF-8 bytes), a Hugging Face tokenizer name/path, or "
        "bpe:VOCAB (a byte-level BPE trained on the training split and stored with "
        "the prepared data)",
        default_text="bytes; with --model, the model's; with a prepared --data, its own",
    )
    max_chars: int | None = setting(None, "truncate the corpus to this many characters", check=s.positive_int)
    val_fraction: float = setting(
        0.1,
        "the last fraction of the token stream held out for validation",
        check=s.finite(0.0, 1.0, low_open=True, high_open=True),
        cli=False,
    )


@dataclass
class PretrainScheduleSettings(s.ScheduleSettings):
    """schedule and budget (equal steps for every optimizer)"""

    steps: int | None = override(
        s.ScheduleSettings,
        "steps",
        resume=False,  # its resolved value is compared
        default_text="from --tokens-per-param",
    )
    warmup: int | None = override(
        s.ScheduleSettings,
        "warmup",
        resume=False,
        help="linear warmup steps, from 10% of the peak lr",
        default_text="5% of the steps, <= 1000",
    )
    tokens_per_param: float | None = setting(
        None,
        "Chinchilla-style budget: steps = tokens_per_param x params / tokens per step",
        check=s.finite(0.0, low_open=True),
        resume=False,
        default_text="20 when --steps is not given",
    )
    param_count: str = setting(
        "total",
        "parameters counted by --tokens-per-param (total, as Chinchilla; or non-embedding, as Kaplan et al.)",
        choices=PARAM_COUNTS,
    )
    min_lr_ratio: float = setting(0.1, "cosine floor, x peak lr", check=s.finite(0.0, 1.0))


@dataclass
class SharpnessSettings:
    """evaluation and sharpness"""

    val_batches: int = setting(
        16,
        "validation batches of --batch / --grad-accum windows: the tuning slice (val loss); "
        "the next as many (fewer where the split ends) are the disjoint report slice (report "
        "loss); 0: all of them, and no report slice",
        check=s.nonnegative_int,
    )
    sharpness: bool = setting(True, "sharpness measurements", resume=False)
    sharpness_every: int = setting(
        0, "measure sharpness every N steps (0: only at the end)", check=s.nonnegative_int, resume=False
    )
    sharpness_iters: int = setting(20, "Lanczos iterations", check=s.positive_int)
    sharpness_batches: int = setting(1, "fixed validation batches for sharpness", check=s.positive_int)
    sharpness_batch_size: int = setting(8, "sequences per sharpness batch", check=s.positive_int)
    sharpness_rho: float = setting(
        0.05,
        "rho of the logit/functional path split (the same for every optimizer)",
        check=s.finite(0.0, low_open=True),
    )
    path_norms: bool = setting(
        False,
        "log SAM's logit/functional path norms every step (SAM family; one extra VJP)",
        deprecated=("--split",),  # its name until 2026-12; "split" also meant train/val
    )


def number_list(low: float, *, low_open: bool = False):
    """A check of comma-separated finite numbers, each > or >= ``low`` (``--noise-sigmas``, ``--forget-lrs``)."""

    def check(flag: str, value) -> None:
        try:
            numbers = [float(x) for x in str(value).split(",")]
        except ValueError:
            numbers = []
        ok = bool(numbers) and all(abs(x) <= s.FLOAT32_MAX and (x > low if low_open else x >= low) for x in numbers)
        if not ok:
            raise UserError(
                f"{flag} must be comma-separated finite numbers {'>' if low_open else '>='} {low:g}, got {value!r}"
            )

    return check


@dataclass
class RobustnessSettings:
    """robustness: weight noise, quantization, forgetting (docs/robustness.md)"""

    robustness: bool = setting(
        False,
        "at the end of the run, measure weight-noise, int8/int4 quantization and "
        "forgetting robustness (summary.json keys weight_noise, quantization, forgetting)",
        resume=False,
    )
    robustness_batches: int = setting(
        8,
        "validation batches (the first of the tuning slice) that every robustness "
        "measure scores the original corpus on; the second corpus: its first as many",
        check=s.positive_int,
        resume=False,
    )
    noise_sigmas: str = setting(
        "0.01,0.03,0.1",
        "weight-noise scales: W + sigma x rms(W) x z per tensor",
        check=number_list(0.0),
        resume=False,
        metavar="S1,S2,...",
    )
    noise_draws: int = setting(
        2, "seeded noise draws per sigma (mean and std over them)", check=s.positive_int, resume=False
    )
    quant_group_size: int = setting(
        32,
        "int4 group size (input weights per scale; must divide each layer's input width)",
        check=s.positive_int,
        resume=False,
    )
    quantize_embeddings: bool = setting(False, "also quantize the embeddings (and a head tied to them)", resume=False)
    quantize_norms: bool = setting(False, "also quantize 1-D tensors (norm gains, biases)", resume=False)
    forget_data: str = setting(
        "python-stdlib", "second corpus of the forgetting measure (any --data spec)", resume=False
    )
    forget_tokenizer: str | None = setting(
        None, "the second corpus's tokenizer (must be the run's)", resume=False, default_text="the run's"
    )
    forget_lrs: str = setting(
        "3e-3,1e-2,3e-2",
        "AdamW learning rates of the fine-tuning runs on the second corpus",
        check=number_list(0.0, low_open=True),
        resume=False,
        metavar="LR1,LR2,...",
    )
    forget_steps: int = setting(
        8, "AdamW steps of each fine-tuning run (0: no forgetting measure)", check=s.nonnegative_int, resume=False
    )
    forget_target: float | None = setting(
        None,
        "learning level (the second corpus's val loss) at which the forgetting frontier is read",
        check=s.finite(0.0, low_open=True),
        resume=False,
        default_text="the most-learned point",
    )


@dataclass
class PretrainConfig(
    s.ParallelSettings,
    s.LoopSettings,
    RobustnessSettings,
    SharpnessSettings,
    s.BatchSettings,
    PretrainScheduleSettings,
    s.OptimizerSettings,
    TextDataSettings,
    ModelSettings,
):
    """Everything a pretraining run depends on; the flags of ``samlm pretrain``, one to one."""

    out: str = override(s.LoopSettings, "out", default="runs/pretrain")
    # Set in every pretraining run (None is a fine-tuning run's "the model's default" in the shared groups):
    optimizer: str = override(s.OptimizerSettings, "optimizer")
    ascent_fraction: float = override(s.OptimizerSettings, "ascent_fraction")
    batch: int = override(s.BatchSettings, "batch")

    def check(self) -> None:
        """Rules across settings (each field's own check has run)."""
        from samlm.optim.registry import method

        if self.model is None and self.width % self.heads:
            raise UserError(f"--width {self.width} is not divisible by --heads {self.heads}")
        if self.model is not None:
            path = Path(self.model).expanduser()
            local = path.is_absolute() or self.model.startswith((".", "~")) or self.model.count("/") > 1
            if local and not path.exists():
                raise UserError(f"--model: model directory {self.model} not found")
        if self.batch % self.grad_accum:
            raise UserError(f"--batch {self.batch} is not divisible by --grad-accum {self.grad_accum}")
        if self.m > self.batch:
            raise UserError(f"--m {self.m} is larger than --batch {self.batch} (each m-group needs a row)")
        if self.steps is not None and self.tokens_per_param is not None:
            raise UserError("give either --steps or --tokens-per-param, not both")
        if self.path_norms and not method(self.optimizer).is_sam:
            raise UserError("--path-norms measures SAM's logit/functional paths: it needs a SAM-family --optimizer")
        from samlm.harness import parallel

        parallel.resolve_device(self.device)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PretrainConfig:
        return s.from_mapping(cls, values, what="pretrain setting")

    def as_dict(self) -> dict:
        return s.as_dict(self)


def validate(config: PretrainConfig) -> None:
    """Every bad value is a one-line ``UserError`` naming the flag."""
    s.validate(config)


def config_from_args(args: argparse.Namespace, **overrides) -> PretrainConfig:
    """A :class:`PretrainConfig` from parsed flags (``--model`` loads a shape: shape flags conflict)."""
    values = s.given(args, PretrainConfig)
    if values.get("model") is not None:
        shape = [s.flag(PretrainConfig, k) for k in SHAPE_FIELDS if k in values]
        if shape:
            raise UserError(f"--model loads an existing model: {', '.join(shape)} cannot change its shape")
    return PretrainConfig(**{**values, **overrides})


# The settings of the model and its data (``samlm sharpness`` rebuilds them from a run).
MODEL_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSettings)) + tuple(
    f.name for f in dataclasses.fields(TextDataSettings)
)


def identity(record: Mapping[str, Any]) -> dict:
    """The part of a run's ``config.json`` record (``config`` and ``resolved``) that a resume must
    match: the settings declared ``resume=True`` and the values resolved from the others."""
    saved = s.renamed(PretrainConfig, record.get("config", {}))  # a run from before a flag's rename
    names = {f.name for f in dataclasses.fields(PretrainConfig) if f.metadata.get("resume", True)}
    ident = {k: v for k, v in saved.items() if k in names}
    if saved.get("sharpness") is False:  # the measurement's settings act only when it is on
        ident.update(
            {
                f.name: s.UNUSED
                for f in dataclasses.fields(SharpnessSettings)
                if f.name.startswith("sharpness_") and f.name in ident
            }
        )
    resolved = record.get("resolved", {})
    for key in ("total_steps", "warmup_steps", "rho", "tokenizer", "parallel"):
        ident[key] = resolved.get(key)
    data = resolved.get("data") or {}
    ident["data"] = {k: data.get(k) for k in ("content_sha256", "tokenizer_sha256", "split", "tokens")}
    return ident
