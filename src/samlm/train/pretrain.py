"""Pretrain a decoder-only language model with AdamW or a SAM-family optimizer.

The pretraining study of methods.md §3: next-token prediction, AdamW (β=(0.9, 0.98), eps 1e-9,
decoupled weight decay 0.1), linear warmup then cosine decay to 10% of the peak learning rate,
and an *equal number of steps* for every optimizer. One call, :func:`pretrain`, builds the
data, model, optimizer and schedule from a :class:`PretrainConfig`, runs
:func:`samlm.train.loop.train` and writes the run directory::

    OUT/config.json       the resolved configuration (checked again on --resume)
    OUT/metrics.jsonl     one line per evaluation / sharpness measurement (the loop)
    OUT/checkpoints/      checkpoint-<step>/ (the loop; exact resume)
    OUT/summary.json      final and best validation loss, perplexity, sharpness, speed, config

Defaults and conventions
    * Learning rate: peak ``lr`` (default 3e-3, tuned for the few-hundred-thousand to few-million
      parameter byte-level models this runs on a CPU; large models want ~1e-3 or less), reached
      after ``warmup`` steps of linear warmup from 10% of the peak (default: 5% of the steps, at
      most 1000), then cosine decay to 10% of the peak at the last step (nanodo's schedule).
    * Budget: ``steps``, or ``tokens_per_param`` (Chinchilla-style): steps =
      ⌈tokens_per_param · P / (batch · grad_accum · context)⌉, where P is the *total* number of
      distinct parameters (tied embeddings counted once), as Hoffmann et al. count them;
      ``param_count="non-embedding"`` uses the non-embedding count (Kaplan et al.) instead.
      Neither given: 20 tokens per parameter.
    * Data: the last 10% of the token stream is validation, whatever the seed, so every method
      and seed is evaluated on the same tokens; the seed sets the initial weights, the order of
      the training windows and any dropout.
    * Sharpness (:mod:`samlm.sharpness`): λ_max of the Hessian and of the Gauss-Newton matrix,
      λ_max of the functional Hessian, and SAM's logit/functional path norms at a fixed
      ``sharpness_rho`` (the same for every optimizer, so runs are comparable), measured in fp32
      and eval mode on the first ``sharpness_batches`` validation batches of
      ``sharpness_batch_size`` rows, every ``sharpness_every`` steps and always at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from samlm import io
from samlm.errors import UserError
from samlm.progress import say

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
DEFAULT_LR = 3e-3
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "fsam": 0.05, "psam": 0.05, "pfsam": 0.05}
PARAM_COUNTS = ("total", "non-embedding")
MAX_DEFAULT_WARMUP = 1000

# Keys that may change between a run and its --resume: they change what is observed or
# saved, never the trajectory of the weights.
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "overwrite", "progress", "eval_every", "save_every", "keep_checkpoints",
    "sharpness", "sharpness_every", "nonfinite", "steps", "tokens_per_param", "warmup", "threads",
    "device", "strategy", "mixed_precision", "sync_ascent",   # compared in their resolved form below
    "max_nonfinite", "dry_run",
})
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # lr, rho, ... multiply fp32 weights
# Summary keys that are wall-clock measurements (differ between otherwise identical runs).
TIMING_KEYS = frozenset({"step_s", "tokens_per_s", "train_seconds", "wall_seconds", "sharpness_seconds"})


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (the CLI flags, one to one)."""

    out: str = "runs/pretrain"
    # model: built from flags, or loaded from a directory / hub id
    arch: str = "gpt2"
    layers: int = 4
    width: int = 128
    heads: int = 4
    context: int = 128
    dropout: float = 0.0
    model: str | None = None
    trust_remote_code: bool = False
    # data
    data: str = "tinyshakespeare"
    tokenizer: str | None = None      # None: "bytes", or the --model directory's tokenizer
    max_chars: int | None = None
    val_fraction: float = 0.1
    # optimizer and schedule
    optimizer: str = "adamw"
    rho: float | None = None          # None: the method's default (DEFAULT_RHO)
    ascent_fraction: float = 0.25
    m: int = 1
    lr: float = DEFAULT_LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-9
    warmup: int | None = None         # None: 5% of the steps (at most 1000)
    min_lr_ratio: float = 0.1
    clip: float | None = None
    batch: int = 32
    grad_accum: int = 1
    steps: int | None = None
    tokens_per_param: float | None = None
    param_count: str = "total"
    seed: int = 0
    # loop
    eval_every: int = 100
    val_batches: int = 16             # 0: the whole validation split
    save_every: int = 0
    keep_checkpoints: int = 2
    sharpness: bool = True
    sharpness_every: int = 0          # 0: only at the end
    sharpness_iters: int = 20
    sharpness_batches: int = 1
    sharpness_batch_size: int = 8
    sharpness_rho: float = 0.05
    split: bool = False               # per-step logit/functional path norms (SAM family)
    nonfinite: str = "skip"
    max_nonfinite: int = 5            # --nonfinite stop: consecutive non-finite steps allowed
    dry_run: bool = False             # check everything, write nothing
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None        # torch.set_num_threads for the run (None: leave as is)
    # devices and processes (samlm.train.parallel)
    device: str = "auto"
    strategy: str = "auto"
    sync_ascent: bool = False
    mixed_precision: str | None = None  # None: accelerate's setting, else "no"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown pretrain setting(s): {', '.join(unknown)}")
        return cls(**dict(values))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Resolved:
    """Values derived from the config once data and model exist."""

    tokenizer: str
    total_steps: int
    warmup_steps: int
    rho: float | None
    params: int
    non_embedding_params: int
    vocab_size: int
    tokens_per_step: int
    train_tokens: int
    val_tokens: int
    parallel: dict                    # world_size, strategy, mixed_precision, sync_ascent

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"--{name} must be a positive integer, got {value!r}")


def _nonnegative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"--{name} must be an integer >= 0, got {value!r}")


def _finite(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and abs(value) > FLOAT32_MAX:
        raise UserError(f"--{name.replace('_', '-')} {value:g} is beyond float32's range (|x| <= {FLOAT32_MAX:.3g}), "
                        "in which the weights are updated")
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        where = f" in {lo}{hi}" if low is not None and high is not None else (
            f" {'>' if low_open else '>='} {low}" if low is not None else "")
        raise UserError(f"--{name.replace('_', '-')} must be a finite number{where}, got {value!r}")


def validate(config: PretrainConfig) -> None:
    """Every bad value is a one-line ``UserError`` naming the flag."""
    from samlm.models import ARCHITECTURES
    from samlm.optim import OPTIMIZER_NAMES

    if config.optimizer not in OPTIMIZER_NAMES:
        raise UserError(f"unknown optimizer '{config.optimizer}' (choose from {', '.join(OPTIMIZER_NAMES)})")
    if config.model is None:
        if config.arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture '{config.arch}' (choose from {', '.join(ARCHITECTURES)})")
        for name in ("layers", "width", "heads"):
            _positive_int(name, getattr(config, name))
        if config.width % config.heads:
            raise UserError(f"--width {config.width} is not divisible by --heads {config.heads}")
    if config.model is not None:
        path = Path(config.model).expanduser()
        local = path.is_absolute() or config.model.startswith((".", "~")) or config.model.count("/") > 1
        if local and not path.exists():
            raise UserError(f"--model: model directory {config.model} not found")
    _positive_int("context", config.context)
    _finite("dropout", config.dropout, low=0.0, high=1.0, high_open=True)
    _finite("val_fraction", config.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    if config.max_chars is not None:
        _positive_int("max-chars", config.max_chars)
    if config.rho is not None:
        _finite("rho", config.rho, low=0.0)
    _finite("ascent_fraction", config.ascent_fraction, low=0.0, high=1.0, low_open=True)
    _positive_int("m", config.m)
    _finite("lr", config.lr, low=0.0, low_open=True)
    _finite("weight_decay", config.weight_decay, low=0.0)
    _finite("beta1", config.beta1, low=0.0, high=1.0, high_open=True)
    _finite("beta2", config.beta2, low=0.0, high=1.0, high_open=True)
    _finite("adam_eps", config.adam_eps, low=0.0, low_open=True)
    _finite("min_lr_ratio", config.min_lr_ratio, low=0.0, high=1.0)
    if config.clip is not None:
        _finite("clip", config.clip, low=0.0, low_open=True)
    _positive_int("batch", config.batch)
    _positive_int("grad-accum", config.grad_accum)
    if config.m > config.batch:
        raise UserError(f"--m {config.m} is larger than --batch {config.batch} (each m-group needs a row)")
    if config.steps is not None and config.tokens_per_param is not None:
        raise UserError("give either --steps or --tokens-per-param, not both")
    if config.steps is not None:
        _positive_int("steps", config.steps)
    if config.tokens_per_param is not None:
        _finite("tokens_per_param", config.tokens_per_param, low=0.0, low_open=True)
    if config.param_count not in PARAM_COUNTS:
        raise UserError(f"--param-count must be one of {', '.join(PARAM_COUNTS)}, got '{config.param_count}'")
    if config.warmup is not None:
        _nonnegative_int("warmup", config.warmup)
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {config.seed!r}")
    for name in ("eval_every", "val_batches", "save_every", "sharpness_every"):
        _nonnegative_int(name.replace("_", "-"), getattr(config, name))
    _positive_int("keep-checkpoints", config.keep_checkpoints)
    for name in ("sharpness_iters", "sharpness_batches", "sharpness_batch_size"):
        _positive_int(name.replace("_", "-"), getattr(config, name))
    _finite("sharpness_rho", config.sharpness_rho, low=0.0, low_open=True)
    if config.split and config.optimizer == "adamw":
        raise UserError("--split measures SAM's logit/functional paths: it needs a SAM-family --optimizer")
    if config.nonfinite not in ("skip", "stop"):
        raise UserError(f"--nonfinite must be skip or stop, got '{config.nonfinite}'")
    _positive_int("max-nonfinite", config.max_nonfinite)
    if config.threads is not None:
        _positive_int("threads", config.threads)
    from samlm.train import parallel

    parallel.resolve_device(config.device)
    if config.strategy not in parallel.STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(parallel.STRATEGIES)}, got '{config.strategy}'")
    if config.mixed_precision is not None and config.mixed_precision not in parallel.MIXED_PRECISION:
        raise UserError(f"--mixed-precision must be one of {', '.join(parallel.MIXED_PRECISION)}, "
                        f"got '{config.mixed_precision}'")
    if config.resume and config.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")


def _check_step_split(config: PretrainConfig, world_size: int) -> None:
    """Each process's rows of a step (batch/processes × grad-accum) must split into --m groups,
    each with an ascent row: checked before anything is written."""
    if config.optimizer == "adamw":
        return
    from samlm.optim.batching import plan_step

    rows = config.batch // world_size
    try:
        plan_step([rows] * config.grad_accum, config.ascent_fraction, config.m)
    except ValueError as exc:
        per = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise UserError(f"cannot split a step of {rows * config.grad_accum} rows{per} for SAM "
                        f"(--batch {config.batch}, --grad-accum {config.grad_accum}, --m {config.m}, "
                        f"--ascent-fraction {config.ascent_fraction:g}): {exc}") from None


def _check_out_dir(config: PretrainConfig) -> None:
    """Refuse to clobber an existing run, before anything is written."""
    from samlm.train.loop import CHECKPOINTS_DIR, METRICS_FILE

    out = Path(config.out)
    has_run = (out / METRICS_FILE).exists() or bool(io.checkpoint_dirs(out / CHECKPOINTS_DIR))
    if has_run and not (config.resume or config.overwrite):
        raise UserError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start over, "
                        "or choose another --out")


def identity(record: Mapping[str, Any]) -> dict:
    """The part of a saved run configuration that must match for a resume to be exact."""
    config = {k: v for k, v in record.get("config", {}).items() if k not in RESUMABLE_CHANGES}
    resolved = record.get("resolved", {})
    config["total_steps"] = resolved.get("total_steps")
    config["warmup_steps"] = resolved.get("warmup_steps")
    config["rho"] = resolved.get("rho")
    config["tokenizer"] = resolved.get("tokenizer")
    config["parallel"] = resolved.get("parallel")
    return config


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    a, b = identity(saved), identity(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_resume_matches(config: PretrainConfig, record: dict) -> None:
    from samlm.train.loop import CHECKPOINTS_DIR

    out = Path(config.out)
    saved_file = out / CONFIG_FILE
    if not (config.resume and io.checkpoint_dirs(out / CHECKPOINTS_DIR) and saved_file.is_file()):
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{saved_file} is unreadable ({exc}); cannot check that --resume continues the same run")
    keys = differing_keys(saved, record)
    if keys:
        a, b = identity(saved), identity(record)
        shown = ", ".join(f"{k} ({a.get(k)!r} in the run, {b.get(k)!r} now)" for k in keys[:6])
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        raise UserError(f"cannot resume {out}: it was run with a different configuration: {shown}{more}; "
                        "use the same flags, or --overwrite to start over")


# --------------------------------------------------------------------------- building blocks


_TOKEN_CACHE: dict[tuple, Any] = {}


def load_dataset(config: PretrainConfig, tokenizer):
    """The :class:`~samlm.data.text.LMDataset` of a config (the token stream is cached per process)."""
    from samlm.data.text import LMDataset, encode_text, load_corpus, tokenizer_vocab_size

    key = (config.data, getattr(tokenizer, "name_or_path", getattr(tokenizer, "name", None)),
           tokenizer_vocab_size(tokenizer), config.max_chars)
    tokens = _TOKEN_CACHE.get(key)
    if tokens is None:
        tokens = encode_text(tokenizer, load_corpus(config.data, max_chars=config.max_chars))
        _TOKEN_CACHE.clear()  # keep one corpus in memory at most
        _TOKEN_CACHE[key] = tokens
    return LMDataset(tokens, context=config.context, vocab_size=tokenizer_vocab_size(tokenizer),
                     val_fraction=config.val_fraction)


def resolve_tokenizer_name(config: PretrainConfig) -> str:
    if config.tokenizer is not None:
        return config.tokenizer
    return config.model if config.model is not None else "bytes"


def build_model(config: PretrainConfig, vocab_size: int):
    """Fresh decoder from the shape flags (weights from ``seed``), or the ``--model`` checkpoint."""
    from samlm.models import build_decoder, load_causal_lm

    if config.model is None:
        return build_decoder(config.arch, layers=config.layers, width=config.width, heads=config.heads,
                             context=config.context, vocab_size=vocab_size, dropout=config.dropout,
                             seed=config.seed)
    model = load_causal_lm(config.model, trust_remote_code=config.trust_remote_code)
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size > model_vocab:
        raise UserError(f"the tokenizer has {vocab_size} tokens but model {config.model} embeds only {model_vocab}; "
                        "use the model's own tokenizer (--tokenizer)")
    positions = max_positions(model)
    if positions is not None and config.context > positions:
        raise UserError(f"--context {config.context} is longer than model {config.model}'s {positions} positions")
    return model


def max_positions(model) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def lr_schedule(total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` scheduler steps: linear warmup from ``min_ratio``
    to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at step ``total_steps - 1``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return min_ratio + (1.0 - min_ratio) * step / warmup_steps
        decay_steps = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def resolve_steps(config: PretrainConfig, params: int, non_embedding_params: int) -> tuple[int, int]:
    """(total steps, warmup steps) from --steps or --tokens-per-param, and --warmup."""
    if config.steps is not None:
        total = config.steps
    else:
        per_param = 20.0 if config.tokens_per_param is None else config.tokens_per_param
        counted = params if config.param_count == "total" else non_embedding_params
        total = max(1, math.ceil(per_param * counted / (config.batch * config.grad_accum * config.context)))
    warmup = min(MAX_DEFAULT_WARMUP, round(0.05 * total)) if config.warmup is None else config.warmup
    if warmup >= total and total > 1:
        raise UserError(f"--warmup {warmup} must be smaller than the number of steps ({total})")
    return total, min(warmup, max(total - 1, 0))


SHARPNESS_KEYS = (
    "hessian_lambda_max", "gauss_newton_lambda_max", "functional_lambda", "functional_lambda_min",
    "logit_path_norm", "functional_path_norm", "logit_functional_ratio", "logit_path_cosine",
    "functional_path_cosine", "grad_norm", "loss", "iters", "converged", "rho",
)


def sharpness_probe(batches: list, *, iters: int = 20, seed: int = 0, rho: float = 0.05,
                    method: str = "lanczos") -> Callable[[torch.nn.Module], dict]:
    """``probe(model) -> dict``: :func:`samlm.sharpness.measure_sharpness` of a causal LM on fixed
    batches (token-mean cross-entropy, fp32, eval mode); what the loop's ``sharpness=`` calls."""
    from samlm.data.text import lm_loss
    from samlm.models import lm_forward
    from samlm.sharpness import measure_sharpness

    def probe(model: torch.nn.Module) -> dict:
        device = next(model.parameters()).device
        moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
        started = time.perf_counter()
        result = measure_sharpness(model, moved, lm_forward(model), lm_loss, iters=iters, seed=seed, rho=rho,
                                   method=method)
        out = {k: result[k] for k in SHARPNESS_KEYS if k in result}
        out["seconds"] = time.perf_counter() - started
        return out

    return probe


# --------------------------------------------------------------------------- the run


def pretrain(config: PretrainConfig | Mapping[str, Any], *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) one pretraining run; returns the summary also written to ``OUT/summary.json``.

    ``summary["completed"]`` is False when a signal (Ctrl-C, SIGTERM) stopped the run early; its
    checkpoint and results so far are on disk and ``resume=True`` continues it exactly.
    """
    from samlm import distributed
    from samlm.data.text import load_tokenizer, tokenizer_vocab_size
    from samlm.models import count_parameters
    from samlm.optim import build_optimizer
    from samlm.train import parallel
    from samlm.train.loop import LoopConfig, clear_run, lm_evaluator, train

    started = time.perf_counter()
    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.from_mapping(config)
    validate(config)
    _check_out_dir(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = parallel.setup(config.device)
    distributed.check_batch_split(config.batch, info.world_size)
    _check_step_split(config, info.world_size)
    main = info.is_main

    tokenizer_name = resolve_tokenizer_name(config)
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=config.trust_remote_code)
    dataset = load_dataset(config, tokenizer)
    vocab_size = tokenizer_vocab_size(tokenizer)
    model = build_model(config, vocab_size)
    params = count_parameters(model)
    non_embedding = count_parameters(model, exclude_embeddings=True)
    total_steps, warmup_steps = resolve_steps(config, params, non_embedding)
    par = parallel.parallelize(model, info, strategy=config.strategy, sync_ascent=config.sync_ascent,
                               mixed_precision=config.mixed_precision, sam=config.optimizer != "adamw")
    if par.strategy == "fsdp" and config.sharpness:
        raise UserError("sharpness measurements need the whole model on each process: "
                        "pass --no-sharpness with --strategy fsdp")
    model = par.module
    rho = None
    if config.optimizer != "adamw":
        rho = DEFAULT_RHO[config.optimizer] if config.rho is None else config.rho
    elif config.rho is not None:
        say(f"--rho {config.rho} is ignored: adamw has no perturbation radius")
    resolved = _Resolved(
        tokenizer=tokenizer_name, total_steps=total_steps, warmup_steps=warmup_steps, rho=rho, params=params,
        non_embedding_params=non_embedding, vocab_size=vocab_size,
        tokens_per_step=config.batch * config.grad_accum * config.context,
        train_tokens=int(dataset.train_tokens.numel()), val_tokens=int(dataset.val_tokens.numel()),
        parallel=par.describe(),
    )
    record = {"config": config.as_dict(), "resolved": resolved.as_dict()}
    _check_resume_matches(config, record)

    train_batches = dataset.train_batches(config.batch, seed=config.seed)  # checks batch vs corpus size
    train_batches = distributed.shard_batches(train_batches, info.rank, info.world_size)
    val = dataset.val_batches(config.batch, max_batches=config.val_batches or None)
    evaluate = lm_evaluator(val)
    probe = None
    if config.sharpness:
        probe_batches = dataset.val_batches(config.sharpness_batch_size, max_batches=config.sharpness_batches)
        probe = sharpness_probe(probe_batches, iters=config.sharpness_iters, seed=config.seed,
                                rho=config.sharpness_rho)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
        betas=(config.beta1, config.beta2), eps=config.adam_eps, ascent_fraction=config.ascent_fraction,
        m=config.m, sam_kwargs=par.sam_kwargs, **({} if rho is None else {"rho": rho}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(total_steps, warmup_steps, config.min_lr_ratio))
    loop_config = LoopConfig(
        out_dir=config.out, steps=total_steps, eval_every=config.eval_every, save_every=config.save_every,
        keep_checkpoints=config.keep_checkpoints, grad_accum=config.grad_accum,
        sharpness_every=config.sharpness_every if probe is not None else 0, split=config.split,
        max_grad_norm=config.clip, nonfinite=config.nonfinite, max_consecutive_nonfinite=config.max_nonfinite,
        resume=config.resume, overwrite=config.overwrite, seed=config.seed, progress=config.progress,
    )
    if config.dry_run:
        return {"dry_run": True, **record, **_environment(info.world_size)}
    out = Path(config.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            # The old run goes before the new config.json comes: a crash in between never pairs
            # the new settings with the old checkpoints.
            clear_run(out)
        elif not config.resume:
            (out / SUMMARY_FILE).unlink(missing_ok=True)
        io.atomic_write_json(out / CONFIG_FILE, dict(record, **_environment(info.world_size)))

    result = train(par.model, optimizer, train_batches, config=loop_config, evaluate=evaluate, scheduler=scheduler,
                   sharpness=probe, on_step=on_step, scaler=par.scaler, step_kwargs=par.step_kwargs)

    history = list(result.history)
    if probe is not None and result.completed and not (history and history[-1].get("step") == result.step
                                                       and "sharpness" in history[-1]):
        # sharpness_every does not divide the steps (or is 0): measure the final weights too.
        # Deterministic, so a resumed run writes the same line again.
        model.eval()
        try:
            line = {"step": result.step, "sharpness": probe(model)}
        finally:
            model.train()
        line = io.json_safe(line)
        if main:
            io.append_jsonl(out / "metrics.jsonl", line)
        history.append(line)
    summary = build_summary(config, resolved, result, history, wall_seconds=time.perf_counter() - started,
                            world_size=info.world_size)
    if main:
        io.atomic_write_json(out / SUMMARY_FILE, summary)
    distributed.barrier()
    return summary


def _environment(world_size: int = 1) -> dict:
    import samlm

    return {
        "samlm_version": samlm.__version__,
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processes": world_size,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
    }


def build_summary(config: PretrainConfig, resolved: _Resolved, result, history: list[dict], *,
                  wall_seconds: float, world_size: int = 1) -> dict:
    """Flat headline numbers first, then the loop's summary and the full configuration."""
    loop = result.summary()
    final = loop.get("final") or {}
    best = loop.get("best") or {}
    sharp_lines = [r for r in history if isinstance(r.get("sharpness"), dict)]
    sharp = sharp_lines[-1]["sharpness"] if sharp_lines else {}
    train_lines = [r for r in history if "train_loss" in r]
    summary = {
        "optimizer": config.optimizer,
        "rho": resolved.rho,
        "seed": config.seed,
        "completed": loop["completed"],
        "interrupted": loop["interrupted"],
        "step": loop["step"],
        "steps": loop["steps"],
        "val_loss": final.get("val_loss"),
        "val_ppl": final.get("val_ppl"),
        "best_val_loss": best.get("val_loss", {}).get("value"),
        "best_val_loss_step": best.get("val_loss", {}).get("step"),
        "best_val_ppl": best.get("val_ppl", {}).get("value"),
        "train_loss": train_lines[-1]["train_loss"] if train_lines else None,
        "hessian_lambda_max": sharp.get("hessian_lambda_max"),
        "gauss_newton_lambda_max": sharp.get("gauss_newton_lambda_max"),
        "functional_lambda": sharp.get("functional_lambda"),
        "logit_path_norm": sharp.get("logit_path_norm"),
        "functional_path_norm": sharp.get("functional_path_norm"),
        "logit_functional_ratio": sharp.get("logit_functional_ratio"),
        "sharpness_step": sharp_lines[-1]["step"] if sharp_lines else None,
        "step_s": loop["step_s"],
        "tokens_per_s": loop["tokens_per_s"],
        "train_seconds": loop["train_seconds"],
        "wall_seconds": wall_seconds,
        "sharpness_seconds": sum(float(r["sharpness"].get("seconds", 0.0)) for r in sharp_lines),
        "tokens": loop["tokens"],
        "params": resolved.params,
        "non_embedding_params": resolved.non_embedding_params,
        "nonfinite_steps": loop["nonfinite_steps"],
        "sharpness": sharp,
        "loop": loop,
        "config": config.as_dict(),
        "resolved": resolved.as_dict(),
    }
    summary.update(_environment(world_size))
    return io.json_safe(summary)


# --------------------------------------------------------------------------- CLI


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and data flags, shared by ``pretrain``, ``compare`` and ``sharpness``."""
    d = PretrainConfig()
    group = parser.add_argument_group("model")
    group.add_argument("--arch", choices=("gpt2", "llama"), default=None, help=f"decoder family (default {d.arch})")
    group.add_argument("--layers", type=int, default=None, help=f"transformer blocks (default {d.layers})")
    group.add_argument("--width", type=int, default=None, help=f"model width (default {d.width})")
    group.add_argument("--heads", type=int, default=None, help=f"attention heads (default {d.heads})")
    group.add_argument("--context", type=int, default=d.context, help=f"tokens per training window (default {d.context})")
    group.add_argument("--dropout", type=float, default=d.dropout)
    group.add_argument("--model", metavar="DIR_OR_HUB_ID", default=None,
                       help="start from this causal LM instead of a fresh one built from --arch/--layers/...")
    group.add_argument("--trust-remote-code", action="store_true")
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=d.data,
                       help="'tinyshakespeare' (built in), a text file or directory, or a datasets hub id "
                            "NAME[:CONFIG][:SPLIT]")
    group.add_argument("--tokenizer", default=None,
                       help="'bytes' (default; UTF-8 bytes) or a Hugging Face tokenizer name/path "
                            "(default with --model: the model's)")
    group.add_argument("--max-chars", type=int, default=None, help="truncate the corpus to this many characters")


def add_training_arguments(parser: argparse.ArgumentParser, *, single_run: bool = True) -> None:
    """Optimizer, budget and loop flags (``compare`` sets --optimizer/--rho/--seed itself)."""
    d = PretrainConfig()
    group = parser.add_argument_group("optimizer")
    if single_run:
        group.add_argument("--optimizer", default=d.optimizer, help="adamw|sam|asam|fsam|psam|pfsam")
        group.add_argument("--rho", type=float, default=None,
                           help="perturbation radius (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_RHO.items()) + ")")
        group.add_argument("--seed", type=int, default=d.seed, help="initial weights, data order, dropout")
    group.add_argument("--ascent-fraction", type=float, default=d.ascent_fraction,
                       help="share of the batch for SAM's ascent gradient (Bahri et al. 0.25; 1 = classic SAM)")
    group.add_argument("--m", type=int, default=d.m, help="m-sharpness groups per batch")
    group.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    group.add_argument("--weight-decay", type=float, default=d.weight_decay)
    group.add_argument("--betas", default=f"{d.beta1},{d.beta2}", help="AdamW betas (default 0.9,0.98)")
    group.add_argument("--adam-eps", type=float, default=d.adam_eps)
    group.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 5%% of the steps, <= 1000)")
    group.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor, x peak lr (default 0.1)")
    group.add_argument("--clip", type=float, default=None, help="clip the update gradient's norm (default: none)")
    group.add_argument("--batch", type=int, default=d.batch, help="sequences per micro-batch")
    group.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    group = parser.add_argument_group("budget (equal steps for every optimizer)")
    group.add_argument("--steps", type=int, default=None, help="optimizer steps")
    group.add_argument("--tokens-per-param", type=float, default=None,
                       help="Chinchilla-style budget: steps = tokens_per_param x params / tokens per step "
                            "(default when --steps is not given: 20)")
    group.add_argument("--param-count", choices=PARAM_COUNTS, default=d.param_count,
                       help="parameters counted by --tokens-per-param (default total, as Chinchilla)")
    group = parser.add_argument_group("evaluation, checkpoints, sharpness")
    group.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (and at the end)")
    group.add_argument("--val-batches", type=int, default=d.val_batches,
                       help=f"validation batches of --batch windows (default {d.val_batches}; 0 = all)")
    group.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: at the end)")
    group.add_argument("--sharpness-every", type=int, default=d.sharpness_every,
                       help="measure sharpness every N steps (0: only at the end)")
    group.add_argument("--no-sharpness", action="store_true", help="skip the sharpness measurements")
    group.add_argument("--sharpness-iters", type=int, default=d.sharpness_iters, help="Lanczos iterations")
    group.add_argument("--sharpness-batches", type=int, default=d.sharpness_batches,
                       help="fixed validation batches for sharpness")
    group.add_argument("--sharpness-batch-size", type=int, default=d.sharpness_batch_size)
    group.add_argument("--sharpness-rho", type=float, default=d.sharpness_rho,
                       help="rho of the logit/functional path split (the same for every optimizer)")
    group.add_argument("--split", action="store_true", help="log SAM's logit/functional path norms every step")
    group.add_argument("--nonfinite", choices=("skip", "stop"), default=d.nonfinite,
                       help="on a NaN/Inf loss: skip the step, or stop after --max-nonfinite in a row")
    group.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite, metavar="N",
                       help=f"with --nonfinite stop: consecutive non-finite steps allowed (default {d.max_nonfinite})")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if single_run:  # compare runs its jobs itself, one process each
        from samlm.train import parallel

        parallel.add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    add_training_arguments(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=PretrainConfig.out, help="run directory (default runs/pretrain)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    group.add_argument("--dry-run", action="store_true",
                       help="check flags, data, model and --out, print the resolved run; write nothing")


def _parse_betas(text: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2:
        raise UserError(f"--betas must be two numbers like 0.9,0.98, got '{text}'")
    return parts[0], parts[1]


def config_from_args(args: argparse.Namespace, **overrides) -> PretrainConfig:
    """A :class:`PretrainConfig` from parsed flags (shape flags conflict with --model)."""
    d = PretrainConfig()
    shape = {name: getattr(args, name) for name in ("arch", "layers", "width", "heads")}
    if args.model is not None:
        given = [f"--{k}" for k, v in shape.items() if v is not None]
        if given:
            raise UserError(f"--model loads an existing model: {', '.join(given)} cannot change its shape")
    shape = {k: getattr(d, k) if v is None else v for k, v in shape.items()}
    beta1, beta2 = _parse_betas(args.betas)
    values = dict(
        shape, context=args.context, dropout=args.dropout, model=args.model,
        trust_remote_code=args.trust_remote_code, data=args.data, tokenizer=args.tokenizer,
        max_chars=args.max_chars, ascent_fraction=args.ascent_fraction, m=args.m, lr=args.lr,
        weight_decay=args.weight_decay, beta1=beta1, beta2=beta2, adam_eps=args.adam_eps, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, clip=args.clip, batch=args.batch, grad_accum=args.grad_accum,
        steps=args.steps, tokens_per_param=args.tokens_per_param, param_count=args.param_count,
        eval_every=args.eval_every, val_batches=args.val_batches, save_every=args.save_every,
        sharpness=not args.no_sharpness, sharpness_every=args.sharpness_every,
        sharpness_iters=args.sharpness_iters, sharpness_batches=args.sharpness_batches,
        sharpness_batch_size=args.sharpness_batch_size, sharpness_rho=args.sharpness_rho, split=args.split,
        nonfinite=args.nonfinite, max_nonfinite=args.max_nonfinite, progress=not args.no_progress,
        threads=args.threads,
        device=getattr(args, "device", d.device), strategy=getattr(args, "strategy", d.strategy),
        sync_ascent=getattr(args, "sync_ascent", d.sync_ascent),
        mixed_precision=getattr(args, "mixed_precision", d.mixed_precision),
    )
    for name in ("optimizer", "rho", "seed", "out", "resume", "overwrite", "dry_run"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(overrides)
    return PretrainConfig(**values)


def format_result(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines about a finished (or interrupted) run."""

    def num(key, fmt=".4f"):
        value = summary.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "n/a"

    lines = [
        f"{summary['optimizer']}" + (f" rho={summary['rho']:g}" if summary.get("rho") is not None else "")
        + f" seed={summary['seed']}: step {summary['step']}/{summary['steps']}"
        + ("" if summary.get("completed") else f" (stopped by {summary.get('interrupted')})"),
        f"  val loss {num('val_loss')} (ppl {num('val_ppl', '.6g')}), best {num('best_val_loss')}"
        f" at step {summary.get('best_val_loss_step')}, train loss {num('train_loss')}",
    ]
    if summary.get("hessian_lambda_max") is not None:
        lines.append(f"  lambda_max(H) {num('hessian_lambda_max', '.4g')}, lambda_max(GN) "
                     f"{num('gauss_newton_lambda_max', '.4g')}, logit/functional path ratio "
                     f"{num('logit_functional_ratio', '.3g')} (step {summary.get('sharpness_step')})")
    step_ms = summary.get("step_s")
    lines.append(f"  {step_ms * 1000:.1f} ms/step, {num('tokens_per_s', ',.0f')} tokens/s"
                 if isinstance(step_ms, (int, float)) else "  no steps taken")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from samlm.distributed import is_main_process

    config = config_from_args(args)
    summary = pretrain(config)
    if summary.get("dry_run"):
        if is_main_process():
            print(json.dumps(summary, indent=2, default=str))
            say(f"dry run: flags, data, model and {config.out} are fine; nothing was written")
        return 0
    if is_main_process():
        print(format_result(summary))
        print(f"  results: {Path(config.out) / SUMMARY_FILE}")
        if not summary.get("completed"):
            print(f"  resume with the same flags and --resume (out: {config.out})")
    return 0 if summary.get("completed") else 130
