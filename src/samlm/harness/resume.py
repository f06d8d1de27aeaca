"""A training run's state, to a checkpoint (:mod:`samlm.io`) and back: the loop's counters
(:class:`LoopState`, with the open logging :class:`Window`) and its stateful objects
(:class:`TrainingRun`). A fresh start clears the run directory and seeds the RNGs; a resume
restores all of it from the newest good checkpoint and rewrites ``metrics.jsonl`` to its history."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samlm import io
from samlm.errors import NonFiniteLossError, UserError, first_line
from samlm.harness.rundir import RunDir
from samlm.integrations import distributed
from samlm.progress import say

TRAIN_STATE_FORMAT = "samlm-train-state"


@dataclass
class Window:
    """Sums over the steps since the last metrics line (their means go into the next line)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # finite StepStats values, summed
    counts: dict[str, int] = field(default_factory=dict)
    flags: bool = False  # also average the bool statistics (sam_step: the share of SAM steps)

    def add(self, stats: Mapping[str, Any], tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        for key, value in stats.items():
            if isinstance(value, bool) and self.flags:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {f"train_{k}": self.sums[k] / self.counts[k] for k in self.sums}


@dataclass
class LoopState:
    """The loop's counters and metrics history: what a checkpoint holds besides the objects."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    nonfinite_steps: int = 0  # steps with a non-finite loss or a skipped update
    nonfinite_streak: int = 0
    ascent_nonfinite_steps: int = 0
    last_lr: float | None = None
    window: Window = field(default_factory=Window)
    history: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # seconds of each step after a warm-up
    warmup_steps: int = 0  # steps not in step_times: each start's (or resume's) first steps

    def to_state(self) -> dict:
        # JSON strings keep the checkpoint free of anything weights_only loading refuses.
        d = asdict(self)
        d["window"] = json.dumps(d["window"])
        d["history"] = json.dumps(io.json_safe(self.history))
        d["step_times"] = json.dumps([round(t, 7) for t in self.step_times])
        return d

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> LoopState:
        d = dict(d)
        d["window"] = Window(**json.loads(d["window"]))
        d["history"] = json.loads(d["history"])
        d["step_times"] = json.loads(d.get("step_times", "[]"))  # a checkpoint from before they were kept
        return cls(**d)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingRun:
    """The stateful objects of a run (``config``: its :class:`~samlm.harness.loop.LoopConfig`), and
    how they go to and come back from a checkpoint."""

    def __init__(self, model, optimizer, train_batches, config, scheduler, scaler):
        self.model = model
        self.module = distributed.unwrap_model(model)  # evaluated, measured and saved without DDP/FSDP1
        self.main = distributed.is_main_process()  # the one process that writes
        self.optimizer = optimizer
        self.train_batches = train_batches
        self.config = config
        self.scheduler = scheduler
        self.scaler = scaler
        self.run_dir = RunDir(config.out)
        self.out_dir = self.run_dir.path
        self.checkpoint_root = self.run_dir.checkpoints
        self.step_plan_checked = False

    def start(self) -> tuple[LoopState, Path | None]:
        """Fresh state, or the state of the latest good checkpoint when resuming."""
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.run_dir.resumes(self.config.resume):
            checkpoint = io.load_latest_checkpoint(self.checkpoint_root)  # warns about bad ones
            state = self.restore(checkpoint)
            # Drop lines written after the checkpoint (they will be written again).
            if self.main:
                self.run_dir.rewrite_metrics(state.history)
            skipped = ", ".join(path.name for path, _ in checkpoint.skipped)
            say(
                f"resumed from {checkpoint.path} at step {state.step}"
                + (f" (newer checkpoint(s) {skipped} unusable, see the warning above)" if skipped else "")
            )
            return state, checkpoint.path
        if self.main:  # LoopConfig.validate has checked that starting over here is allowed
            self.run_dir.clear()
        if self.config.seed is not None:
            seed_everything(self.config.seed)
        return LoopState(), None

    def save(self, state: LoopState) -> Path:
        """Write a checkpoint (main process; the others take part in gathering FSDP shards)."""
        path = self.checkpoint_root / f"{io.CHECKPOINT_PREFIX}{state.step}"
        if distributed.is_distributed() and not distributed.all_finite(self.module.parameters()):
            # Every process stops here together (a single rank raising would leave the others waiting).
            raise self._diverged(f"weights at step {state.step} are not finite")
        model_state = distributed.model_state_to_save(self.module)
        optimizer_state = distributed.optimizer_state_to_save(self.module, self.optimizer)
        if self.main:
            path = self._write(state, model_state, optimizer_state)
        distributed.barrier()
        return path

    def _diverged(self, what: str) -> NonFiniteLossError:
        previous = io.checkpoint_dirs(self.checkpoint_root)
        last_good = previous[-1][1] if previous else "none"
        return NonFiniteLossError(f"{what}; the weights diverged. Last checkpoint: {last_good}")

    def _write(self, state: LoopState, model_state: dict, optimizer_state: dict) -> Path:
        extra = {
            "format": TRAIN_STATE_FORMAT,
            "loop": state.to_state(),
            "config": json.dumps(self.config.as_dict()),
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.train_batches.state_dict(),
            "rng": io.capture_rng_state(),
        }
        try:
            return io.save_checkpoint(
                self.checkpoint_root, state.step, model_state, extra, keep=self.config.keep_checkpoints
            )
        except io.NonFiniteWeightsError as exc:
            raise self._diverged(str(exc)) from None

    def restore(self, checkpoint: io.Checkpoint) -> LoopState:
        extra = checkpoint.extra_state
        if not isinstance(extra, Mapping) or extra.get("format") != TRAIN_STATE_FORMAT:
            raise UserError(f"{checkpoint.path} is not a samlm training checkpoint")
        self._load_model(checkpoint)
        try:
            distributed.load_optimizer_state(self.module, self.optimizer, extra["optimizer"])
            _load_optional("scheduler", self.scheduler, extra.get("scheduler"), checkpoint.path)
            _load_optional("grad scaler", self.scaler, extra.get("scaler"), checkpoint.path)
            self.train_batches.load_state_dict(extra["data"])
            io.restore_rng_state(extra["rng"])
            return LoopState.from_state(extra["loop"])
        except UserError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            # A checkpoint of another optimizer / schedule / data pipeline: a different run.
            raise UserError(
                f"checkpoint {checkpoint.path} does not match this run ({type(exc).__name__}: "
                f"{first_line(exc)}); resume with the flags it was saved with, or start over"
            ) from None

    def _load_model(self, checkpoint: io.Checkpoint) -> None:
        try:
            missing, unexpected = distributed.load_model_state(self.module, checkpoint.model_state)
        except RuntimeError as exc:  # shapes differ: another architecture
            raise UserError(f"checkpoint {checkpoint.path} does not match the model: {first_line(exc)}") from None
        if missing or unexpected:
            raise UserError(
                f"checkpoint {checkpoint.path} does not match the model: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )


def _load_optional(what: str, obj, state, path: Path) -> None:
    if obj is None and state is None:
        return
    if obj is None or state is None:
        raise UserError(
            f"checkpoint {path} was saved {'with' if state is not None else 'without'} a {what}, "
            f"but this run has {'none' if obj is None else 'one'}"
        )
    obj.load_state_dict(state)
