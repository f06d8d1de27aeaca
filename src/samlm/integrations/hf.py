"""Hugging Face ``Trainer`` (and any subclass: TRL's ``SFTTrainer``) with SAM, ASAM,
Functional-SAM and the preconditioned variants.

    from samlm.integrations.hf import SAMTrainer   # or: from samlm.hf import SAMTrainer
    trainer = SAMTrainer(model=model, args=training_args, train_dataset=data,
                         sam_method="fsam", rho=0.05, ascent_fraction=0.25)
    trainer.train()                       # also: trainer.train(resume_from_checkpoint=True)

or bring your own optimizer: ``SAMTrainer(..., optimizers=(samlm.FunctionalSAM(AdamW(...)), scheduler))``.
Around Muon: ``SAMTrainer(..., sam_method="pfsam", sam_base="muon")`` (Muon on the hidden matrices,
AdamW on the rest, one ``learning_rate``; docs/optimizers.md).

Design: one accumulation window = one ``train_step`` call
---------------------------------------------------------
Trainer calls ``training_step`` once per micro-batch, then (on the window's last micro-batch)
clips, calls ``optimizer.step()``, steps the LR scheduler and zeroes the gradients. The
community pattern — two passes inside every ``training_step`` — breaks here: the ascent
pass's ``zero_grad`` wipes the earlier micro-batches' descent gradients, Trainer all-reduces
the last micro-batch's ascent (so m becomes the global batch), and the ascent gradient of a
micro-batch is not the ascent gradient of the step.

SAMTrainer instead buffers the window's micro-batches (inputs only, a few KB) and, on the last
one, hands the whole window to the samlm driver as one ``opt.train_step([mb1, mb2, ...])``.
The driver owns every pass of the step: the ascent on the window's first
⌈ascent_fraction·rows⌉ rows under ``no_sync`` (forward and backward; per-replica ε unless
``sync_ascent``), the descent at w+ε accumulated over all micro-batches with only the last
backward synchronised, the exact restore, unscale/clip/skip and the base step. Nothing is
stashed and nothing can be wiped, and the step equals the unaccumulated step on the
concatenated window (tested). The alternative, stashing gradients across Trainer's own
micro-batch loop, would leave the ascent on one micro-batch only and needs the same care for
no_sync plus a stash per parameter.

So that Trainer's own ``optimizer.step()`` does not step again, it holds a
``TrainerOptimizer``: the samlm optimizer's ``param_groups`` (LR schedulers work), state,
``state_dict``/``load_state_dict`` (checkpoints nest the base optimizer's full state; resume
restores it), and a ``step()`` that does nothing. Trainer's clip is replaced by the driver's
(``args.max_grad_norm``); the logged ``grad_norm`` is the descent gradient's norm.

Mixed precision: accelerate autocasts the model's forward (bf16/fp16). With fp16 the driver
runs accelerate's GradScaler itself — scale, unscale the ascent gradient before ε, skip the
step (no perturbation, no base step, the scale backs off once) when the ascent or descent
gradient is non-finite — and a skipped step does not step the LR scheduler, as in Trainer.

The loss: the driver needs ``forward(batch)`` and ``loss(outputs, batch)`` (the mean loss of
the rows given). For every standard head — causal, masked and seq2seq LMs, sequence
classification (regression, single- or multi-label by ``config.problem_type``, inferred as the
models do), token classification, multiple choice — SAMTrainer computes the model's own loss
from its logits (``head_kind``, ``head_loss``), so SAM and Functional-SAM use the same loss as
plain training; a seq2seq LM's decoder inputs are built from the labels as the model builds them.
``sam_loss=fn(logits, batch)`` overrides it. For an unrecognised head the standard descent uses
the model's own ``outputs.loss``, and the functional descent needs ``sam_loss``. Token-level
heads (LMs, token classification) are weighted by label tokens across the window's
micro-batches when Trainer counts ``num_items_in_batch``, as Trainer weights them (a sequence
of 3 label tokens counts for 3); other heads by rows.

Any Trainer subclass: ``SAMTrainerMixin`` holds all of the above, so ``class
X(SAMTrainerMixin, SomeTrainer)`` takes SAM-family steps with ``SomeTrainer``'s data, collator,
evaluation and logging (``SAMTrainer`` is ``SAMTrainerMixin`` + ``Trainer``; ``SAMSFTTrainer``,
importable from ``samlm.hf`` when TRL is installed, is ``SAMTrainerMixin`` + ``trl.SFTTrainer``:
``samlm.integrations.sft``). The SAM step does not call the subclass's ``compute_loss``: it needs
the loss as a function of the logits at w and at w+ε (Functional-SAM also its derivative r(w)),
while ``compute_loss`` runs the model itself (TRL's through a fused LM head that never builds the
logits). What the subclass trains on reaches the step through the batch: its collator's labels
(completion-only and assistant-only masks are -100 labels) and ``num_items_in_batch``; a
different loss (TRL's ``loss_type="dft"``) through ``sam_loss``. Metrics a subclass records in
``compute_loss`` come back through the hooks ``sam_clean_outputs(logits, batch)`` (the clean
logits at w of every row the step evaluates there) and ``sam_clean_outputs_done``.

The logged ``loss`` means a plain run's: the clean loss at w on the whole batch, weighted as
Trainer weights it, where the step computes it (Functional-SAM, ``ascent_fraction=1``, the plain
steps of a schedule) or ``clean_loss=True`` pays one forward for it. Otherwise (SAM with
``ascent_fraction < 1``) the loss at w on the ascent rows is logged as ``ascent_loss`` (the
step's ``StepStats.ascent_loss``), never as ``loss``; Momentum-SAM (msam, pmsam) has no pass at
w and logs its one loss as ``loss_perturbed``, with no ``loss`` unless ``clean_loss=True``. Also logged: ``loss_perturbed`` (at w+ε,
all rows), ``sam_eps_norm``, ``sam_ascent_grad_norm``, ``sam_skipped_steps``. With ρ = 0 the
weights and the logged losses are the plain trainer's (tested against ``trl.SFTTrainer``).

Not supported: DeepSpeed (refused: its engine steps inside ``backward()``, so a two-pass SAM
step would take two optimizer steps, and ZeRO partitions the gradient ε is built from). With
FSDP, SAMTrainer builds the optimizer with ``sync_ascent=True`` and norms summed over shards,
and checkpoints the base optimizer's plain state dict (what FSDP's optimizer-state utilities
expect); see ``samlm.integrations.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import Trainer

from samlm.integrations.distributed import sam_kwargs_for
from samlm.optim import SharpnessAware, StepStats, build_muon
from samlm.optim.registry import method, sam_family

__all__ = ["SAMTrainer", "SAMTrainerMixin", "TrainerOptimizer", "head_kind", "head_loss"]

SamLoss = Callable[[torch.Tensor, Mapping], torch.Tensor]

if TYPE_CHECKING:  # the mixin's trainer attributes (args, accelerator, optimizer, ...) and super() are Trainer's
    from transformers import Trainer as _TrainerBase
else:
    _TrainerBase = object


class TrainerOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer holds: a samlm optimizer whose step ``SAMTrainer.training_step``
    has already taken.

    ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are the samlm
    optimizer's (``flat_state_dict``: the base optimizer's plain state dict, for FSDP's
    optimizer-state utilities); ``step()`` does nothing.
    """

    def __init__(self, sam: SharpnessAware, *, flat_state_dict: bool = False):
        if not isinstance(sam, SharpnessAware):
            raise ValueError(f"TrainerOptimizer wraps a samlm SAM-family optimizer, got {type(sam).__name__}")
        self.sam = sam
        self.flat_state_dict = flat_state_dict
        self._ready = False
        # Same routing as SharpnessAware: Optimizer.__init__ empties param_groups and re-adds
        # each group; the property hands both to the samlm optimizer, i.e. to the base.
        super().__init__(list(sam.param_groups), sam.defaults)
        self._ready = True

    @property
    def param_groups(self):
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.sam.param_groups = groups

    @property
    def state(self):
        return self.sam.base_optimizer.state

    @state.setter
    def state(self, value):
        if self._ready:  # Optimizer.__init__ assigns an empty state: keep the base optimizer's
            self.sam.base_optimizer.state = value

    def add_param_group(self, param_group: dict) -> None:
        self.sam.add_param_group(param_group)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SAMTrainer takes the SAM step in training_step; optimizer.step(closure) is not used")
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.sam.base_optimizer.state_dict() if self.flat_state_dict else self.sam.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.sam.load_state_dict(state_dict)  # nested samlm state, or a plain one (into the base)

    def __repr__(self) -> str:
        return f"TrainerOptimizer({self.sam!r})"


def _refuse_deepspeed(trainer) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            "SAMTrainer does not support DeepSpeed: accelerate's backward() runs the DeepSpeed engine's "
            "optimizer step inside it, so the two passes of a SAM step would take two steps, and ZeRO "
            "partitions the gradient that ε is built from. Use DDP, or FSDP (accelerate launch --use_fsdp)."
        )


def _flat_names(mapping) -> set:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


# The heads whose loss SAMTrainer derives from the logits, each with the auto-class mapping that
# names its classes. Order matters where a class is in two mappings: BART-like seq2seq LMs are also
# masked LMs (their logits need decoder inputs built from the labels), and XLM's LM head, also a
# causal LM, computes an unshifted loss.
HEADS = (
    ("ForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("ForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("ForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("ForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("ForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("ForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
)


def _base_model(module: torch.nn.Module) -> torch.nn.Module:
    base = getattr(module, "get_base_model", None)  # PEFT
    return base() if callable(base) else module


def head_kind(module: torch.nn.Module) -> str | None:
    """The model's head, one of ``HEADS`` (``"ForCausalLM"``, ``"ForSequenceClassification"``, ...),
    or None when SAMTrainer does not know its loss."""
    from transformers.models.auto import modeling_auto

    module = _base_model(module)
    name = type(module).__name__
    for kind, mapping in HEADS:
        if name in _flat_names(getattr(modeling_auto, mapping)):
            return kind
    # A class outside the auto mappings named like a standard head (transformers' own loss_type)
    loss_type = getattr(module, "loss_type", None)
    return (
        loss_type
        if loss_type in ("ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
        else None
    )


def head_loss(
    kind: str, module: torch.nn.Module, reduction: str = "mean"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits, labels)``: the mean loss the model of head ``kind`` computes from its logits
    (its ``outputs.loss``); ``reduction="sum"``: summed over the label tokens instead (the
    token-level heads, :data:`TOKEN_HEADS`)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if reduction not in ("mean", "sum") or (reduction == "sum" and kind not in TOKEN_HEADS):
        raise ValueError(f"head_loss: reduction {reduction!r} is not defined for {kind}")
    if kind == "ForSequenceClassification":
        # regression / single- / multi-label from config.problem_type, inferred (and set) when
        # None from num_labels and the labels' dtype, as the models do
        config = _base_model(module).config
        return lambda logits, labels: LOSS_MAPPING[kind](labels, logits, config)
    if kind == "ForCausalLM":
        token_loss = LOSS_MAPPING["ForCausalLM"]  # shifted: token t predicts label t+1
    else:
        # masked and seq2seq LMs, token classification, multiple choice ([B, choices] logits):
        # a cross-entropy over the last dimension, labels unshifted, -100 ignored
        token_loss = LOSS_MAPPING["ForMaskedLM"]
    if reduction == "sum":  # transformers' losses sum when given a count (here 1) to divide by
        return lambda logits, labels: token_loss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=1)
    return lambda logits, labels: token_loss(logits, labels, vocab_size=logits.shape[-1])


# The bases SAMTrainer builds itself (None: the one TrainingArguments.optim names).
SAM_BASES = (None, "muon")


class SAMTrainerMixin(_TrainerBase):
    """SAM-family steps for ``transformers.Trainer`` or any subclass of it; see the module docstring.

    ``class MyTrainer(SAMTrainerMixin, SomeTrainer)`` (the mixin first): :class:`SAMTrainer` is
    ``SAMTrainerMixin`` + ``Trainer``, ``SAMSFTTrainer`` is ``SAMTrainerMixin`` + TRL's ``SFTTrainer``.

    Args (besides the trainer's):
        sam_method: a SAM-family method of ``samlm.optim.registry`` (default ``"sam"``), built
            around the base optimizer Trainer creates from ``args`` (``optim``, learning rate,
            weight-decay groups). Or pass ``optimizers=(samlm_optimizer, scheduler)`` instead.
        sam_base: ``None`` (default): the base is the optimizer ``args.optim`` names. ``"muon"``:
            ``torch.optim.Muon`` on the hidden 2-D matrices (``samlm.optim.muon_split``, with
            ``adjust_lr_fn="match_rms_adamw"`` so that ``args.learning_rate`` serves both) and
            AdamW with ``args``' betas, epsilon and Trainer's weight-decay groups on the rest;
            psam/pfsam then perturb in Muon's geometry.
        rho: the perturbation radius (default: the method's registry default).
        ascent_fraction: share of the window's rows used for the ascent gradient.
        m: m-sharpness groups within a replica's window.
        sync_ascent: average the ascent gradient over replicas (exact global SAM) instead of a
            per-replica ε. Always on under FSDP.
        sam_loss: ``fn(logits, batch) -> mean loss``, replacing the loss SAMTrainer derives for
            the standard heads; required for Functional-SAM on a head it does not recognise, and
            for a subclass that trains on another loss than its head's (TRL's ``loss_type="dft"``).
        clean_loss: the logged ``loss`` is the clean loss at w on the whole batch, as a plain
            run's. Methods that compute it anyway (Functional-SAM, ``ascent_fraction=1``, plain
            steps of a schedule) always log it. ``None`` (default): other methods log their loss
            at w on the ascent rows as ``ascent_loss`` and no ``loss``; ``True``: they pay one
            forward pass without backward on the whole batch for it (and for the subclass's
            metrics from the logits, e.g. SFTTrainer's ``entropy``/``mean_token_accuracy``).
    """

    if TYPE_CHECKING:  # Trainer's, or accelerate's wrapper around it once training runs
        optimizer: torch.optim.Optimizer | None

    def __init__(
        self,
        *args,
        sam_method: str | None = None,
        rho: float | None = None,
        ascent_fraction: float = 0.25,
        m: int = 1,
        sync_ascent: bool = False,
        sam_loss: SamLoss | None = None,
        clean_loss: bool | None = None,
        sam_base: str | None = None,
        **kwargs,
    ):
        if sam_base not in SAM_BASES:
            raise ValueError(f"sam_base must be one of {SAM_BASES}, got {sam_base!r}")
        super().__init__(*args, **kwargs)
        _refuse_deepspeed(self)
        given = self.optimizer
        if given is not None:
            if not isinstance(given, SharpnessAware):
                raise ValueError(
                    f"{type(self).__name__} needs a samlm SAM-family optimizer in optimizers=(optimizer, scheduler), "
                    f"got {type(given).__name__}; wrap it (e.g. samlm.SAM(optimizer)) or pass sam_method=... instead"
                )
            if sam_method is not None or rho is not None or sam_base is not None:
                raise ValueError(
                    "pass either sam_method/rho/sam_base or optimizers=(samlm optimizer, scheduler), not both"
                )
            self.optimizer = TrainerOptimizer(given, flat_state_dict=self.is_fsdp_enabled)
        else:
            sam_method = sam_method or "sam"
            if sam_method not in sam_family():
                raise ValueError(f"sam_method must be one of {sam_family()}, got {sam_method!r}")
        self.sam_method = sam_method
        self.sam_base = sam_base
        self.sam_rho = rho
        self.sam_ascent_fraction = ascent_fraction
        self.sam_m = m
        self.sam_sync_ascent = sync_ascent
        self.sam_loss = sam_loss
        self.sam_clean_loss = clean_loss
        self.sam_last_stats: StepStats | None = None
        self.sam_last_loss: float | None = None  # what the last step reports to Trainer as its loss
        self._sam_window: list = []
        self._sam_num_items = None
        self._sam_log_sums: dict[str, float] = {}
        self._sam_log_steps = 0
        self._sam_log_ascent_only = False
        self._sam_log_no_clean = False

    # -- the optimizer ------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.sam_base == "muon":
                base = self._build_muon_base(self.model if model is None else model)
            else:
                super().create_optimizer(model)  # the base optimizer, from TrainingArguments
                base = self.optimizer
            self.optimizer = TrainerOptimizer(self._build_sam(base), flat_state_dict=self.is_fsdp_enabled)
        return self.optimizer

    def _build_muon_base(self, model) -> torch.optim.Optimizer:
        """``samlm.optim.build_muon`` (as the harness builds it) with ``args``' hyperparameters and
        Trainer's weight-decay rule for AdamW's half."""
        if self.is_fsdp_enabled:
            raise ValueError(
                "Muon orthogonalizes whole weight matrices, which FSDP shards across processes: "
                "use DDP with sam_base='muon'"
            )
        args, decay = self.args, set(self.get_decay_parameter_names(model))
        return build_muon(
            model,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            no_decay=[n for n, _ in model.named_parameters() if n not in decay],
        )

    def _build_sam(self, base: torch.optim.Optimizer) -> SharpnessAware:
        entry = method(cast(str, self.sam_method))  # set when SAMTrainer builds the optimizer
        rho = entry.default_rho if self.sam_rho is None else self.sam_rho
        kwargs: dict[str, Any] = {"rho": rho, "ascent_fraction": self.sam_ascent_fraction, "m": self.sam_m}
        if self.is_fsdp_enabled:
            kwargs.update(sam_kwargs_for("fsdp"))
        elif self.sam_sync_ascent:
            kwargs["sync_ascent"] = True
        return cast("type[SharpnessAware]", entry.cls)(base, **kwargs)  # a SAM-family entry

    @property
    def sam_optimizer(self) -> SharpnessAware:
        """The samlm optimizer inside accelerate's and Trainer's wrappers."""
        opt = self.optimizer
        while not isinstance(opt, TrainerOptimizer):
            if opt is None or not hasattr(opt, "optimizer"):
                raise RuntimeError("SAMTrainer's optimizer is not set up yet (call train())")
            opt = opt.optimizer
        return opt.sam

    def _take_over_grad_scaler(self):
        """fp16: the driver runs accelerate's GradScaler (once per step); accelerate's optimizer
        wrapper must not run it again around Trainer's (empty) optimizer.step()."""
        scaler = getattr(self.accelerator, "scaler", None)
        if getattr(self.optimizer, "scaler", None) is not None:
            scaler = scaler or self.optimizer.scaler
            self.optimizer.scaler = None
        return scaler

    # -- one step per accumulation window -----------------------------------------------------
    def train(self, *args, **kwargs):
        self._sam_window = []  # a window left open by a stopped run is never stepped on later
        self._sam_log_sums, self._sam_log_steps, self._sam_log_ascent_only = {}, 0, False
        self._sam_log_no_clean = False
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        self._sam_window.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the window's last micro-batch yet
            return torch.zeros((), device=self.args.device)
        window, self._sam_window = self._sam_window, []
        self._sam_num_items = num_items_in_batch
        self.sam_step(model, window)
        return torch.tensor(self.sam_last_loss, device=self.args.device)

    def sam_step(self, model, micro_batches: list) -> StepStats:
        """One SAM-family step over the window's micro-batches (the model as Trainer wraps it).
        Returns the driver's statistics; the loss Trainer logs is ``sam_last_loss``: the clean
        loss on the whole window when known (logged as ``loss``, see ``clean_loss``), else the
        step's ``ascent_loss`` (logged as ``ascent_loss``)."""
        opt = self.sam_optimizer
        forward, loss = self.sam_forward_and_loss(model, opt, micro_batches)
        clean = loss.clean if isinstance(loss, _Recorder) else None
        if clean is not None and self.sam_clean_loss and not self._sam_computes_clean(opt):
            with torch.no_grad():  # clean_loss=True: the whole window at w, one forward
                for batch in micro_batches:
                    loss(forward(batch), batch)
            clean.closed = True  # the step's own passes at w add nothing more
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        batch = micro_batches if len(micro_batches) > 1 else micro_batches[0]
        stats = opt.train_step(
            batch, forward, loss, model=model, scaler=self._take_over_grad_scaler(), max_grad_norm=max_norm
        )
        if hasattr(self.optimizer, "_is_overflow"):
            cast(Any, self.optimizer)._is_overflow = stats.skipped  # accelerate: a skipped step keeps the LR
        logged = stats.ascent_loss
        if clean is not None:
            rows = sum(_rows(b) for b in micro_batches)
            complete = clean.rows >= rows  # every row was seen at w: the plain run's loss
            if complete and loss.tokens is not None:  # Trainer's: summed / num_items_in_batch
                logged = clean.total / (loss.tokens[0] * rows)
            elif clean.count:  # the mean loss of the rows seen at w
                logged = clean.value()
            self._sam_log_ascent_only |= not complete
            self.sam_clean_outputs_done(micro_batches, complete)
        else:  # the model's own loss: every row was seen at w on a plain step, or with ascent_fraction=1
            self._sam_log_ascent_only |= stats.sam_step and opt.ascent_fraction < 1
        if logged is None:  # no pass at w (Momentum-SAM): its one loss, at w+ε, is logged as loss_perturbed
            logged, self._sam_log_no_clean = stats.loss_perturbed, True
        self.sam_last_stats, self.sam_last_loss = stats, logged
        for key, value in (
            ("loss_perturbed", stats.loss_perturbed),
            ("sam_eps_norm", stats.eps_norm),
            ("sam_ascent_grad_norm", stats.grad_norm),
        ):
            self._sam_log_sums[key] = self._sam_log_sums.get(key, 0.0) + value
        self._sam_log_steps += 1
        return stats

    def _sam_computes_clean(self, opt: SharpnessAware) -> bool:
        """The step itself evaluates every row at w (no extra forward needed)."""
        if not (opt.sam_step_due() and opt.perturbs_this_step()):
            return True  # a plain step, or LookSAM's cheap one: one pass at w over every row
        return opt.needs_ascent_gradient and (opt.descent_rule.needs_clean_cotangent or opt.ascent_fraction >= 1)

    def sam_forward_and_loss(self, model, opt: SharpnessAware, micro_batches: list | None = None):
        """The driver's ``forward(batch)`` and ``loss(outputs, batch)`` for this model.

        For the standard heads the loss comes from the logits with the batch's labels (so a
        collator's completion-only or assistant-only masks hold) and, for token-level heads when
        Trainer counts ``num_items_in_batch``, weighted by tokens across the window's
        micro-batches as Trainer weights them."""
        label_keys = list(self.label_names or ["labels"])
        label_key = label_keys[0]
        base = _base_model(self.accelerator.unwrap_model(model))
        kind = head_kind(base)

        def logits(batch):
            inputs = {k: v for k, v in batch.items() if k not in label_keys}
            if kind == "ForSeq2SeqLM" and "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
                # given labels, the model builds its decoder inputs from them (shifted right); we
                # hold the labels back, so build the same decoder inputs here
                inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=batch[label_key])
            if kind == "ForCausalLM":
                inputs.setdefault("use_cache", False)
            outputs = model(**inputs)
            return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]

        per_token = None
        if (
            self.sam_loss is None
            and kind in TOKEN_HEADS
            and self._sam_num_items is not None
            and self.label_smoother is None
            and micro_batches
        ):
            # Trainer's token weighting: the window's loss is its label tokens' summed loss / N.
            # The driver weights a piece by its rows, so a piece's loss is its summed loss over
            # (its rows x the window's mean label tokens per row): exact for the descent, and the
            # ascent's direction (hence ε) is the token-weighted one.
            world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            rows = sum(_rows(b) for b in micro_batches)
            per_token = float(self._sam_num_items) / world / rows
        recorder = _Recorder(
            opt, self.sam_clean_outputs, label_key, tokens=None if per_token is None else (per_token, kind)
        )

        if self.sam_loss is not None:
            return logits, recorder.wrap(self.sam_loss)
        if kind is not None:
            from_logits = head_loss(kind, base)
            token_sum = head_loss(kind, base, reduction="sum") if per_token is not None else None

            def loss(outputs, batch):
                labels = batch[label_key]
                if token_sum is not None:
                    return token_sum(outputs, labels) / (labels.shape[0] * per_token)
                if self.label_smoother is None:
                    return from_logits(outputs, labels)
                if kind == "ForSequenceClassification":
                    value = from_logits(outputs, labels)  # settles config.problem_type
                    if base.config.problem_type != "single_label_classification":
                        return value  # label smoothing is for cross-entropies only
                return self.label_smoother({"logits": outputs}, labels, shift_labels=kind == "ForCausalLM")

            return logits, recorder.wrap(loss)
        if opt.descent_rule.needs_clean_cotangent:
            raise ValueError(
                f"{type(opt).__name__} needs the loss as a function of the logits, and SAMTrainer does not "
                f"recognise the head of {type(base).__name__} (it knows causal, masked and seq2seq LMs, "
                "sequence and token classification, multiple choice): "
                "pass SAMTrainer(..., sam_loss=fn(logits, batch) -> mean loss)"
            )

        def model_outputs(batch):
            return model(**batch)

        def model_loss(outputs, batch):
            value = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
            return value.mean()  # DataParallel returns one loss per device

        return model_outputs, model_loss

    # -- hooks for a subclass's own metrics ---------------------------------------------------
    def sam_clean_outputs(self, logits: torch.Tensor, batch: Mapping) -> None:
        """Called with the clean logits at w (detached) of rows of the step: a subclass whose
        ``compute_loss`` records metrics from the logits accumulates them here (the SAM step
        does not call ``compute_loss``: see the module docstring)."""

    def sam_clean_outputs_done(self, micro_batches: list, complete: bool) -> None:
        """Called once per step after :meth:`sam_clean_outputs`; ``complete``: every row of the
        window was seen at w (else only the ascent rows were: see ``clean_loss``)."""

    # -- what Trainer does around the step ----------------------------------------------------
    def _clip_grad_norm(self, model):
        if self.sam_last_stats is not None:  # the driver clipped (args.max_grad_norm)
            return self.sam_last_stats.update_grad_norm
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.sam_last_stats is not None:
            return self.sam_last_stats.update_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._sam_log_steps:
            logs = dict(logs)
            if self._sam_log_no_clean:  # some steps had no loss at w: loss_perturbed has theirs
                logs.pop("loss")
            elif self._sam_log_ascent_only:  # not the plain run's loss: under its own name
                logs["ascent_loss"] = logs.pop("loss")
            for key, total in self._sam_log_sums.items():
                logs[key] = round(total / self._sam_log_steps, 6)
            logs["sam_skipped_steps"] = self.sam_optimizer.counters["skipped_steps"]
            self._sam_log_sums, self._sam_log_steps, self._sam_log_ascent_only = {}, 0, False
            self._sam_log_no_clean = False
        super().log(logs, *args, **kwargs)


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` that takes SAM-family steps (:class:`SAMTrainerMixin` + ``Trainer``)."""


# Heads whose loss is a mean over label tokens, which Trainer weights by num_items_in_batch.
TOKEN_HEADS = ("ForCausalLM", "ForMaskedLM", "ForSeq2SeqLM", "ForTokenClassification")


def _rows(batch) -> int:
    from samlm.optim.batching import batch_rows

    return batch_rows(batch)


def _label_tokens(kind: str, labels: torch.Tensor) -> int:
    """The label tokens a token-level head's loss averages over (causal LMs: shifted)."""
    return int(((labels[:, 1:] if kind == "ForCausalLM" else labels) != -100).sum())


class _Clean:
    """The clean (at w) loss of a step over the pieces seen at w: their summed loss over their
    count (label tokens when token-weighted, else rows), and the rows seen."""

    def __init__(self):
        self.total = 0.0
        self.count = 0
        self.rows = 0
        self.closed = False

    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")


class _Recorder:
    """A loss for the driver that also records what it computes at w (not perturbed): the clean
    loss, and the clean logits for the trainer's hook. ``tokens``: ``(per_token, kind)`` when the
    loss is token-weighted (a piece's value is its summed loss / (rows x per_token))."""

    def __init__(self, opt: SharpnessAware, on_clean, label_key: str, tokens=None):
        self.opt, self.on_clean, self.label_key, self.tokens = opt, on_clean, label_key, tokens
        self.clean = _Clean()
        self.fn = None

    def wrap(self, fn) -> _Recorder:
        self.fn = fn
        return self

    def __call__(self, outputs, batch):
        value = self.fn(outputs, batch)
        if not self.opt.perturbed and not self.clean.closed:
            rows = _rows(batch)
            if self.tokens is not None:
                per_token, kind = self.tokens
                self.clean.total += float(value.detach()) * rows * per_token
                self.clean.count += _label_tokens(kind, batch[self.label_key])
            else:
                self.clean.total += float(value.detach()) * rows
                self.clean.count += rows
            self.clean.rows += rows
            if isinstance(outputs, torch.Tensor):
                self.on_clean(outputs.detach(), batch)
        return value
