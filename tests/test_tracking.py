"""``--report-to``: each tracker for real, offline, read back with its own reader; what a tracker
receives (training means every --log-every steps with SAM's signals, evaluations, sharpness,
the settings as hyperparameters); resume continues the tracker run; a failing tracker is one
warning line and changes nothing else; no secret reaches a file or a line."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from samlm import io
from samlm.cli import main
from samlm.harness.pretrain import PretrainConfig, pretrain
from samlm.integrations import tracking

TINY = dict(
    layers=1,
    width=16,
    heads=2,
    context=16,
    batch=4,
    max_chars=20_000,
    val_batches=2,
    sharpness_iters=3,
    sharpness_batch_size=4,
    progress=False,
    optimizer="sam",
    steps=6,
    eval_every=3,
    log_every=3,
)


def tiny(tmp_path, name="run", **overrides) -> PretrainConfig:
    return PretrainConfig(out=str(tmp_path / name), **(TINY | overrides))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker local: W&B offline, MLflow's file store, trackio's directory, all under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path


def lines(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step (the final sharpness line merged into its step's)."""
    merged: dict[int, dict] = {}
    for record in io.read_jsonl(run_dir / "metrics.jsonl"):
        merged.setdefault(record["step"], {}).update(record)
    return merged


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_training_means_sam_signals_evaluations_and_sharpness(tmp_path):
    """Read back with TensorBoard's own EventAccumulator: with --log-every = --eval-every the
    training means are metrics.jsonl's; SAM's ‖ε‖ and loss at w+ε are there, every step a SAM
    step; val/report losses and λ_max at the evaluations; the settings as hyperparameters."""
    summary = pretrain(tiny(tmp_path, report_to="tensorboard"))
    run = tmp_path / "run"
    scalars = tensorboard_scalars(run / "tensorboard")
    metrics = lines(run)
    assert set(scalars["train/loss"]) == {3, 6}
    for step in (3, 6):
        for key in ("loss", "loss_perturbed", "grad_norm", "eps_norm", "update_grad_norm"):
            assert scalars[f"train/{key}"][step] == pytest.approx(metrics[step][f"train_{key}"], rel=1e-6)
        assert scalars["eval/val_loss"][step] == pytest.approx(metrics[step]["val_loss"], rel=1e-6)
        assert scalars["eval/report_loss"][step] == pytest.approx(metrics[step]["report_loss"], rel=1e-6)
        assert scalars["train/sam_step"][step] == 1.0 and scalars["train/tokens_per_s"][step] > 0
        assert scalars["train/lr"][step] == pytest.approx(metrics[step]["lr"])
    assert scalars["sharpness/hessian_lambda_max"][6] == pytest.approx(summary["hessian_lambda_max"], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"optimizer": "sam"' in text and '"resolved.total_steps": 6' in text


def test_compare_reports_every_run_to_one_tensorboard(tmp_path):
    """``samlm compare --report-to tensorboard``: each run's events under its own directory, so
    ``tensorboard --logdir OUT`` shows every run's curves side by side; runs named and grouped."""
    code = main(
        [
            "compare",
            "--optimizers",
            "adamw,sam",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--log-every",
            "2",
            "--layers",
            "1",
            "--width",
            "16",
            "--heads",
            "2",
            "--context",
            "16",
            "--batch",
            "4",
            "--max-chars",
            "20000",
            "--val-batches",
            "2",
            "--no-sharpness",
            "--no-progress",
            "--report-to",
            "tensorboard",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0
    for name in ("adamw-seed0", "sam-rho0.05-seed0"):
        scalars = tensorboard_scalars(tmp_path / "cmp" / name / "tensorboard")
        assert set(scalars["eval/val_loss"]) == {2, 4}
        config = json.loads((tmp_path / "cmp" / name / "config.json").read_text())["config"]
        assert config["run_name"] == name and config["run_group"] == str(tmp_path / "cmp")
    sam = tensorboard_scalars(tmp_path / "cmp" / "sam-rho0.05-seed0" / "tensorboard")
    adamw = tensorboard_scalars(tmp_path / "cmp" / "adamw-seed0" / "tensorboard")
    assert sam["train/eps_norm"][2] > 0 and adamw["train/sam_step"][2] == 0.0


# --------------------------------------------------------------------------- W&B, MLflow, trackio


def wandb_records(run_file: Path):
    """The records of W&B's transaction log (the LevelDB log framing around wandb's own protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, records = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_files_hold_the_metrics_and_settings(offline):
    pretrain(tiny(offline, report_to="wandb", run_name="tiny-sam", run_group="my-comparison"))
    run_id = json.loads((offline / "run" / "tracking.json").read_text())["wandb"]
    (run_file,) = glob.glob(str(offline / "run" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = wandb_records(Path(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.run_group) == (run_id, "tiny-sam", "my-comparison")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optimizer"] == "sam" and config["steps"] == 6
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    val = {h["train/global_step"]: h["eval/val_loss"] for h in history if "eval/val_loss" in h}
    metrics = lines(offline / "run")
    assert val == {3: pytest.approx(metrics[3]["val_loss"]), 6: pytest.approx(metrics[6]["val_loss"])}
    assert any("train/eps_norm" in h for h in history)


def test_wandb_resume_continues_the_same_run_id(offline):
    """Ctrl-C at step 4 and --resume: W&B is opened again with the saved id (resume="allow"), so the
    resumed offline run is the same run; its history goes on from the resumed step."""

    def ctrl_c(step, stats):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    assert pretrain(tiny(offline, report_to="wandb"), on_step=ctrl_c)["interrupted"] == "SIGINT"
    run_id = json.loads((offline / "run" / "tracking.json").read_text())["wandb"]
    assert pretrain(tiny(offline, report_to="wandb", resume=True))["completed"]
    assert json.loads((offline / "run" / "tracking.json").read_text())["wandb"] == run_id
    run_files = sorted(glob.glob(str(offline / "run" / "wandb" / "offline-run-*" / "run-*.wandb")))
    # one offline directory per start (two, unless both starts fell in the same second), all of this id
    assert run_files and all(Path(f).name == f"run-{run_id}.wandb" for f in run_files)
    steps = []
    for run_file in run_files:
        records = wandb_records(Path(run_file))
        assert all(r.run.run_id == run_id for r in records if r.WhichOneof("record_type") == "run")
        history = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        steps += [h["train/global_step"] for h in history if "eval/val_loss" in h]
    assert sorted(steps) == [3, 6]  # the evaluation before the stop and the one after, each once


def test_mlflow_file_store_read_back_and_resume_continues_the_run(offline, capsys):
    """MLflow's local file store through MlflowClient: the group is the experiment, settings are
    params. Ctrl-C at step 4 and --resume: the same MLflow run continues (one eval per step)."""
    from mlflow import MlflowClient

    def ctrl_c(step, stats):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny(offline, report_to="mlflow,tensorboard", run_group="grid")
    stopped = pretrain(config, on_step=ctrl_c)
    assert stopped["interrupted"] == "SIGINT"
    first = json.loads((offline / "run" / "tracking.json").read_text())
    resumed = pretrain(tiny(offline, report_to="mlflow,tensorboard", run_group="grid", resume=True))
    assert resumed["completed"]
    assert json.loads((offline / "run" / "tracking.json").read_text()) == first
    client = MlflowClient()
    run = client.get_run(first["mlflow"])
    assert client.get_experiment(run.info.experiment_id).name == "grid"
    assert run.data.params["optimizer"] == "sam" and run.info.status == "FINISHED"
    metrics = lines(offline / "run")
    history = {m.step: m.value for m in client.get_metric_history(first["mlflow"], "eval/val_loss")}
    assert history == {3: pytest.approx(metrics[3]["val_loss"]), 6: pytest.approx(metrics[6]["val_loss"])}
    assert len(client.get_metric_history(first["mlflow"], "eval/val_loss")) == 2
    assert set(tensorboard_scalars(offline / "run" / "tensorboard")["eval/val_loss"]) == {3, 6}


def test_trackio_local(offline):
    """trackio's local store (TRACKIO_DIR), read back with its own SQLiteStorage, in a fresh
    process (trackio reads TRACKIO_DIR when imported)."""
    script = (
        "import json, sys\n"
        "from samlm.harness.pretrain import PretrainConfig, pretrain\n"
        f"pretrain(PretrainConfig(**{dict(TINY, sharpness=False)!r}, report_to='trackio', run_name='tiny', "
        f"out={str(offline / 'run')!r}))\n"
        "from trackio.sqlite_storage import SQLiteStorage\n"
        "print('LOGS', json.dumps(SQLiteStorage.get_logs('samlm', 'tiny')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, env=dict(os.environ), capture_output=True, text=True, timeout=180
    )
    logs = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("LOGS "))[5:])
    val = {row["step"]: row["eval/val_loss"] for row in logs if "eval/val_loss" in row}
    metrics = lines(offline / "run")
    assert val == {3: pytest.approx(metrics[3]["val_loss"]), 6: pytest.approx(metrics[6]["val_loss"])}
    assert any("train/eps_norm" in row for row in logs)


# --------------------------------------------------------------------------- failures and secrets


def test_a_failing_tracker_is_one_warning_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """A tracker that fails mid-run (a server gone) is one warning line, with a URL's password
    masked; the run completes and its files equal those of a run without trackers."""

    from torch.utils.tensorboard import SummaryWriter

    def gone(self, *args, **kwargs):
        raise ConnectionError("https://alice:hunter22@tracker.example/api unreachable\nretrying")

    monkeypatch.setattr(SummaryWriter, "add_scalar", gone)
    plain = pretrain(tiny(tmp_path, "plain"))
    tracked = pretrain(tiny(tmp_path, "tracked", report_to="tensorboard"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "tensorboard failed" in line]
    assert len(warnings) == 1 and "hunter22" not in err and "***@tracker.example" in warnings[0]
    assert tracked["completed"] and tracked["val_loss"] == plain["val_loss"]
    timing = {"tokens_per_s", "step_s", "sharpness"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(io.read_jsonl(tmp_path / "tracked" / "metrics.jsonl")) == strip(
        io.read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    )


def test_a_tracker_that_cannot_start_is_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret-pw@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    summary = pretrain(tiny(tmp_path, report_to="mlflow", steps=2, eval_every=2, sharpness=False))
    err = capsys.readouterr().err
    assert summary["completed"] and "mlflow failed (start" in err and "s3cret-pw" not in err


def test_no_secret_reaches_the_run_files(tmp_path, monkeypatch, capsys):
    """Credentials stay in the trackers' environment: nothing samlm writes (config.json, metrics,
    summary, tracking.json, TensorBoard's hyperparameters) holds one."""
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-secret-pw")
    pretrain(tiny(tmp_path, report_to="tensorboard"))
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            data = path.read_bytes()
            assert b"wandb-secret-0123456789" not in data and b"mlflow-secret-pw" not in data, path
    hp = tracking.hyperparameters(
        {"config": {"model": "https://carol:pw-in-url@example.invalid/m", "note": "key wandb-secret-0123456789"}}
    )
    assert hp == {"model": "https://***@example.invalid/m", "note": "key ***"}


@pytest.mark.parametrize(
    "value, message",
    [
        ("tensorbord", "unknown tracker(s) tensorbord"),
        ("wandb,wandb", "named twice"),
    ],
)
def test_bad_report_to_is_one_line(value, message, tmp_path, capsys):
    assert main(["pretrain", "--report-to", value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_tracker_names_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    assert main(["pretrain", "--report-to", "tensorboard,wandb", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'samlm[tracking]'" in err and "wandb" in err and err.count("\n") == 1
    assert tracking.parse_report_to("all") == ("tensorboard", "mlflow", "trackio")
    assert tracking.parse_report_to("none") == () and tracking.parse_report_to(None) == ()


def test_report_to_all_with_no_tracker_installed_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    trackers = tracking.start("all", tmp_path / "run")
    err = capsys.readouterr().err
    assert not trackers
    assert err.count("\n") == 1 and "--report-to all: no tracker library is installed" in err
    tracking.start("none", tmp_path / "run")
    assert capsys.readouterr().err == ""


def test_tracking_settings_do_not_change_the_resume_identity():
    from samlm.harness import settings

    for name in ("report_to", "run_name", "log_every", "run_group"):
        field = PretrainConfig.__dataclass_fields__[name]
        assert field.metadata["resume"] is False, name
    assert settings.flag(PretrainConfig, "report_to") == "--report-to"
    from samlm.harness.finetune import FinetuneConfig

    assert settings.flag(FinetuneConfig, "log_every") == "--log-every"


def test_robustness_measures_reach_the_same_tracker_run(tmp_path):
    """--robustness measures after training: the run's tracker run is continued and gets them
    (robustness/weight_noise/..., robustness/quantization/..., robustness/forgetting/...)."""
    summary = pretrain(
        tiny(
            tmp_path,
            report_to="tensorboard",
            sharpness=False,
            robustness=True,
            noise_sigmas="0.05",
            noise_draws=1,
            forget_steps=2,
            forget_lrs="3e-3",
            quant_group_size=8,
        )
    )
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["robustness/weight_noise/base_loss"][6] == pytest.approx(summary["weight_noise"]["base_loss"])
    assert any(k.startswith("robustness/quantization/") for k in scalars)
    assert set(scalars["eval/val_loss"]) == {3, 6}  # the training curves are still there


def test_finetune_compare_names_and_groups_its_runs(tmp_path):
    """finetune-compare passes --report-to to every run, named by the run and grouped under the
    comparison's --run-name (else its --out)."""
    import re as _re
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from samlm.harness.finetune import FinetuneConfig
    from samlm.studies.finetune_grid import FinetuneGrid
    from tinymodels import save_bert

    wic = Path(__file__).parent / "fixtures" / "wic16" / "WiC" / "train.jsonl"
    bert = save_bert(tmp_path / "bert", sorted(set(_re.findall(r"[a-z]+", wic.read_text().lower()))))
    for run_name, group, prefix in ((None, str(tmp_path / "cmp"), ""), ("wic-sam", "wic-sam", "wic-sam/")):
        base = FinetuneConfig(model=str(bert), task="superglue/wic", report_to="tensorboard", run_name=run_name)
        grid = FinetuneGrid(out=str(tmp_path / "cmp"), base=base, optimizers="adamw,sam", seeds="0,1")
        for name, config, _ in grid.runs():
            assert (config.report_to, config.run_name, config.run_group) == ("tensorboard", prefix + name, group)
