"""The training loop shared by the pretraining and fine-tuning harnesses.

One call, :func:`train`, runs ``config.steps`` optimizer steps::

    for each step:
        batch   = grad_accum micro-batches from the resumable train iterator
        stats   = samlm.optim.train_step(optimizer, batch, forward, loss)   # any optimizer
        scheduler.step()
        every eval_every / sharpness_every steps (and at the end):
            evaluate(model), sharpness(model) -> one line of metrics.jsonl
        every save_every steps (and at the end, and on SIGINT/SIGTERM): a checkpoint

Run directory (``config.out``, a :class:`~samlm.harness.rundir.RunDir`)::

    metrics.jsonl                one JSON line per measurement (see ``_measurement``)
    checkpoints/checkpoint-<step>/{model.safetensors, state.pt, manifest.json}   (samlm.io)
    summary.json                 written by the harness from ``LoopResult.summary()``

Exact resume (:mod:`samlm.harness.resume`): a checkpoint holds the weights, the optimizer /
scheduler / grad-scaler state, every RNG, the data iterator position, the loop counters (including
the partial sums of the current logging window) and the metrics history. ``resume=True`` restores
all of it and rewrites ``metrics.jsonl`` to the checkpoint's history, dropping lines written after
the checkpoint, so on CPU the resumed run continues bitwise identically to an uninterrupted one
(only wall-clock fields — ``tokens_per_s``, ``step_s`` — differ).

Non-finite steps: a step whose loss is NaN/Inf or whose update the optimizer skipped
(``StepStats.skipped``) is counted. ``nonfinite="skip"`` keeps going; ``"stop"`` raises
``NonFiniteLossError`` after ``max_nonfinite`` such steps in a row. Weights that
are NaN/Inf are never saved: a save that meets them raises ``NonFiniteLossError`` (whatever
the policy) and the previous checkpoint stays the newest one on disk.

Signals (:mod:`samlm.harness.signals`): SIGINT and SIGTERM ask the loop to stop; it finishes the
current step (and its evaluation), saves a checkpoint and returns with ``LoopResult.interrupted``
set. A second SIGINT raises ``KeyboardInterrupt`` at once (the last checkpoint written stays
valid). The harnesses turn an interrupted result into exit code 130 (``samlm.cli``).

Data parallelism (``torchrun``/``accelerate launch``): pass the DDP/FSDP-wrapped model; every
process runs this loop on its own rows (``samlm.integrations.distributed.shard_batches``). Each step, the
processes agree on the step's statistics (means over processes), its token count (summed) and
whether a signal asked to stop, so all of them evaluate, save and stop at the same step. Only
the main process writes files and prints; checkpoints hold the full, unwrapped model (FSDP2
shards gathered), so a run resumes on any number of processes of the same strategy.
Evaluation and sharpness run on the unwrapped model, on every process.

Crash safety: every file goes through :mod:`samlm.io` (atomic writes, checkpoints verified by
sha256 on load, torn ``metrics.jsonl`` tails dropped), so a ``kill -9`` at any moment leaves a
run that ``resume=True`` continues exactly from its newest good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from samlm import io
from samlm.data import count_targets, lm_loss
from samlm.errors import NonFiniteLossError, UserError, first_line
from samlm.harness import checks
from samlm.harness import settings as s
from samlm.harness.resume import LoopState, TrainingRun, Window
from samlm.harness.rundir import RunDir
from samlm.harness.settings import BatchSettings, LoopSettings, ScheduleSettings, override, setting
from samlm.harness.signals import StopSignals
from samlm.integrations import distributed
from samlm.models import lm_forward
from samlm.optim import SharpnessAware, train_step
from samlm.progress import RunProgress, say


class ResumableIterator(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopConfig:
    """Everything that controls the loop (not the model, optimizer or data). The fields shared
    with a harness's settings are those settings (same names, defaults and checks)."""

    out: str | Path = override(LoopSettings, "out", default=dataclasses.MISSING)
    steps: int = setting(0, "optimizer steps", check=s.nonnegative_int)
    eval_every: int | None = override(LoopSettings, "eval_every")  # None: resolved from steps
    save_every: int = override(LoopSettings, "save_every")
    keep_checkpoints: int = override(LoopSettings, "keep_checkpoints")
    grad_accum: int = override(BatchSettings, "grad_accum")
    sharpness_every: int = setting(0, "sharpness every N steps (0: never)", check=s.nonnegative_int)
    path_norms: bool = setting(False, "train_step(split=True): logit/functional path norms (SAM only)")
    clip: float | None = override(ScheduleSettings, "clip")
    nonfinite: str = override(LoopSettings, "nonfinite")
    max_nonfinite: int = override(LoopSettings, "max_nonfinite")
    resume: bool = override(LoopSettings, "resume")
    overwrite: bool = override(LoopSettings, "overwrite")
    eval_at_start: bool = setting(False, "also evaluate the initial model (a step-0 line)")
    seed: int | None = setting(
        None, "fresh start: seed python/numpy/torch RNGs (dropout); resume restores them", check=s.seed
    )
    progress: bool = override(LoopSettings, "progress")
    report_to: str = override(LoopSettings, "report_to")
    run_name: str | None = override(LoopSettings, "run_name")
    run_group: str | None = override(LoopSettings, "run_group")
    log_every: int = override(LoopSettings, "log_every")
    handle_signals: bool = setting(True, "SIGINT/SIGTERM: finish the step, checkpoint, return")

    def __post_init__(self) -> None:
        self.eval_every = s.resolve_eval_every(self.eval_every, self.steps)

    @classmethod
    def from_settings(cls, config, **values) -> LoopConfig:
        """The loop's part of a harness config (the fields of the same name), then ``values``."""
        names = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in names}
        return cls(**{**shared, **values})

    def validate(self) -> None:
        s.validate(self)
        RunDir(self.out).check_start(resume=self.resume, overwrite=self.overwrite)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class LoopResult:
    """What a run did; ``summary()`` is the JSON the harness writes to ``summary.json``."""

    out_dir: Path
    config: LoopConfig
    step: int  # steps done in total (across resumes)
    start_step: int  # where this call started (0, or the resumed checkpoint's step)
    history: list[dict]  # every metrics line, as in metrics.jsonl
    tokens: int
    train_seconds: float
    nonfinite_steps: int
    ascent_nonfinite_steps: int
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" if a signal ended the run early
    checkpoint: Path | None = None  # the last checkpoint written or loaded
    step_times: list[float] = dataclasses.field(default_factory=list)  # steps after each start's warm-up
    warmup_steps: int = 0  # steps left out of step_times
    steps_per_cycle: int = 1  # the optimizer's schedule repeats every this many steps

    @property
    def completed(self) -> bool:
        return self.step >= self.config.steps

    @property
    def final(self) -> dict | None:
        """The last metrics line that has evaluation results (else the last line)."""
        evaluated = [r for r in self.history if evaluation_metrics(r)]
        return evaluated[-1] if evaluated else (self.history[-1] if self.history else None)

    def best(self) -> dict[str, dict]:
        """Best value and step of every evaluation metric (loss/ppl/error: lowest; else highest).

        Chosen separately for each metric, as Bahri et al. pick the best checkpoint per
        task-metric pair.
        """
        best: dict[str, dict] = {}
        for record in self.history:
            for key, value in evaluation_metrics(record).items():
                lower = lower_is_better(key)
                current = best.get(key)
                if current is None or (value < current["value"] if lower else value > current["value"]):
                    best[key] = {"value": value, "step": record["step"], "mode": "min" if lower else "max"}
        return best

    def summary(self) -> dict:
        return io.json_safe(
            {
                "step": self.step,
                "steps": self.config.steps,
                "completed": self.completed,
                "interrupted": self.interrupted,
                "final": self.final,
                "best": self.best(),
                "tokens": self.tokens,
                "train_seconds": self.train_seconds,
                "step_s": self.train_seconds / self.step if self.step else None,
                "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else None,
                "step_time_median_ms": median_step_ms(self.step_times, self.steps_per_cycle),
                "step_time_warmup_steps": self.warmup_steps,
                "nonfinite_steps": self.nonfinite_steps,
                "ascent_nonfinite_steps": self.ascent_nonfinite_steps,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "loop_config": self.config.as_dict(),
            }
        )


# Fields of a metrics line written by the loop itself; every other number came from evaluate().
LOOP_FIELDS = frozenset({"step", "lr", "tokens", "tokens_per_s", "step_s", "nonfinite_steps", "sharpness"})


def evaluation_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line that came from ``evaluate(model)``."""
    return {
        key: value
        for key, value in record.items()
        if key not in LOOP_FIELDS
        and not key.startswith("train_")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(word in name for word in ("loss", "ppl", "perplexity", "error", "bpb", "bits"))


# --------------------------------------------------------------------------- helpers for harnesses


def count_input_tokens(batch) -> int:
    """Tokens a batch feeds the model: attention_mask.sum() if present, else input_ids.numel()."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    if isinstance(batch, (tuple, list)):
        return int(batch[0].numel())
    return int(batch.numel())


def lm_evaluator(
    val_batches: list,
    *,
    forward_factory: Callable[[nn.Module], Callable] = lm_forward,
    prefix: str = "val",
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"val_loss", "val_ppl"}``: token-weighted mean loss over fixed batches."""
    if not val_batches:
        raise UserError("no validation batches")

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        forward = forward_factory(model)
        device = next(model.parameters()).device
        total_loss, total_tokens = 0.0, 0
        for batch in val_batches:
            batch = _to_device(batch, device)
            tokens = count_targets(batch)
            total_loss += float(lm_loss(forward(batch), batch)) * tokens
            total_tokens += tokens
        mean = total_loss / max(total_tokens, 1)
        return {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 700.0))}

    return evaluate


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)
    return batch.to(device)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: ResumableIterator,
    *,
    config: LoopConfig,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    scheduler=None,
    forward: Callable | None = None,
    loss: Callable = lm_loss,
    sharpness: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    scaler=None,
    count_tokens: Callable[[Any], int] = count_input_tokens,
    on_step: Callable[[int, dict], None] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
    final_sharpness: bool = False,
) -> LoopResult:
    """Train ``model`` for ``config.steps`` optimizer steps; see the module docstring.

    Args:
        optimizer: a torch optimizer or a samlm SAM-family wrapper (both go through
            ``samlm.optim.train_step``).
        train_batches: an endless iterator of micro-batches with ``state_dict()`` /
            ``load_state_dict()`` (e.g. ``LMDataset.train_batches``).
        evaluate: ``evaluate(model) -> {"val_loss": ...}``, called in eval mode.
        scheduler: stepped once per optimizer step; saved and restored.
        forward / loss: the optimizer contract's callables (default: causal LM logits and
            token-mean cross-entropy).
        sharpness: ``sharpness(model) -> dict`` every ``config.sharpness_every`` steps.
        scaler: an optional ``torch.amp.GradScaler`` (passed to train_step, checkpointed).
        on_step: ``on_step(step, stats_dict)`` after every step (hooks and tests).
        step_kwargs: extra keyword arguments for ``train_step`` (e.g. ``autocast_dtype``).
        final_sharpness: also measure ``sharpness`` at the last step when ``sharpness_every``
            did not (a ``{"step", "sharpness"}`` line after the final checkpoint, measured again
            by a resumed run: it is deterministic).
    """
    config.validate()
    checks.optimizer_settings(optimizer)
    forward = forward or lm_forward(model)
    run = TrainingRun(model, optimizer, train_batches, config, scheduler, scaler)
    state, checkpoint = run.start()
    distributed.barrier()  # the main process has cleaned or rewritten the run directory
    start_step = state.step
    step_args = dict(step_kwargs or {}, model=model, max_grad_norm=config.clip, scaler=scaler)
    if config.path_norms:
        if not isinstance(optimizer, SharpnessAware):
            raise UserError("path_norms=True measures SAM's logit/functional paths: it needs a SAM-family optimizer")
        step_args["split"] = True

    trackers = _open_trackers(run, state)
    tracked = Window(flags=True)  # the steps since the trackers' last training log

    def write(record: dict) -> None:  # one metrics line: the history, metrics.jsonl, the trackers
        state.history.append(record)
        if run.main:
            run.run_dir.append_metrics(record)
            trackers.log(_tracked_measurement(record), record["step"])

    def measure(step: int, do_eval: bool, do_sharpness: bool) -> None:
        write(_measurement(step, state, run.module, evaluate if do_eval else None, sharpness if do_sharpness else None))

    progress = RunProgress(config.steps, initial=state.step, enabled=config.progress and run.main)
    warmup = timing_warmup(config.steps)
    eval_every = s.resolve_eval_every(config.eval_every, config.steps)
    interrupted = None
    try:
        with StopSignals(config.handle_signals) as signals:
            if config.eval_at_start and state.step == 0 and not state.history and evaluate is not None:
                measure(0, do_eval=True, do_sharpness=False)
            while state.step < config.steps:
                tokens, seconds = state.tokens, state.train_seconds
                stats = _one_step(run, state, forward, loss, count_tokens, step_args)
                if state.step - start_step > warmup:  # start-up and compilation are over
                    state.step_times.append(state.train_seconds - seconds)
                else:
                    state.warmup_steps += 1
                if trackers:
                    tracked.add(stats, state.tokens - tokens, state.train_seconds - seconds)
                    if _due(state.step, config.log_every) or state.step == config.steps:
                        trackers.log(_tracked_training(tracked, state.last_lr), state.step)
                        tracked = Window(flags=True)
                _apply_nonfinite_policy(state, stats, config)
                progress.step(_postfix(stats, state))

                step = state.step
                is_last = step == config.steps
                do_eval = evaluate is not None and (is_last or _due(step, eval_every))
                do_sharpness = sharpness is not None and _due(step, config.sharpness_every)
                if do_eval or do_sharpness or (is_last and evaluate is None):
                    measure(step, do_eval, do_sharpness)
                    if do_eval:
                        record = state.history[-1]
                        progress.evaluated(
                            step, record.get("train_loss"), _headline(record), record.get("tokens_per_s")
                        )
                if on_step is not None:
                    on_step(step, stats)
                interrupted = distributed.agree_on_stop(signals.received)
                if interrupted:
                    say(f"received {interrupted}: saving a checkpoint at step {step}, then stopping")
                if is_last or interrupted or _due(step, config.save_every):
                    checkpoint = run.save(state)
                if interrupted:
                    say(f"stopped at step {step}; resume from {checkpoint}")
                    break
    except BaseException:
        trackers.finish()
        raise
    finally:
        progress.close()
    progress.finished(state.step)
    with trackers:
        last = state.history[-1] if state.history else {}
        if (
            final_sharpness
            and sharpness is not None
            and state.step >= config.steps
            and not (last.get("step") == state.step and "sharpness" in last)
        ):
            write(io.json_safe({"step": state.step, "sharpness": _in_eval_mode(run.module, sharpness)}))
    return LoopResult(
        out_dir=run.out_dir,
        config=config,
        step=state.step,
        start_step=start_step,
        history=state.history,
        tokens=state.tokens,
        train_seconds=state.train_seconds,
        nonfinite_steps=state.nonfinite_steps,
        ascent_nonfinite_steps=state.ascent_nonfinite_steps,
        interrupted=interrupted,
        checkpoint=checkpoint,
        step_times=state.step_times,
        warmup_steps=state.warmup_steps,
        steps_per_cycle=int(getattr(run.optimizer, "steps_per_cycle", 1)),
    )


# The first steps of each start (or resume) are left out of the median step time: start-up,
# torch.compile and the allocator's first passes make them slower than the run.
TIMING_WARMUP_STEPS = 10


def median_step_ms(step_times: list[float], steps_per_cycle: int = 1) -> float | None:
    """The run's step time in ms: the median over whole cycles of the optimizer's schedule of each
    cycle's mean step. A SAM step every k-th step (or LookSAM's full step) is in every cycle at its
    share, where a median over single steps would report the cheap step alone; the median still
    leaves out a cycle slowed by the machine. Fewer steps than a cycle: their mean."""
    if not step_times:
        return None
    k = max(1, steps_per_cycle)
    cycles = [sum(step_times[i : i + k]) / k for i in range(0, len(step_times) - k + 1, k)]
    return 1000 * (statistics.median(cycles) if cycles else statistics.fmean(step_times))


def timing_warmup(steps: int) -> int:
    """Steps of a start left out of the median step time: 10, at most a fifth of a short run, at least 1."""
    return max(1, min(TIMING_WARMUP_STEPS, steps // 5))


def _headline(record: Mapping[str, Any]) -> tuple[str, float] | None:
    """The loss a progress line shows: ``val_loss``, else the first evaluation loss."""
    metrics = evaluation_metrics(record)
    if "val_loss" in metrics:
        return "val_loss", metrics["val_loss"]
    losses = [key for key in metrics if key.endswith("loss")]
    return (losses[0], metrics[losses[0]]) if losses else None


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _one_step(run: TrainingRun, state: LoopState, forward, loss, count_tokens, step_args) -> dict:
    """Draw the micro-batches, take one optimizer step, step the scheduler, update counters.
    Returns the step's statistics (agreed across processes)."""
    started = time.perf_counter()  # step time includes fetching the data
    device = next(run.model.parameters()).device
    micro_batches = [_to_device(next(run.train_batches), device) for _ in range(run.config.grad_accum)]
    if not run.step_plan_checked:
        checks.step_plan(run.optimizer, micro_batches)
        run.step_plan_checked = True
    batch = micro_batches if len(micro_batches) > 1 else micro_batches[0]
    lr = current_lr(run.optimizer)
    try:
        stats = train_step(run.optimizer, batch, forward, loss, **step_args).as_dict()
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        # torch refuses a step size beyond float32 (e.g. lr / Adam's bias correction): divergence.
        raise NonFiniteLossError(
            f"training stopped at step {state.step + 1}: the optimizer's step size overflowed float32 "
            f"(lr={lr:g}: {first_line(exc)}); lower the learning rate"
        ) from None
    if run.scheduler is not None:
        # The schedule follows the loop's step count, skipped steps included; torch warns
        # when a scheduler steps without an optimizer step, which is intended here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            run.scheduler.step()
    tokens = sum(count_tokens(b) for b in micro_batches)
    stats, tokens = distributed.agree_across_processes(stats, tokens)
    seconds = time.perf_counter() - started

    state.step += 1
    state.tokens += tokens
    state.train_seconds += seconds
    state.last_lr = lr
    state.window.add(stats, tokens, seconds)
    return stats


def _step_loss(stats: Mapping[str, Any]) -> float:
    """The step's training loss by its named fields: the loss at w (``ascent_loss``), or at w+ε
    for a step without a pass at w (Momentum-SAM)."""
    value = stats.get("ascent_loss", stats.get("loss_perturbed"))
    return float("nan") if value is None else float(value)


def _apply_nonfinite_policy(state: LoopState, stats: Mapping[str, Any], config: LoopConfig) -> None:
    loss_value = _step_loss(stats)
    nonfinite = bool(stats.get("skipped")) or not math.isfinite(loss_value)
    if stats.get("ascent_nonfinite"):
        state.ascent_nonfinite_steps += 1
    if not nonfinite:
        state.nonfinite_streak = 0
        return
    state.nonfinite_steps += 1
    state.nonfinite_streak += 1
    if config.nonfinite == "stop" and state.nonfinite_streak >= config.max_nonfinite:
        raise NonFiniteLossError(
            f"training stopped at step {state.step}: {state.nonfinite_streak} consecutive steps with a "
            f"non-finite loss or gradient (loss={loss_value}); lower the learning rate or rho, or keep going "
            "with --nonfinite skip"
        )


def _measurement(step: int, state: LoopState, model: nn.Module, evaluate, sharpness) -> dict:
    """One metrics line: training means since the last line, then evaluation and sharpness.

    Fields: step, train_<StepStats field> means (train_loss, train_grad_norm, ...), val metrics
    from ``evaluate``, ``sharpness`` (a dict) when measured, lr (of the last step), tokens
    (total so far), tokens_per_s and step_s (over the window), nonfinite_steps (total so far).
    """
    window = state.window
    record: dict[str, Any] = {"step": step}
    record.update(window.means())
    if evaluate is not None:
        record.update(_in_eval_mode(model, evaluate))
    if sharpness is not None:
        record["sharpness"] = dict(_in_eval_mode(model, sharpness))
    record["lr"] = state.last_lr
    record["tokens"] = state.tokens
    record["tokens_per_s"] = window.tokens / window.seconds if window.seconds else None
    record["step_s"] = window.seconds / window.steps if window.steps else None
    record["nonfinite_steps"] = state.nonfinite_steps
    state.window = Window()
    return io.json_safe(record)


def _open_trackers(run: TrainingRun, state: LoopState):
    """The run's ``--report-to`` trackers (rank 0 only; the others get none), its settings as
    hyperparameters: ``config.json`` as the harness wrote it, else the loop's own."""
    from samlm.integrations import tracking

    config = run.config
    if not run.main or not tracking.parse_report_to(config.report_to):
        return tracking.Trackers()
    record = run.run_dir.read_config() or {"config": config.as_dict()}
    return tracking.start(
        config.report_to,
        run.out_dir,
        run_name=config.run_name,
        group=config.run_group,
        hparams=tracking.hyperparameters(record),
        resume=state.step > 0,
        step=state.step,
    )


def _tracked_training(window: Window, lr: float | None) -> dict:
    """A tracker's training log: the means since the last one (``train/loss``, SAM's signals,
    ``train/sam_step`` the share of SAM steps), the lr, tokens/s and the mean step time."""
    values: dict[str, float | None] = {"train/" + k[len("train_") :]: v for k, v in window.means().items()}
    values["train/lr"] = lr
    if window.seconds:
        values["train/tokens_per_s"] = window.tokens / window.seconds
    if window.steps:
        values["train/step_s"] = window.seconds / window.steps
    return values


def _tracked_measurement(record: Mapping[str, Any]) -> dict:
    """A tracker's evaluation log: ``eval/<metric>`` and ``sharpness/<value>``."""
    values = {f"eval/{k}": v for k, v in evaluation_metrics(record).items()}
    if isinstance(record.get("sharpness"), Mapping):
        values["sharpness"] = record["sharpness"]
    return values


def _in_eval_mode(model: nn.Module, fn: Callable[[nn.Module], Mapping[str, Any]]) -> dict:
    was_training = model.training
    model.eval()
    try:
        return dict(fn(model))
    finally:
        model.train(was_training)


def _postfix(stats: Mapping[str, Any], state: LoopState) -> dict:
    window = state.window
    postfix: dict[str, str | int] = {"loss": f"{_step_loss(stats):.4f}"}
    if window.seconds:
        postfix["tok/s"] = f"{window.tokens / window.seconds:,.0f}"
    if state.nonfinite_steps:
        postfix["nonfinite"] = state.nonfinite_steps
    return postfix
