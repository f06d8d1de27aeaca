"""Terminal output for long runs: a tqdm progress bar and status lines that do not break it."""

from __future__ import annotations

import sys


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
