"""Terminal output for long runs: a tqdm progress bar and status lines that do not break it."""

from __future__ import annotations

import sys
import time


def progress_enabled(requested: bool = True) -> bool:
    """Show a bar only when asked and stderr is a terminal (never in logs, CI or tests)."""
    return bool(requested) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True, desc: str = "train"):
    """A step counter bar; disabled (a cheap no-op object) unless :func:`progress_enabled`."""
    from tqdm.auto import tqdm  # here: the CLI's logging setup imports this module without the harness extra

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not progress_enabled(enabled),
        leave=True,
    )


class RunProgress:
    """What a training run shows as it goes (main process only, when ``enabled``): on a terminal,
    the step bar with the last training and validation loss; otherwise (a log file, a pipe) one
    line per evaluation and one at the end, so a long run is never silent in a log."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
        self.enabled = bool(enabled) and _is_main_process()
        self.terminal = progress_enabled(self.enabled)
        self.bar = progress_bar(total, initial=initial, enabled=self.enabled)
        self.total, self.initial = total, initial
        self.started = time.perf_counter()
        self.validation: tuple[str, float] | None = None  # the last evaluation's (name, loss)

    def step(self, postfix: dict) -> None:
        """One step done; ``postfix``: the bar's numbers (the training loss, tokens/s)."""
        self.bar.update(1)
        if self.validation is not None:
            postfix = {**postfix, "val": f"{self.validation[1]:.4f}"}
        self.bar.set_postfix(postfix, refresh=False)

    def evaluated(self, step: int, train_loss: float | None, validation: tuple[str, float] | None, tokens_per_s):
        """An evaluation at ``step``: the bar's postfix, or a line."""
        if validation is not None:
            self.validation = validation
        if not self.enabled or self.terminal:
            return
        parts = [f"step {step}/{self.total}"]
        if train_loss is not None:
            parts.append(f"train loss {train_loss:.4f}")
        if validation is not None:
            parts.append(f"{validation[0].replace('_', ' ')} {validation[1]:.4f}")
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tokens/s")
        done = step - self.initial
        if 0 < done and step < self.total:
            left = (time.perf_counter() - self.started) / done * (self.total - step)
            parts.append(f"ETA {duration(left)}")
        say(", ".join(parts))

    def finished(self, step: int) -> None:
        """The loop ended at ``step`` (the last line, without a terminal)."""
        if self.enabled and not self.terminal:
            elapsed = time.perf_counter() - self.started
            say(f"trained to step {step}/{self.total} in {duration(elapsed)}")

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def say(message: str) -> None:
    """One status line on stderr, printed above an active progress bar (by the main process
    only, when several train together)."""
    if not _is_main_process():
        return
    from tqdm.auto import tqdm

    tqdm.write(f"samlm: {message}", file=sys.stderr)


def _is_main_process() -> bool:
    """Rank 0 of a process group, or the only process (torch.distributed directly: this plumbing
    sits below the integrations layer)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


# Loggers of libraries that warn on every import and mean nothing for a run, when the environment
# has torchao (transformers imports it when installed; samlm does not need it) about its CUDA kernels, torch's pytree about torchao's enums.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_third_party_loggers() -> None:
    """Only errors from :data:`QUIET_LOGGERS` (the CLI and every worker process of a comparison)."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
