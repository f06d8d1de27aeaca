"""Experiment trackers: ``--report-to tensorboard,wandb,mlflow,trackio|all|none``.

Hugging Face ``Trainer``'s ``report_to`` names and meaning (``all``: every tracker installed;
``none``, the default: no tracker). One small adapter per tracker, each through the tracker's
own library (``torch.utils.tensorboard``, ``wandb``, ``mlflow``'s ``MlflowClient``, ``trackio``),
imported only when asked for (``pip install 'samlm[tracking]'`` installs all four).

What goes where (the training loop, :mod:`samlm.harness.loop`, calls :meth:`Trackers.log`):

* every ``--log-every`` steps: ``train/loss``, ``train/lr``, ``train/tokens_per_s``,
  ``train/step_s`` and SAM's own signals, means over the steps since the last log:
  ``train/loss_perturbed`` (the loss at w+ε), ``train/grad_norm`` (‖g‖), ``train/eps_norm``
  (‖ε‖), ``train/sam_step`` (the share of SAM steps), ``train/update_grad_norm``;
* at each evaluation: ``eval/<metric>`` (``eval/val_loss``, ``eval/report_loss``, a task's
  metrics) and ``sharpness/<value>``; after a run, ``robustness/...`` (:meth:`Trackers.log_final`);
* once: the run's settings (``config.json``) as hyperparameters.

Rules: only the process that writes files (rank 0) opens trackers. A run's tracker runs are
grouped (``run_group``: W&B ``group``, MLflow experiment, trackio project); a resumed run
continues its own tracker run where the tracker allows it (ids in ``OUT/tracking.json``; W&B
``resume="allow"``, MLflow's run id, TensorBoard's ``purge_step``, trackio ``resume="allow"``).
Credentials stay with each tracker's own login or environment variables: samlm never reads or
passes them, and a URL's ``user:password@`` or a known secret variable's value is masked in
hyperparameters and warnings. A tracker that fails, at the start or in the middle of a run, is
one warning line and is dropped: training and the run's own files go on unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from samlm import io
from samlm.errors import UserError
from samlm.progress import say

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# The module each tracker needs, and what to install for it.
_MODULES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}
IDS_FILE = "tracking.json"  # in the run directory: each tracker's run id (resume continues it)
TENSORBOARD_DIR = "tensorboard"  # in the run directory: TensorBoard's event files
DEFAULT_PROJECT = "samlm"
# Environment variables whose values are secrets: masked wherever they might surface.
SECRET_VARIABLES = (
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "DATABRICKS_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
)


# --------------------------------------------------------------------------- the setting


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``--report-to`` as tracker names: a comma-separated list, ``all`` (every tracker installed)
    or ``none``. One line naming the problem for an unknown name or a missing library."""
    items = _items(value)
    if not items or items == ["none"]:
        return ()
    if items == ["all"]:
        return tuple(name for name in TRACKERS if installed(name))
    unknown = [t for t in items if t not in TRACKERS]
    if unknown or len(set(items)) != len(items):
        what = f"unknown tracker(s) {', '.join(unknown)}" if unknown else "a tracker is named twice"
        raise UserError(f"--report-to: {what} (choose from {', '.join(TRACKERS)}, or all, or none)")
    missing = [t for t in items if not installed(t)]
    if missing:
        packages = " ".join(_MODULES[t][1] for t in missing)
        raise UserError(
            f"--report-to {','.join(missing)} needs {packages}: pip install 'samlm[tracking]' "
            f"(or pip install {packages})"
        )
    return tuple(items)


def _items(value: str | Iterable[str] | None) -> list[str]:
    """``--report-to``'s names, lower-cased, blanks dropped."""
    if value is None:
        return []
    items = [t.strip().lower() for t in (value.split(",") if isinstance(value, str) else value)]
    return [t for t in items if t]


def check_report_to(flag: str, value) -> None:
    """The setting's check (:func:`samlm.harness.settings.setting`)."""
    if not isinstance(value, str):
        raise UserError(f"{flag} must be a comma-separated list of trackers, got {value!r}")
    parse_report_to(value)


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[name][0]) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- masking


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def redact(text: str) -> str:
    """``text`` with a URL's ``user:password@`` and the values of :data:`SECRET_VARIABLES` masked."""
    text = _USERINFO.sub(r"\1***@", str(text))
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def hyperparameters(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's ``config.json`` record as flat hyperparameters: the settings by name, the values
    resolved from them as ``resolved.<name>`` (nested ones joined with dots); strings masked."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = (
                redact(json.dumps(value))
                if any(isinstance(v, (dict, list)) for v in value)
                else ",".join(redact(str(v)) for v in value)
            )
        elif isinstance(value, str):
            flat[prefix] = redact(value)
        else:
            flat[prefix] = value

    record = record or {}
    walk("", record.get("config") or {})
    walk("resolved", record.get("resolved") or {})
    return flat


def numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) mapping, keys joined with ``/`` (bools as 0/1)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numbers(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- adapters


class _Adapter:
    """One tracker's run: ``start`` (or continue), ``log`` numbers at a step, ``finish``."""

    name = ""

    def __init__(
        self,
        out: Path,
        run_name: str,
        group: str | None,
        hparams: Mapping[str, Any],
        run_id: str | None,
        step: int,
    ):
        self.out, self.run_name, self.group, self.hparams, self.step = out, run_name, group, hparams, step
        self.run_id = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class _TensorBoard(_Adapter):
    name = "tensorboard"

    def __init__(self, *args):
        super().__init__(*args)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        logdir = self.out / TENSORBOARD_DIR
        # purge_step: TensorBoard hides what an interrupted session logged after the checkpoint
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=self.step + 1 if self.step else None)
        if not self.run_id:
            self.run_id = TENSORBOARD_DIR
            scalars = {k: v for k, v in self.hparams.items() if isinstance(v, (int, float, str, bool))}
            for summary in hparams_summary(scalars, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(dict(self.hparams), indent=1) + "\n```")

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self):
        self.writer.close()


class _Wandb(_Adapter):
    name = "wandb"

    def __init__(self, *args):
        super().__init__(*args)
        import wandb

        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=self.run_name,
            group=self.group,
            id=self.run_id,
            resume="allow",
            dir=str(self.out),
            config=dict(self.hparams),
            reinit="finish_previous",
        )
        # the loop's step is the x-axis (a resumed run logs again from its checkpoint's step)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, metrics, step):
        self.run.log({**metrics, "train/global_step": step})

    def finish(self):
        self.run.finish()


class _MLflow(_Adapter):
    name = "mlflow"

    def __init__(self, *args):
        super().__init__(*args)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()  # the tracking URI and credentials: MLflow's own environment
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.group or DEFAULT_PROJECT
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in self.hparams.items() if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self):
        self.client.set_terminated(self.run_id)


class _Trackio(_Adapter):
    name = "trackio"

    def __init__(self, *args):
        super().__init__(*args)
        import contextlib
        import io as _io

        import trackio

        project = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.group or DEFAULT_PROJECT).strip("-") or DEFAULT_PROJECT
        with contextlib.redirect_stdout(_io.StringIO()):  # its banner would break the progress bar
            self.run = trackio.init(
                project=project,
                name=self.run_name,
                config=dict(self.hparams),
                resume="allow",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.run_id = f"{project}/{self.run_name}"

    def log(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def finish(self):
        import contextlib
        import io as _io

        with contextlib.redirect_stdout(_io.StringIO()):
            self.run.finish()


ADAPTERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}


# --------------------------------------------------------------------------- the trackers of a run


class Trackers:
    """The trackers a run reports to (none: every call does nothing). A tracker that raises is
    one warning line and is dropped; nothing it does reaches training."""

    def __init__(self, adapters: Iterable[_Adapter] = (), *, out: Path | None = None):
        self.adapters = list(adapters)
        self.out = out

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def _each(self, what: str, call) -> None:
        for adapter in list(self.adapters):
            try:
                call(adapter)
            except Exception as exc:
                self.adapters.remove(adapter)
                _warn(adapter.name, what, exc)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numbers(metrics)
        if values:
            self._each("log", lambda adapter: adapter.log(values, step))

    def log_final(self, metrics: Mapping[str, Any], step: int, prefix: str = "robustness/") -> None:
        """Numbers measured after training (``summary.json``'s robustness measures)."""
        self.log(numbers(metrics, prefix), step)

    def finish(self) -> None:
        self._each("finish", lambda adapter: adapter.finish())
        self.adapters = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def _warn(name: str, what: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    say(f"warning: {name} failed ({what}: {type(exc).__name__}: {redact(text)[:300]}); training continues without it")


def start(
    report_to: str | Iterable[str] | None,
    out: str | Path,
    *,
    run_name: str | None = None,
    group: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    resume: bool = False,
    step: int = 0,
) -> Trackers:
    """Open (``resume``: continue) the run's trackers. ``out``: the run directory (TensorBoard's
    events and W&B's files go there; ``tracking.json`` keeps each tracker's run id). ``run_name``:
    default the directory's name. ``hparams``: flat hyperparameters (:func:`hyperparameters`)."""
    names = parse_report_to(report_to)
    if not names:
        if _items(report_to) == ["all"]:  # as Trainer's report_to="all", but said rather than silent
            say(
                "--report-to all: no tracker library is installed, so nothing is reported "
                "(metrics.jsonl has everything); pip install 'samlm[tracking]'"
            )
        return Trackers()
    out = Path(out)
    ids_file = out / IDS_FILE
    ids: dict[str, str] = {}
    if resume and ids_file.is_file():
        try:
            ids = {k: str(v) for k, v in json.loads(ids_file.read_text()).items()}
        except (OSError, ValueError):
            ids = {}
    elif not resume:  # a fresh start: the previous run's tracker runs and events are not this one's
        ids_file.unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    run_name = run_name or out.resolve().name
    adapters = []
    for name in names:
        try:
            adapters.append(ADAPTERS[name](out, run_name, group, dict(hparams or {}), ids.get(name), step))
        except Exception as exc:
            _warn(name, "start", exc)
    ids.update({a.name: a.run_id for a in adapters if a.run_id})
    if adapters:
        try:
            io.atomic_write_json(ids_file, ids)
        except OSError as exc:
            _warn("tracking", f"writing {IDS_FILE}", exc)
    return Trackers(adapters, out=out)


def continue_run(
    out: str | Path, report_to: str | None, *, run_name: str | None = None, group: str | None = None
) -> Trackers:
    """The trackers of a finished run, opened again to add what was measured after training."""
    return start(report_to, out, run_name=run_name, group=group, resume=True)
