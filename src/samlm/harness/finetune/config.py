"""The settings of a fine-tuning run (``samlm finetune``, and every run of ``samlm finetune-compare``).

Shared groups from :mod:`samlm.harness.settings`; optimizer, base, lr, batch and ρ default to
``None``: the model's defaults (:func:`samlm.models.finetune.paper_defaults`: Bahri et al.'s for
T5, BERT-style for encoders), filled in by :func:`resolve` once the model's config is read.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from samlm.data.tasks import CLASSIFICATION, GENERATION, REGRESSION
from samlm.errors import UserError
from samlm.harness import settings as s
from samlm.harness.settings import override, setting
from samlm.optim.registry import METHODS, method

KINDS = (CLASSIFICATION, REGRESSION, GENERATION)


def _subsample(flag: str, value) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        hint = f" (did you mean {value / 100:g}?)" if isinstance(value, (int, float)) and 1 < value <= 100 else ""
        raise UserError(
            f"{flag} must be in (0, 1], got {value:g}{hint}"
            if isinstance(value, (int, float))
            else f"{flag} must be in (0, 1], got {value!r}"
        )


@dataclass
class FinetuneModelSettings:
    """model"""

    model: str | None = setting(None, "local model directory or hub id (T5/mT5 or an encoder)")
    trust_remote_code: bool = setting(
        False, "allow model code from the model repository (off by default)", resume=False
    )
    model_label: str | None = setting(
        None, "the model's name in reports", resume=False, default_text="its hub id, model card title or config name"
    )


@dataclass
class TaskSettings:
    """data and tasks"""

    task: str | None = setting(
        None,
        "task or comma-separated mixture (glue/rte, superglue, glue/rte,superglue/cb); "
        "with --columns, a name for generic data (default 'generic')",
    )
    data_dir: str | None = setting(
        None, "directory with the official files (default: the Hugging Face hub)", resume=False
    )  # the data is checked by its fingerprint
    columns: str | None = setting(
        None,
        "generic JSONL/CSV/TSV data in --data-dir (train.*, validation.*): "
        "input=COL[,input2=COL][,target=COL][,answers=COL]",
        metavar="MAPPING",
    )
    labels: str | None = setting(None, "generic classification: comma-separated label words")
    kind: str | None = setting(
        None, "generic data kind (default: classification with --labels, else generation)", choices=KINDS
    )
    subsample: float = setting(
        1.0, "train on this fraction in (0, 1] of each training split", check=_subsample, metavar="RATE"
    )
    subsample_seed: int = setting(0, "seed of the subsample (the same subset for every run)", check=s.seed)
    mixture_limit: int | None = setting(
        None, "examples-proportional mixing with each task's size capped at K", check=s.positive_int, metavar="K"
    )
    eval_split: str | None = setting(None, "split to evaluate on (default: each task's validation split(s))")
    eval_examples: int = setting(0, "evaluate on the first N examples of each split (0: all)", check=s.nonnegative_int)
    eval_batch: int = setting(32, "evaluation batch size", check=s.positive_int, resume=False)
    max_input_length: int = setting(512, "input tokens (truncated)", check=s.positive_int)
    max_target_length: int = setting(
        128, "target tokens (truncated) and the decoding budget of generation tasks", check=s.positive_int
    )


@dataclass
class FinetuneScheduleSettings(s.ScheduleSettings):
    """schedule and budget"""

    steps: int | None = override(s.ScheduleSettings, "steps", default=1000, resume=False)
    warmup: int | None = override(s.ScheduleSettings, "warmup", default=0, help="linear warmup steps (to the lr)")
    lr_schedule: str = setting(
        "constant", "constant (the paper) or linear decay to 0; both after --warmup", choices=("constant", "linear")
    )


@dataclass
class FinetuneConfig(
    s.ParallelSettings,
    s.LoopSettings,
    s.BatchSettings,
    FinetuneScheduleSettings,
    s.OptimizerSettings,
    TaskSettings,
    FinetuneModelSettings,
):
    """Everything a fine-tuning run depends on; the flags of ``samlm finetune``, one to one.
    ``None``: the model's default (filled in by :func:`resolve`)."""

    optimizer: str | None = override(
        s.OptimizerSettings, "optimizer", default=None, default_text="adafactor for T5, adamw for encoders"
    )
    base: str | None = override(
        s.OptimizerSettings, "base", default=None, default_text="adafactor for T5, adamw for encoders"
    )
    rho: float | None = override(
        s.OptimizerSettings,
        "rho",
        default_text="for T5 with sam/fsam: 0.05 Small, 0.15 Base+, 0.02 mT5; otherwise "
        + override(s.OptimizerSettings, "rho").metadata["default_text"],
    )
    ascent_fraction: float | None = override(
        s.OptimizerSettings, "ascent_fraction", default=None, default_text="0.25, Bahri et al."
    )
    lr: float | None = override(
        s.OptimizerSettings, "lr", default=None, default_text="1e-3 T5, 2e-5 encoders", help="learning rate"
    )
    weight_decay: float = override(s.OptimizerSettings, "weight_decay", default=0.0, help="weight decay")
    betas: tuple[float, float] = override(s.OptimizerSettings, "betas", default=(0.9, 0.999))
    adam_eps: float = override(s.OptimizerSettings, "adam_eps", default=1e-8)
    batch: int | None = override(s.BatchSettings, "batch", default=None, default_text="128 for T5, 32 for encoders")
    save_every: int | None = override(s.LoopSettings, "save_every", default=None, default_text="--eval-every")
    out: str | None = override(s.LoopSettings, "out", default=None, required=True)

    def check(self) -> None:
        if self.out is None:
            raise UserError("--out is required (the run directory)")
        if self.model is None:
            raise UserError("--model is required (a local model directory or a hub id)")
        if self.steps is None:  # only the library can leave it unset: the flag has a default
            raise UserError("--steps is required for fine-tuning (the number of optimizer steps)")
        if self.optimizer is not None and not method(self.optimizer).is_sam:
            for name in ("rho", "base", "ascent_fraction"):
                if getattr(self, name) is not None:
                    raise UserError(
                        f"{s.flag(self, name)} applies to SAM-family optimizers "
                        f"({', '.join(m for m in METHODS if METHODS[m].is_sam)}), "
                        f"not --optimizer {self.optimizer}"
                    )
            if self.m != 1:
                raise UserError(f"--m applies to SAM-family optimizers, not --optimizer {self.optimizer}")
        if self.rho is not None and self.rho == 0:
            raise UserError(f"--rho must be > 0, got {self.rho}")
        from samlm.harness import parallel

        parallel.resolve_device(self.device)

    @property
    def is_sam(self) -> bool:
        return method(cast(str, self.optimizer)).is_sam  # set by resolve()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        return s.from_mapping(cls, values, what="finetune setting")

    def as_dict(self) -> dict:
        return s.as_dict(self)


def resolve(config: FinetuneConfig, defaults: Mapping[str, Any]) -> FinetuneConfig:
    """``config`` with every model-dependent default filled in (``defaults``: paper_defaults)."""
    optimizer = config.optimizer or defaults["optimizer"]
    sam = method(optimizer).is_sam
    if sam:
        base = config.base or defaults["base"]
        rho = config.rho if config.rho is not None else defaults["rho"]
        if rho is None:  # the method's own default (ASAM's scale differs from SAM's)
            rho = method(optimizer).default_rho
        ascent_fraction = config.ascent_fraction if config.ascent_fraction is not None else defaults["ascent_fraction"]
    else:
        base, rho, ascent_fraction = None, None, None
    batch = config.batch or defaults["batch"]
    eval_every = s.resolve_eval_every(config.eval_every, config.steps or 0)
    if batch % config.grad_accum:
        raise UserError(f"--batch {batch} is not divisible by --grad-accum {config.grad_accum}")
    if sam and batch % config.m:
        raise UserError(
            f"--m {config.m} does not divide --batch {batch}: each of the m groups needs an equal "
            "share of the batch's rows"
        )
    return dataclasses.replace(
        config,
        optimizer=optimizer,
        base=base,
        rho=rho,
        ascent_fraction=ascent_fraction,
        lr=config.lr if config.lr is not None else defaults["lr"],
        batch=batch,
        eval_every=eval_every,
        save_every=config.save_every if config.save_every is not None else eval_every,
    )


def validate(config: FinetuneConfig) -> None:
    s.validate(config)


def config_from_args(args: argparse.Namespace, **overrides) -> FinetuneConfig:
    return s.from_args(FinetuneConfig, args, **overrides)


def identity(record: Mapping[str, Any], *, parallel: bool = True) -> dict:
    """What a resumed run must share with the run it continues (``config.json``'s record): the
    resolved settings declared ``resume=True`` (the same local model however it is spelled),
    the resolved tasks and (``parallel``) the launch."""
    saved = record.get("config", {})
    names = {f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata.get("resume", True)}
    ident = {k: v for k, v in saved.items() if k in names and k != "task"}
    model = ident.get("model")
    if isinstance(model, str) and Path(model).expanduser().exists():
        ident["model"] = str(Path(model).expanduser().resolve())
    resolved = record.get("resolved", {})
    ident["tasks"] = resolved.get("tasks")
    if parallel:
        ident["parallel"] = resolved.get("parallel")
    return ident
