"""Building a pretraining run from its settings: tokenizer and data, model, optimizer, step budget
and learning-rate schedule, and the sharpness probe the loop calls."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from samlm.errors import UserError
from samlm.harness.pretrain.config import PretrainConfig

MAX_DEFAULT_WARMUP = 1000
DEFAULT_TOKENS_PER_PARAM = 20.0


@dataclass
class RunData:
    """A run's tokens and tokenizer (:func:`load_data`)."""

    dataset: Any  # samlm.data.windows.LMDataset over the prepared memory maps
    tokenizer: Any
    tokenizer_name: str  # what the run records: as given (bytes, a hub id, bpe:8192)
    vocab_size: int
    prepared: Any  # samlm.data.store.PreparedTokens
    origin: str | None = None  # a raw spec: where the cache keeps its tokens (said once the run starts)

    def describe(self) -> dict:
        """``config.json``'s ``resolved.data``: the prepared data the run reads."""
        return self.prepared.summary()


def load_data(config: PretrainConfig, *, progress: bool | None = None) -> RunData:
    """The prepared tokens of ``--data`` (a prepared directory as it is; a raw spec prepared once
    into the cache and reused by every later run, :func:`samlm.data.cache.ensure_prepared`),
    memory-mapped, and the tokenizer they were made with. A prepared directory whose tokenizer
    differs from ``--tokenizer`` (or ``--model``'s own) is refused in one line."""
    from samlm.data import Budget, LMDataset, ensure_prepared, is_prepared_dir, load_prepared, load_tokenizer
    from samlm.data.store import META_FILE

    if is_prepared_dir(config.data):
        prepared = load_prepared(config.data)
        _check_prepared_tokenizer(config, prepared)
        name = prepared.tokenizer_name
        origin = None
    else:
        name = resolve_tokenizer_name(config)
        started = time.time()
        prepared = ensure_prepared(
            config.data,
            name,
            max_chars=config.max_chars,
            budget=Budget(val_fraction=config.val_fraction),
            trust_remote_code=config.trust_remote_code,
            progress=config.progress if progress is None else progress,
        )
        # meta.json is the last file a prepare writes: newer than this call, the tokens are new.
        fresh = (prepared.path / META_FILE).stat().st_mtime >= started
        origin = f"data {config.data}: {'prepared into' if fresh else 'read from'} the cache, {prepared.path}"
    tokenizer = load_tokenizer(prepared.tokenizer_path())
    dataset = LMDataset.from_splits(
        prepared.train,
        prepared.val,
        context=config.context,
        vocab_size=prepared.vocab_size,
        what=f"{len(prepared.train)} training and {len(prepared.val)} validation tokens of {config.data}",
    )
    return RunData(dataset, tokenizer, name, prepared.vocab_size, prepared, origin)


def _check_prepared_tokenizer(config: PretrainConfig, prepared) -> None:
    from samlm.data.tokenizers import parse_bpe, tokenizer_sha256

    asked, flag = (config.tokenizer, "--tokenizer") if config.tokenizer is not None else (config.model, "--model")
    if asked is None:
        return
    if parse_bpe(asked) is not None:
        if asked.lower() != prepared.tokenizer_name.lower():
            raise UserError(
                f"--data {config.data} was prepared with tokenizer '{prepared.tokenizer_name}', "
                f"not {asked}: drop --tokenizer or prepare the data again"
            )
        return
    try:
        sha256 = tokenizer_sha256(asked, trust_remote_code=config.trust_remote_code)
    except UserError:
        if flag == "--model":
            return  # a model directory without a tokenizer: its vocabulary is checked with the model
        raise
    if sha256 != prepared.tokenizer_sha256:
        raise UserError(
            f"--data {config.data} was prepared with tokenizer '{prepared.tokenizer_name}', which is not "
            f"{flag} {asked}'s tokenizer: prepare the data with that tokenizer (samlm prepare "
            f"--tokenizer {asked}), or drop {flag}"
        )


def validation_slices(batches: list, val_batches: int) -> tuple[list, list]:
    """The tuning slice (the first ``val_batches`` validation batches, 0: all of them; what
    ``val_loss`` has always measured, and what a comparison selects its learning rate and ρ by)
    and the disjoint report slice after it (the next ``val_batches``, fewer where the split ends,
    none when nothing is left; ``report_loss``)."""
    if not val_batches:
        return list(batches), []
    return batches[:val_batches], batches[val_batches : 2 * val_batches]


def resolve_tokenizer_name(config: PretrainConfig) -> str:
    if config.tokenizer is not None:
        return config.tokenizer
    return config.model if config.model is not None else "bytes"


def build_model(config: PretrainConfig, vocab_size: int):
    """Fresh decoder from the shape flags (weights from ``seed``), or the ``--model`` checkpoint."""
    from samlm.models import build_decoder, load_causal_lm

    if config.model is None:
        return build_decoder(
            config.arch,
            layers=config.layers,
            width=config.width,
            heads=config.heads,
            context=config.context,
            vocab_size=vocab_size,
            dropout=config.dropout,
            seed=config.seed,
        )
    model = load_causal_lm(config.model, trust_remote_code=config.trust_remote_code)
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size > model_vocab:
        raise UserError(
            f"the tokenizer has {vocab_size} tokens but model {config.model} embeds only {model_vocab}; "
            "use the model's own tokenizer (--tokenizer)"
        )
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
        per_param = DEFAULT_TOKENS_PER_PARAM if config.tokens_per_param is None else config.tokens_per_param
        counted = params if config.param_count == "total" else non_embedding_params
        total = max(1, math.ceil(per_param * counted / (config.batch * config.context)))
    warmup = min(MAX_DEFAULT_WARMUP, round(0.05 * total)) if config.warmup is None else config.warmup
    if warmup >= total and total > 1:
        raise UserError(f"--warmup {warmup} must be smaller than the number of steps ({total})")
    return total, min(warmup, max(total - 1, 0))


SHARPNESS_KEYS = (
    "hessian_lambda_max",
    "gauss_newton_lambda_max",
    "functional_lambda",
    "functional_lambda_min",
    "preconditioned_lambda_max",
    "logit_path_norm",
    "functional_path_norm",
    "logit_functional_ratio",
    "logit_path_cosine",
    "functional_path_cosine",
    "grad_norm",
    "loss",
    "iters",
    "converged",
    "rho",
)


def sharpness_probe(
    batches: list,
    *,
    iters: int = 20,
    seed: int = 0,
    rho: float = 0.05,
    method: str = "lanczos",
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[torch.nn.Module], dict]:
    """``probe(model) -> dict``: :func:`samlm.diagnostics.sharpness.measure_sharpness` of a causal LM on fixed
    batches (token-mean cross-entropy, fp32, eval mode); what the loop's ``sharpness=`` calls.

    With the run's ``optimizer``, also λ_max(P⁻¹H) with P = √v̂ + eps read from its second moments at
    the time of each call (``preconditioned_lambda_max``; absent before its first step, or for SGD)."""
    from samlm.data import lm_loss
    from samlm.diagnostics import measure_sharpness
    from samlm.models import lm_forward

    def probe(model: torch.nn.Module) -> dict:
        device = next(model.parameters()).device
        moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
        started = time.perf_counter()
        result = measure_sharpness(
            model,
            moved,
            lm_forward(model),
            lm_loss,
            iters=iters,
            seed=seed,
            rho=rho,
            method=method,
            preconditioner=optimizer,
        )
        out = {k: result[k] for k in SHARPNESS_KEYS if k in result}
        out["seconds"] = time.perf_counter() - started
        return out

    return probe
