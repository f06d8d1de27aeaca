"""The run directory: its layout, and every rule about what may be written there.

    OUT/config.json      the resolved settings of the run (checked again on --resume)
    OUT/metrics.jsonl    one JSON line per measurement (the loop)
    OUT/checkpoints/     checkpoint-<step>/ {model.safetensors, state.pt, manifest.json} (the loop)
    OUT/summary.json     the harness's results

Both harnesses and the loop go through :class:`RunDir`: whether the directory already holds a
run, the resume/overwrite rules, starting over, and every write (atomic, via :mod:`samlm.io`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.harness import settings

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"


class RunDir:
    """One run's directory. Nothing is written until :meth:`begin` (or a loop's first line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.summary_file = self.path / SUMMARY_FILE
        self.checkpoints = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- what is there ------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return bool(io.checkpoint_dirs(self.checkpoints))

    def holds_run(self) -> bool:
        """Metrics or checkpoints of an earlier run are here."""
        return self.metrics_file.exists() or self.has_checkpoint()

    def read_config(self) -> dict | None:
        return _read_json(self.config_file, "run configuration")

    def read_record(self, harness: str) -> dict | None:
        """``config.json``'s record of a samlm ``harness`` run (``{"config": {...}, "resolved": ...}``),
        None without a ``config.json``; one without a run configuration is a one-line ``UserError``."""
        record = self.read_config()
        if record is None or (isinstance(record, dict) and isinstance(record.get("config"), dict)):
            return record
        raise UserError(f"{self.path} is not a samlm {harness} run ({CONFIG_FILE} has no run configuration)")

    def read_summary(self) -> dict | None:
        return _read_json(self.summary_file, "summary")

    def finished_summary(self) -> dict | None:
        """The summary of a completed run, else None (missing, unreadable or unfinished)."""
        try:
            summary = self.read_summary()
        except UserError:
            return None
        return summary if isinstance(summary, dict) and summary.get("completed") else None

    # -- the rules, checked before anything is written ----------------------------------------
    def check_start(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse an ``--out`` that is a file, contradictory flags, and clobbering a run."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory")
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: choose one")
        if self.holds_run() and not (resume or overwrite):
            raise UserError(
                f"{self.path} already holds a run (metrics.jsonl or checkpoints): pass --resume to "
                "continue it, --overwrite to start over, or choose another --out"
            )
        if resume and not self.has_checkpoint():
            what = "a run stopped before its first checkpoint" if self.holds_run() else "no run"
            raise UserError(
                f"nothing to resume in {self.path}: it holds {what}; start without --resume"
                + (" (with --overwrite)" if self.holds_run() else "")
            )

    def resumes(self, resume: bool) -> bool:
        """This start continues a checkpoint (else it starts over, clearing what is here)."""
        return resume and self.has_checkpoint()

    def check_resume(
        self, record: Mapping[str, Any], identity: Callable[[Mapping[str, Any]], dict], harness: str
    ) -> None:
        """A resume continues the same samlm ``harness`` run: ``identity(saved record) == identity(record)``."""
        saved = self.read_record(harness) if self.has_checkpoint() else None
        if saved is None:
            return
        before, now = identity(saved), identity(record)
        keys = settings.differences(before, now)
        if keys:
            raise UserError(
                f"cannot resume {self.path}: it was run with a different configuration: "
                f"{settings.describe_differences(before, now, keys)}; use the same flags, or --overwrite to start over"
            )

    # -- writing ------------------------------------------------------------------------------
    def begin(self, record: Mapping[str, Any], *, resume: bool) -> None:
        """Start (or continue) the run here: clear an earlier run unless this resumes it, then
        write ``config.json``. The old run goes before the new config comes, so a crash in
        between never pairs the new settings with the old checkpoints."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.resumes(resume):
            self.clear()
        io.atomic_write_json(self.config_file, dict(record))

    def clear(self) -> None:
        """Delete an earlier run's results (metrics, summary, checkpoints; newest checkpoint first,
        so an interruption part way never leaves a newer checkpoint beside older metrics)."""
        self.metrics_file.unlink(missing_ok=True)
        self.summary_file.unlink(missing_ok=True)
        for _, path in reversed(io.checkpoint_dirs(self.checkpoints)):
            shutil.rmtree(path)

    def append_metrics(self, line: Mapping[str, Any]) -> None:
        io.append_jsonl(self.metrics_file, line)

    def rewrite_metrics(self, lines: list[dict]) -> None:
        io.write_jsonl(self.metrics_file, lines)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        io.atomic_write_json(self.summary_file, summary)


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); cannot read the {what}") from None
