"""Models for fine-tuning: load, batch, forward/loss, and predict.

Two families, picked from the model's config (nothing is downloaded to decide):

``seq2seq``
    Text-to-text encoder-decoders (``AutoModelForSeq2SeqLM``: T5, T5.1.1, mT5, ByT5, ...), as
    in Bahri et al. 2022. Every task is text-to-text: the model reads ``Example.inputs`` and is
    trained on ``Example.target``; it is evaluated by greedy decoding, with the text mapped to
    a prediction by :func:`samlm.data.postprocess_generation`.
``classifier``
    Bidirectional encoders with a classification head (``AutoModelForSequenceClassification``:
    BERT, RoBERTa, MiniLM, DeBERTa, ...). They read ``Example.text_a`` / ``text_b`` and predict
    ``Example.label``: one logit per class (cross-entropy), or one output for a regression
    task such as STS-B (mean squared error). One task per run; no generation tasks.

Decoder-only causal LMs are refused (``samlm pretrain`` trains those).

The adapter :class:`FinetuneModel` provides what the training loop and the optimizers need:

- ``collate(examples) -> batch``: a dict of tensors, batch dimension first (dynamic padding);
- ``forward(batch) -> logits`` (fp32): decoder logits ``[B, T, V]`` or class logits ``[B, C]``;
- ``loss(logits, batch) -> scalar``: token-mean cross-entropy over the non-pad target tokens
  (seq2seq), cross-entropy (classification) or MSE (regression), computed in fp32;
- ``predict(task, examples, batch_size) -> (predictions, mean loss)`` for the metrics.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samlm.data.formats import Example
from samlm.data.metrics import postprocess_generation
from samlm.data.tasks import CLASSIFICATION, GENERATION, REGRESSION, Task
from samlm.data.windows import IGNORE_INDEX
from samlm.errors import UserError, first_line
from samlm.models.causal import load_model_config
from samlm.models.causal import quiet_transformers as _quiet_transformers

SEQ2SEQ = "seq2seq"
CLASSIFIER = "classifier"
FAMILIES = (SEQ2SEQ, CLASSIFIER)

# T5-family model types whose Bahri et al. defaults apply (ByT5 checkpoints are "t5").
T5_TYPES = ("t5", "mt5", "umt5")
MT5_TYPES = ("mt5", "umt5")


# --------------------------------------------------------------------------- inspecting a model


@dataclass
class ModelInfo:
    """What a model's config says, read before any weights are loaded."""

    spec: str  # as given (--model)
    source: str  # what from_pretrained gets (a directory or a hub id)
    family: str  # "seq2seq" or "classifier"
    model_type: str
    config: Any = field(repr=False)
    trust_remote_code: bool = False

    @property
    def is_t5(self) -> bool:
        return self.family == SEQ2SEQ and self.model_type in T5_TYPES

    @property
    def is_mt5(self) -> bool:
        return self.model_type in MT5_TYPES

    @property
    def d_model(self) -> int | None:
        for name in ("d_model", "hidden_size"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def t5_size(self) -> str | None:
        """Small / Base / Large / XL / XXL from ``d_model`` (512, 768, 1024, 2048, 4096)."""
        if not self.is_t5 or self.d_model is None:
            return None
        for limit, name in ((512, "small"), (768, "base"), (1024, "large"), (2048, "xl")):
            if self.d_model <= limit:
                return name
        return "xxl"

    @property
    def name(self) -> str:
        """The model's own name, for reports: the hub id; for a local directory, its model card's
        title (``# all-MiniLM-L6-v2``), else its config's ``name_or_path`` when that is a hub id,
        else ``<model_type> (<directory>)``. Never the directory's basename alone."""
        path = Path(self.spec).expanduser()
        if not path.exists():
            return self.spec
        card = path / "README.md"
        if card.is_file():
            try:
                text = card.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "")
            if title and len(title) <= 100:
                return title
        named = str(getattr(self.config, "_name_or_path", "") or getattr(self.config, "name_or_path", "") or "")
        if (
            named
            and not Path(named).expanduser().exists()
            and not named.startswith(("/", ".", "~"))
            and named.count("/") <= 1
        ):
            return named
        return f"{self.model_type} ({path.resolve()})"

    def describe(self) -> dict:
        return {
            "model": self.spec,
            "name": self.name,
            "family": self.family,
            "model_type": self.model_type,
            "d_model": self.d_model,
            "t5_size": self.t5_size,
        }


def inspect_model(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelInfo:
    """Read the config of a local directory or hub id and decide its family.

    ``UserError`` for a missing directory, an unreadable config, or a model that is neither a
    seq2seq LM nor an encoder that takes a classification head (e.g. a causal LM).
    """
    spec = os.fspath(spec)
    source, config = load_model_config(spec, trust_remote_code=trust_remote_code)
    family = _family(config)
    model_type = str(getattr(config, "model_type", type(config).__name__))
    if family is None:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        kind = "a decoder-only causal LM" if _is_causal(config) else "not a model samlm can fine-tune"
        raise UserError(
            f"'{spec}' is a '{model_type}' model ({architectures}), {kind}; samlm finetune needs a "
            "seq2seq text-to-text model (T5, T5.1.1, mT5) or an encoder classifier (BERT, RoBERTa, "
            "DeBERTa, MiniLM, ...)"
        )
    return ModelInfo(spec, source, family, model_type, config, trust_remote_code)


def _family(config) -> str | None:
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto_map = getattr(config, "auto_map", None) or {}
    kind = type(config)
    if getattr(config, "is_encoder_decoder", False):
        if kind in AutoModelForSeq2SeqLM._model_mapping or "AutoModelForSeq2SeqLM" in auto_map:
            return SEQ2SEQ
        return None
    if getattr(config, "is_decoder", False) or _is_causal_architecture(config):
        return None
    # A bidirectional encoder: has a masked-LM model and a sequence-classification head.
    # (Decoder-only LMs such as GPT-2 and Llama have classification heads too, but no MLM.)
    in_mapping = (
        kind in AutoModelForSequenceClassification._model_mapping and kind in AutoModelForMaskedLM._model_mapping
    )
    if in_mapping or "AutoModelForSequenceClassification" in auto_map:
        return CLASSIFIER
    return None


def _is_causal_architecture(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(archs) and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _is_causal(config) -> bool:
    from transformers import AutoModelForCausalLM

    return _is_causal_architecture(config) or type(config) in AutoModelForCausalLM._model_mapping


def check_tasks(info: ModelInfo, tasks: Sequence[Task]) -> None:
    """``UserError`` if the model family cannot learn these tasks."""
    if info.family == SEQ2SEQ:
        return
    generation = [t.name for t in tasks if t.kind == GENERATION]
    if generation:
        raise UserError(
            f"'{info.spec}' is an encoder classifier ({info.model_type}) and {generation[0]} is a "
            "generation task; use a seq2seq model (T5) for it"
        )
    if len(tasks) > 1:
        raise UserError(
            f"'{info.spec}' is an encoder classifier ({info.model_type}): it fine-tunes one task at a "
            f"time (one head), got a mixture of {len(tasks)}; use a seq2seq model (T5) for mixtures"
        )


# --------------------------------------------------------------------------- defaults


def paper_defaults(info: ModelInfo, optimizer: str | None = None) -> dict[str, Any]:
    """Defaults for flags the user did not set, and where they come from.

    T5 family (Bahri et al. 2022): Adafactor, constant lr 1e-3, batch 128, ascent fraction
    0.25, rho 0.05 for Small (d_model <= 512), 0.15 for Base and larger, 0.02 for mT5.
    rho applies to the Euclidean methods (sam, fsam); the other methods keep their own
    default scale. Encoders: AdamW, lr 2e-5, batch 32 (BERT-style fine-tuning).
    """
    if info.is_t5:
        rho = 0.02 if info.is_mt5 else (0.05 if info.t5_size == "small" else 0.15)
        return {
            "optimizer": "adafactor",
            "base": "adafactor",
            "lr": 1e-3,
            "batch": 128,
            "ascent_fraction": 0.25,
            "rho": rho if optimizer in (None, "sam", "fsam") else None,
            "source": f"Bahri et al. 2022 ({'mT5' if info.is_mt5 else 'T5'} {info.t5_size or ''}".rstrip() + ")",
        }
    if info.family == SEQ2SEQ:
        return {
            "optimizer": "adafactor",
            "base": "adafactor",
            "lr": 1e-3,
            "batch": 128,
            "ascent_fraction": 0.25,
            "rho": None,
            "source": "seq2seq (T5-style)",
        }
    return {
        "optimizer": "adamw",
        "base": "adamw",
        "lr": 2e-5,
        "batch": 32,
        "ascent_fraction": 0.25,
        "rho": None,
        "source": "encoder classifier (BERT-style)",
    }


# --------------------------------------------------------------------------- loading


def load_finetune_model(
    info: ModelInfo,
    task: Task,
    *,
    seed: int = 0,
    max_input_length: int = 512,
    max_target_length: int = 128,
    device: str | torch.device = "cpu",
) -> FinetuneModel:
    """Load weights and tokenizer; returns the adapter, the model in train mode, fp32.

    ``task`` sets an encoder's head (its ``num_labels``, regression or not); a seq2seq model
    ignores it. A new head is initialised from ``seed`` (the global RNG is left untouched).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": info.trust_remote_code}
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(info.source, **kwargs)
        except Exception as exc:
            raise UserError(f"could not load the tokenizer of '{info.spec}': {first_line(exc)}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if info.family == SEQ2SEQ:
                    model = AutoModelForSeq2SeqLM.from_pretrained(info.source, dtype=torch.float32, **kwargs)
                else:
                    regression = task.kind == REGRESSION
                    head: dict[str, Any] = {
                        "num_labels": task.num_labels,
                        "problem_type": "regression" if regression else "single_label_classification",
                    }
                    if not regression:
                        head["id2label"] = dict(enumerate(task.labels))
                        head["label2id"] = {label: i for i, label in enumerate(task.labels)}
                    model = AutoModelForSequenceClassification.from_pretrained(
                        info.source, dtype=torch.float32, ignore_mismatched_sizes=True, **head, **kwargs
                    )
            except Exception as exc:
                raise UserError(f"could not load model '{info.spec}': {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of '{info.spec}' has no padding token")
    model.to(device)
    model.train()
    return FinetuneModel(info, model, tokenizer, max_input_length=max_input_length, max_target_length=max_target_length)


# --------------------------------------------------------------------------- the adapter


class FinetuneModel:
    """A model plus its tokenizer, adapted to the optimizer contract and to evaluation."""

    def __init__(
        self, info: ModelInfo, model: nn.Module, tokenizer, *, max_input_length: int = 512, max_target_length: int = 128
    ):
        if max_input_length < 1 or max_target_length < 1:
            raise UserError("maximum input and target lengths must be >= 1")
        self.info = info
        self.family = info.family
        self.model: Any = model  # a transformers model: its config and generate() are read below
        self.tokenizer = tokenizer
        self.max_target_length = max_target_length
        self.max_input_length = max_input_length
        if self.family == CLASSIFIER:
            positions = getattr(model.config, "max_position_embeddings", None)
            if isinstance(positions, int) and positions > 0:
                # RoBERTa-style models offset positions by pad_token_id + 1.
                offset = 2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
                self.max_input_length = min(max_input_length, positions - offset)
        self._new_tokens: dict[str, int] = {}

    # ---- batches

    def collate(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        """A training batch of ``examples`` (padded to its longest row)."""
        if self.family == SEQ2SEQ:
            batch = self._encode_inputs(examples)
            labels = self._encode_targets([e.target for e in examples])
            batch["labels"] = labels
            batch["decoder_input_ids"] = self._decoder_inputs(labels)
            return batch
        batch = self._encode_pairs(examples)
        batch["labels"] = self._label_tensor(examples)
        return batch

    def _encode_inputs(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        enc = self.tokenizer(
            [e.inputs for e in examples],
            padding=True,
            truncation=True,
            max_length=self.max_input_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _encode_targets(self, targets: Sequence[str]) -> Tensor:
        enc = self.tokenizer(
            text_target=list(targets),
            padding=True,
            truncation=True,
            max_length=self.max_target_length,
            return_tensors="pt",
        )
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)

    def _decoder_inputs(self, labels: Tensor) -> Tensor:
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None:
            try:
                return prepare(labels=labels)
            except (NotImplementedError, TypeError, ValueError):
                pass
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise UserError(f"'{self.info.spec}' has no decoder_start_token_id in its config")
        shifted = labels.new_full(labels.shape, self.tokenizer.pad_token_id)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.tokenizer.pad_token_id)

    def _encode_pairs(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        first = [e.text_a for e in examples]
        second = [e.text_b for e in examples]
        if all(s is None for s in second):
            enc = self.tokenizer(
                first, padding=True, truncation=True, max_length=self.max_input_length, return_tensors="pt"
            )
        else:
            enc = self.tokenizer(
                first,
                [s or "" for s in second],
                padding=True,
                truncation=True,
                max_length=self.max_input_length,
                return_tensors="pt",
            )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def _label_tensor(self, examples: Sequence[Example]) -> Tensor:
        missing = next((e for e in examples if e.label is None), None)
        if missing is not None:
            raise UserError(f"example {missing.uid} has no label")
        labels = [e.label for e in examples if e.label is not None]
        if self.model.config.problem_type == "regression":
            return torch.tensor([float(x) for x in labels], dtype=torch.float32)
        return torch.tensor([int(x) for x in labels], dtype=torch.long)

    # ---- the optimizer contract

    def forward(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> Tensor:
        """Logits in fp32: ``[B, T, V]`` decoder logits, or ``[B, C]`` class logits.

        ``module``: run this wrapper of the model instead (DDP/FSDP during training)."""
        module = self.model if module is None else module
        if self.family == SEQ2SEQ:
            out = module(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                use_cache=False,
            )
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            out = module(**inputs)
        return out.logits.float()

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The batch's mean loss in fp32 (see the module docstring)."""
        labels = batch["labels"]
        logits = logits.float()
        if self.family == SEQ2SEQ:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        if self.model.config.problem_type == "regression":
            return F.mse_loss(logits.reshape(-1), labels.float().reshape(-1))
        return F.cross_entropy(logits, labels)

    # ---- evaluation

    @torch.no_grad()
    def predict(
        self, task: Task, examples: Sequence[Example], batch_size: int = 32, autocast_dtype: torch.dtype | None = None
    ) -> tuple[list, float]:
        """Predictions for ``compute_metrics`` and the mean loss over ``examples``.

        Seq2seq: greedy decoding, each text mapped with ``postprocess_generation``; the loss is
        the token-mean teacher-forced cross-entropy of the targets. Classifier: argmax class
        (or the regression output) and the mean CE / MSE. Batches are formed from examples of
        similar input length; predictions come back in the order of ``examples``.
        """
        device = next(self.model.parameters()).device
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].inputs))
        predictions: list[Any] = [None] * len(examples)
        loss_sum, weight = 0.0, 0
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            for chunk in _chunks(order, batch_size):
                group = [examples[i] for i in chunk]
                batch = {k: v.to(device) for k, v in self.collate(group).items()}
                logits = self.forward(batch)
                if self.family == SEQ2SEQ:
                    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
                    loss_sum += float(self.loss(logits, batch)) * tokens
                    weight += tokens
                    outputs = self._generate(task, batch)
                else:
                    loss_sum += float(self.loss(logits, batch)) * len(group)
                    weight += len(group)
                    outputs = self._head_predictions(logits)
                for i, output in zip(chunk, outputs):
                    predictions[i] = output
        return predictions, loss_sum / max(weight, 1)

    def _generate(self, task: Task, batch: dict[str, Tensor]) -> list:
        config = self._generation_config(task)
        ids = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [postprocess_generation(task, text) for text in texts]

    def _generation_config(self, task: Task):
        from transformers import GenerationConfig

        base = getattr(self.model, "generation_config", None)
        start = getattr(base, "decoder_start_token_id", None)
        if start is None:
            start = self.model.config.decoder_start_token_id
        eos = getattr(base, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens(task),
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=start,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def max_new_tokens(self, task: Task) -> int:
        """Greedy-decoding budget: the longest label word (+EOS) for classification, a short
        number for regression, ``max_target_length`` for generation tasks."""
        if task.name in self._new_tokens:
            return self._new_tokens[task.name]
        if task.kind == GENERATION:
            budget = self.max_target_length
        else:
            words = list(task.labels) if task.kind == CLASSIFICATION else ["0.0", "2.4", "5.0", "-1.0"]
            lengths = [len(self.tokenizer(text_target=w)["input_ids"]) for w in words]
            budget = min(self.max_target_length, max(lengths) + (1 if task.kind == CLASSIFICATION else 3))
        self._new_tokens[task.name] = budget
        return budget

    def _head_predictions(self, logits: Tensor) -> list:
        if self.model.config.problem_type == "regression":
            return [float(x) for x in logits.float().reshape(-1).tolist()]
        return [int(x) for x in logits.argmax(dim=-1).tolist()]


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
