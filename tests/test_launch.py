"""The harnesses on several processes: ``torchrun -m samlm ...`` and ``accelerate launch -m samlm ...``.

Two CPU processes on gloo, launched exactly as a user would. Each launched run is compared with
the same run on one process (in this process, one torch thread):

- DDP with ``--sync-ascent`` is global SAM on the global batch: it follows the single-process run;
- DDP without it perturbs each replica with its own ε: the single-process run with ``--m 2``;
- FSDP2 (``--strategy fsdp``, and accelerate's ``--use_fsdp``) follows global SAM too, and its
  gathered checkpoints resume bitwise;
- only the main process writes: one metrics line per evaluation, one summary.

The processes sum in a different order than one process does, so weights agree to float32
rounding (see ``assert_close``), not bitwise; a resumed run on the same launch is bitwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samlm import cli, io
from samlm.data import demo_data_dir
from samlm.integrations import distributed
from tinymodels import SUBPROCESS_ENV, save_bert, save_t5

PRETRAIN = [
    "pretrain",
    "--layers",
    "1",
    "--width",
    "32",
    "--heads",
    "2",
    "--context",
    "32",
    "--batch",
    "8",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--save-every",
    "2",
    "--val-batches",
    "2",
    "--no-sharpness",
    "--max-chars",
    "20000",
    "--threads",
    "1",
    "--no-progress",
    "--lr",
    "3e-3",
]
TIMEOUT_S = 240


def _launch(launcher: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **SUBPROCESS_ENV)
    for key in [k for k in env if k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))]:
        del env[key]
    return subprocess.run(
        [sys.executable, "-m", *launcher, "-m", "samlm", *map(str, argv)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def torchrun(argv, cwd) -> subprocess.CompletedProcess:
    return _launch(["torch.distributed.run", "--standalone", "--nproc-per-node", "2"], argv, cwd)


def accelerate_launch(options: list[str], argv, cwd) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port for the rendezvous (tests run in parallel)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _launch(
        [
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            *options,
        ],
        argv,
        cwd,
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return io.load_latest_checkpoint(out / "checkpoints").model_state


def assert_close(a: dict, b: dict) -> None:
    """Equal to float32 rounding. atol is 1e-4 (a few % of lr·steps), not 1e-6, for one reason:
    attention's key bias has an exactly zero gradient (softmax ignores a shift shared by all
    keys), so its gradient is pure rounding noise (~1e-10), which Adam scales up to ±lr."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-4, msg=name)


def read(out: Path, name: str):
    return json.loads((out / name).read_text())


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def global_sam(tmp_path_factory) -> Path:
    """SAM at ascent fraction 1 on one process: the reference for global SAM on two."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main([*PRETRAIN, "--optimizer", "sam", "--ascent-fraction", "1", "--out", str(out)]) == 0
    return out


def test_torchrun_pretrain_with_synced_ascent_follows_one_process(global_sam, tmp_path):
    out = tmp_path / "run"
    ok(torchrun([*PRETRAIN, "--optimizer", "sam", "--ascent-fraction", "1", "--sync-ascent", "--out", out], tmp_path))
    assert_close(final_weights(out), final_weights(global_sam))
    assert read(out, "config.json")["resolved"]["parallel"] == {
        "world_size": 2,
        "strategy": "ddp",
        "mixed_precision": "no",
        "sync_ascent": True,
    }
    summary, reference = read(out, "summary.json"), read(global_sam, "summary.json")
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert summary["tokens"] == reference["tokens"]  # tokens of both processes, counted once
    assert metrics_steps(out) == metrics_steps(global_sam) == [2, 4]  # written once, by the main process
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_torchrun_pretrain_per_replica_ascent_is_m_sharpness(tmp_path):
    """Without --sync-ascent each of 2 replicas perturbs with its own ε: one process with --m 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*PRETRAIN, "--optimizer", "sam", "--ascent-fraction", "0.25"]
    assert cli.main([*common, "--m", "2", "--out", str(one)]) == 0
    ok(torchrun([*common, "--out", two], tmp_path))
    assert_close(final_weights(two), final_weights(one))


def test_torchrun_fsdp_pretrain_follows_global_sam_and_resumes_bitwise(global_sam, tmp_path):
    out = tmp_path / "run"
    argv = [*PRETRAIN, "--optimizer", "sam", "--ascent-fraction", "1", "--strategy", "fsdp", "--out", out]
    ok(torchrun(argv, tmp_path))
    assert read(out, "config.json")["resolved"]["parallel"]["strategy"] == "fsdp"
    uninterrupted = final_weights(out)
    assert_close(uninterrupted, final_weights(global_sam))  # full tensors gathered from the shards

    # Resume from the step-2 checkpoint (sharded optimizer state gathered, then re-sharded).
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    ok(torchrun([*argv, "--resume"], tmp_path))
    resumed = final_weights(out)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert metrics_steps(out) == [2, 4]


def test_resume_on_another_number_of_processes_is_refused(global_sam, tmp_path, capsys):
    """A run saved by two processes is not silently continued on one (per-replica ε would change)."""
    out = tmp_path / "run"
    ok(torchrun([*PRETRAIN, "--optimizer", "sam", "--steps", "2", "--out", out], tmp_path))
    assert cli.main([*PRETRAIN, "--optimizer", "sam", "--steps", "2", "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "parallel" in error[0] and "world_size" in error[0]


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    out = tmp_path / "run"
    result = torchrun([*PRETRAIN, "--batch", "7", "--out", out], tmp_path)
    assert result.returncode != 0
    assert "samlm: error: --batch 7 cannot be split evenly over 2 processes: use a multiple of 2" in result.stderr
    assert "Traceback" not in result.stderr.split("samlm: error")[0]
    assert not out.exists()


def test_accelerate_launch_fsdp_bf16_pretrain(tmp_path):
    """accelerate's --use_fsdp and --mixed_precision reach the harness through its environment."""
    out = tmp_path / "run"
    ok(
        accelerate_launch(
            ["--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "bf16"],
            [*PRETRAIN, "--optimizer", "fsam", "--out", out],
            tmp_path,
        )
    )
    parallel = read(out, "config.json")["resolved"]["parallel"]
    assert parallel == {"world_size": 2, "strategy": "fsdp", "mixed_precision": "bf16", "sync_ascent": True}
    summary = read(out, "summary.json")
    assert summary["completed"] and summary["val_loss"] < 5.6  # trained (the untrained loss is ln 256 = 5.5)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    data = Path(demo_data_dir())
    words = set()
    for path in data.rglob("*.tsv"):
        words.update(w.strip(".,!?;:'\"()").lower() for w in path.read_text(encoding="utf-8").split())
    return save_bert(tmp_path_factory.mktemp("bert"), [w for w in words if w], dropout=0.0)


def test_accelerate_launch_finetune_follows_one_process(bert_dir, tmp_path):
    """accelerate launch (DDP) -m samlm finetune: a BERT classifier trained by SAM on the global batch."""
    argv = [
        "finetune",
        "--model",
        bert_dir,
        "--task",
        "glue/sst2",
        "--data-dir",
        demo_data_dir(),
        "--optimizer",
        "sam",
        "--ascent-fraction",
        "1",
        "--lr",
        "1e-3",
        "--steps",
        "3",
        "--batch",
        "4",
        "--eval-every",
        "0",
        "--max-input-length",
        "32",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*map(str, argv), "--out", str(one)]) == 0
    ok(accelerate_launch(["--multi_gpu"], [*argv, "--sync-ascent", "--out", two], tmp_path))
    assert read(two, "summary.json")["parallel"] == {
        "world_size": 2,
        "strategy": "ddp",
        "mixed_precision": "no",
        "sync_ascent": True,
    }
    assert_close(final_weights(two), final_weights(one))
    loss = [read(d, "summary.json")["metrics"]["glue/sst2/loss"]["final"] for d in (one, two)]
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)


def test_torchrun_fsdp_finetune_t5_generates_and_resumes_bitwise(tmp_path):
    """T5 sharded by FSDP2: training, generation for the metrics, gathered checkpoints, resume."""
    t5 = save_t5(tmp_path / "t5")
    argv = [
        "finetune",
        "--model",
        t5,
        "--task",
        "glue/rte,glue/sst2",
        "--data-dir",
        demo_data_dir(),
        "--optimizer",
        "fsam",
        "--base",
        "adamw",
        "--steps",
        "4",
        "--batch",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--max-input-length",
        "64",
        "--max-target-length",
        "8",
        "--strategy",
        "fsdp",
    ]
    out = tmp_path / "run"
    ok(torchrun([*argv, "--out", out], tmp_path))
    summary = read(out, "summary.json")
    assert summary["parallel"]["strategy"] == "fsdp" and summary["completed"]
    assert {"glue/rte/accuracy", "glue/sst2/accuracy"} <= set(summary["metrics"])
    uninterrupted = final_weights(out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    ok(torchrun([*argv, "--out", out, "--resume"], tmp_path))
    resumed = final_weights(out)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    # HF Adafactor (the T5 default) cannot factor a sharded matrix: refused in one line, nothing written.
    refused = tmp_path / "adafactor"
    result = torchrun([*argv[: argv.index("--base")], *argv[argv.index("--steps") :], "--out", refused], tmp_path)
    assert result.returncode != 0 and "samlm: error: Adafactor's factored second moments" in result.stderr
    assert not refused.exists()


# -- the pieces, in one process -----------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"input_ids": torch.arange(8).view(4, 2) + 100 * self.i, "labels": torch.arange(4)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_rank_shard_takes_its_contiguous_rows_and_shares_the_data_position():
    batches = [distributed.RankShard(_Counter(), rank, 2) for rank in (0, 1)]
    first = [next(b) for b in batches]
    assert torch.equal(torch.cat([f["input_ids"] for f in first]), torch.arange(8).view(4, 2) + 100)
    assert [f["labels"].tolist() for f in first] == [[0, 1], [2, 3]]
    assert batches[1].state_dict() == {"i": 1}
    assert distributed.shard_batches(batches[0].batches, 0, 1) is batches[0].batches  # one process: as is


def test_one_process_agrees_with_itself():
    stats = {"loss": 1.5, "skipped": False}
    assert distributed.agree_across_processes(stats, 10) == (stats, 10)
    assert distributed.agree_on_stop("SIGTERM") == "SIGTERM" and distributed.agree_on_stop(None) is None


def test_torchrun_reports_to_trackers_from_the_main_process_only(tmp_path):
    """--report-to under 2 processes: one TensorBoard event file and one tracker id file, written by
    rank 0, holding every evaluation once (the other rank's trackers are never opened)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ok(
        torchrun(
            [*PRETRAIN, "--optimizer", "fsam", "--report-to", "tensorboard", "--log-every", "1", "--out", out], tmp_path
        )
    )
    events = sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("eval/val_loss")] == [2, 4]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert list(json.loads((out / "tracking.json").read_text())) == ["tensorboard"]
