"""Decoder-only language models: build one from a few numbers, or load one from disk / the hub.

Models are plain ``transformers`` models (``GPT2LMHeadModel``, ``LlamaForCausalLM``, or any
``AutoModelForCausalLM``). Building never downloads anything: the model is constructed from a
config. ``lm_forward(model)`` adapts a model to the optimizer contract's
``forward(batch) -> logits`` (fp32 logits, batch dimension first).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from samlm.errors import UserError, first_line

ARCHITECTURES = ("gpt2", "llama")
MAX_SEED = 2**63  # torch.manual_seed takes a 64-bit signed seed


def build_decoder(
    arch: str = "gpt2",
    *,
    layers: int,
    width: int,
    heads: int,
    context: int,
    vocab_size: int,
    dropout: float = 0.0,
    tie_embeddings: bool = True,
    seed: int = 0,
    mlp_ratio: float | None = None,
    attn_implementation: str = "sdpa",
):
    """A freshly initialised decoder-only transformer (fp32, train mode).

    * ``arch="gpt2"``: learned positions, pre-LN, GELU MLP of ``mlp_ratio`` (default 4) x width.
    * ``arch="llama"``: RoPE, RMSNorm, SwiGLU MLP of ``mlp_ratio`` (default 8/3) x width rounded up
      to a multiple of 32, ``heads`` key/value heads (no GQA).

    The weights depend only on ``seed`` (the global RNG is left untouched). No special-token ids
    are set in the config (our tokenizers define their own).
    """
    _check_shape(arch, layers, width, heads, context, vocab_size, dropout)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise UserError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    config = _make_config(arch, layers, width, heads, context, vocab_size, dropout, tie_embeddings, mlp_ratio)
    _check_fits_in_memory(arch, config, layers, width, context, vocab_size, tie_embeddings)
    config._attn_implementation = attn_implementation
    model_class = _model_class(arch)
    # fork_rng: building a model must not shift the RNG stream the training run relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if tie_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.tie_weights()
    model.train()
    return model


def _check_shape(arch, layers, width, heads, context, vocab_size, dropout) -> None:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    for name, value in (
        ("layers", layers),
        ("width", width),
        ("heads", heads),
        ("context", context),
        ("vocab_size", vocab_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if width % heads:
        raise UserError(f"width {width} is not divisible by heads {heads}")
    if arch == "llama" and (width // heads) % 2:
        raise UserError(f"llama needs an even head size for rotary embeddings; width/heads = {width // heads}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def estimate_parameters(
    arch: str, config, layers: int, width: int, context: int, vocab_size: int, tie_embeddings: bool
) -> int:
    """Parameters of a decoder from its shape, without building it (within a few per cent)."""
    embeddings = vocab_size * width * (1 if tie_embeddings else 2)
    if arch == "gpt2":
        inner = config.n_inner or 4 * width
        per_layer = 4 * width * width + 2 * width * inner + 9 * width + inner
        return embeddings + context * width + layers * per_layer + 2 * width
    hidden = config.intermediate_size
    return embeddings + layers * (4 * width * width + 3 * width * hidden + 2 * width) + width


def _check_fits_in_memory(arch, config, layers, width, context, vocab_size, tie_embeddings) -> None:
    """Refuse a model whose fp32 weights alone exceed the machine's memory (a typo in a flag)."""
    params = estimate_parameters(arch, config, layers, width, context, vocab_size, tie_embeddings)
    memory = _physical_memory_bytes()
    if memory is not None and params * 4 > memory:
        raise UserError(
            f"a {arch} of {layers} layers x {width} wide (context {context}, vocab {vocab_size}) has about "
            f"{params / 1e9:.1f}B parameters: {params * 4 / 2**30:.0f} GiB of fp32 weights, more than this "
            f"machine's {memory / 2**30:.0f} GiB of memory"
        )


def _make_config(arch, layers, width, heads, context, vocab_size, dropout, tie_embeddings, mlp_ratio):
    special_tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_positions=context,
            vocab_size=vocab_size,
            n_inner=None if mlp_ratio is None else int(round(mlp_ratio * width)),
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            tie_word_embeddings=tie_embeddings,
            **special_tokens,
        )
    from transformers import LlamaConfig

    hidden = _round_up(math.ceil((8 / 3 if mlp_ratio is None else mlp_ratio) * width), 32)
    return LlamaConfig(
        hidden_size=width,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        vocab_size=vocab_size,
        attention_dropout=dropout,
        tie_word_embeddings=tie_embeddings,
        **special_tokens,
    )


def _model_class(arch: str):
    if arch == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def load_model_config(path_or_id: str | os.PathLike, *, trust_remote_code: bool = False):
    """(source, config) of a local model directory or a hub id; ``source`` is what
    ``from_pretrained`` gets. A missing directory, one without ``config.json`` or an unreadable
    config is a one-line ``UserError``."""
    spec = os.fspath(path_or_id)
    path = Path(spec).expanduser()
    local = path.exists() or _looks_like_local_path(spec)
    if local:
        _check_model_dir(path)
    source = str(path) if local else spec
    from transformers import AutoConfig

    with quiet_transformers():
        try:
            return source, AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise config_error(spec, exc) from None


def load_causal_lm(
    path_or_id: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = torch.float32,
):
    """A pretrained causal LM from a local directory or a hub id.

    A missing directory, a directory without ``config.json``, a model that is not a causal LM,
    or a failed download are all ``UserError``s with one clear line.
    """
    spec = os.fspath(path_or_id)
    source, config = load_model_config(spec, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
            raise UserError(
                f"'{spec}' is a '{getattr(config, 'model_type', type(config).__name__)}' model, "
                "not a causal (decoder-only) language model"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, dtype=dtype)
        except Exception as exc:
            raise UserError(f"could not load model '{spec}': {first_line(exc)}") from None
    model.train()
    return model


@contextlib.contextmanager
def quiet_transformers():
    """No load reports or progress bars from transformers (errors still raise).

    A "Loading weights" bar on stderr would break the one-line error convention of the CLI
    when a mistake is found after loading, and clutters logs otherwise.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _looks_like_local_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.isabs(spec) or spec.count("/") > 1


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model directory {path} not found")
    if not path.is_dir():
        raise UserError(f"model path {path} is a file; expected a directory with config.json and weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json")
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc})") from None


def config_error(spec: str, exc: Exception) -> UserError:
    """The one-line error for a model config that cannot be loaded."""
    text = str(exc)
    if "custom code" in text or "trust_remote_code" in text:
        return UserError(
            f"'{spec}' ships its own model code, which samlm runs only with --trust-remote-code; "
            "read that code first, then pass the flag if you trust it"
        )
    return UserError(f"could not load the model config of '{spec}': {first_line(exc)}")


def count_parameters(model: nn.Module, *, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    ``exclude_embeddings`` leaves out token and position embeddings (the "non-embedding"
    count used by scaling laws); a tied output head is the token embedding, so it is excluded
    too, while an untied head is counted.
    """
    excluded: set[int] = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                excluded.add(id(module.weight))
    return sum(
        p.numel()
        for p in model.parameters()  # parameters() already yields each tied tensor once
        if (p.requires_grad or not trainable_only) and id(p) not in excluded
    )


Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor


def lm_forward(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """``forward(batch) -> logits [B, T, V]`` in fp32 for a causal LM.

    The batch is ``{"input_ids", "labels", optional "attention_mask"}``, an ``(input_ids, labels)``
    tuple, or a bare ``input_ids`` tensor. Labels are never passed to the model (they are
    already shifted; see ``samlm.data.windows``), and no KV cache is kept.
    """

    def forward(batch: Batch) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            input_ids, attention_mask = batch, None
        elif isinstance(batch, Mapping):
            input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        else:
            input_ids, attention_mask = batch[0], None
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs.logits.float()

    return forward
