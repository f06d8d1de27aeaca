"""Crash safety of both harnesses, end to end through the CLI.

* ``kill -9`` at a seeded random point mid-run, then ``--resume``: the same final weights
  (``torch.equal``) and the same metrics (timing fields aside) as an uninterrupted run.
* SIGTERM / SIGINT: the run finishes its step, saves a checkpoint, exits 130; ``--resume``
  then continues bitwise.
* A truncated or corrupted newest checkpoint: a warning names it, the previous one is used.
* Non-finite training: ``--nonfinite stop`` ends in one line and exit 2, ``skip`` keeps going;
  NaN weights never reach the disk.

The killed / signalled runs are subprocesses (``python -m samlm``) with one torch thread, like
the in-process reference runs (tests/conftest.py), so that results are bitwise comparable.
Set ``SAMLM_KILL_SEED`` to try other kill points.
"""

from __future__ import annotations

import ast
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samlm import cli, io
from samlm.data import demo_data_dir
from tinymodels import read_json, run_samlm, save_t5, without_timing

KILL_SEED = int(os.environ.get("SAMLM_KILL_SEED", "6"))
SAVE_EVERY = 2

PRETRAIN_STEPS = 16
PRETRAIN = [
    "--layers",
    2,
    "--width",
    32,
    "--heads",
    2,
    "--context",
    16,
    "--batch",
    4,
    "--max-chars",
    20000,
    "--val-batches",
    1,
    "--optimizer",
    "sam",
    "--dropout",
    0.1,
    "--steps",
    PRETRAIN_STEPS,
    "--eval-every",
    3,
    "--save-every",
    SAVE_EVERY,
    "--sharpness-iters",
    3,
    "--sharpness-batch-size",
    4,
    "--threads",
    1,
    "--no-progress",
]
FINETUNE_STEPS = 12


def finetune_flags(t5_dir):
    return [
        "--model",
        t5_dir,
        "--task",
        "glue/rte",
        "--data-dir",
        demo_data_dir(),
        "--optimizer",
        "sam",
        "--batch",
        4,
        "--grad-accum",
        2,
        "--steps",
        FINETUNE_STEPS,
        "--eval-every",
        4,
        "--save-every",
        SAVE_EVERY,
        "--eval-examples",
        2,
        "--seed",
        3,
    ]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def flags(t5_dir):
    return {"pretrain": PRETRAIN, "finetune": finetune_flags(t5_dir)}


STEPS = {"pretrain": PRETRAIN_STEPS, "finetune": FINETUNE_STEPS}


def samlm(*argv) -> int:
    """The CLI in this process, on one torch thread (module fixtures run outside conftest's pin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(flags, tmp_path_factory):
    """Uninterrupted runs of both harnesses (made once, compared against by every test)."""
    runs = {}
    for harness in ("pretrain", "finetune"):
        out = tmp_path_factory.mktemp(f"reference-{harness}") / "run"
        assert samlm(harness, *flags[harness], "--out", out) == 0
        runs[harness] = out
    return runs


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    step, path = io.checkpoint_dirs(run / "checkpoints")[-1]
    return load_file(str(path / "model.safetensors"))


def headline(harness: str, summary: dict) -> dict:
    keys = {
        "pretrain": (
            "step",
            "completed",
            "val_loss",
            "best_val_loss",
            "train_loss",
            "hessian_lambda_max",
            "gauss_newton_lambda_max",
            "nonfinite_steps",
            "tokens",
        ),
        "finetune": ("step", "completed", "metrics", "score"),
    }[harness]
    return without_timing({k: summary.get(k) for k in keys})


def assert_same_run(harness: str, reference: Path, run: Path) -> None:
    a, b = final_weights(reference), final_weights(run)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    assert without_timing(io.read_jsonl(run / "metrics.jsonl")) == without_timing(
        io.read_jsonl(reference / "metrics.jsonl")
    )
    assert headline(harness, read_json(run / "summary.json")) == headline(
        harness, read_json(reference / "summary.json")
    )
    assert not list(run.rglob(".tmp*")) and not list(run.rglob(".trash*"))  # nothing half-written left


def wait_for_checkpoint(out: Path, proc, min_step: int, timeout: float = 180.0) -> int:
    """Poll until a checkpoint of step >= min_step exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [step for step, _ in io.checkpoint_dirs(out / "checkpoints") if step >= min_step]
        if found:
            return max(found)
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"run ended (exit {proc.returncode}) before checkpoint {min_step}:\n{err}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no checkpoint >= {min_step} after {timeout} s")


def kill_point(harness: str) -> tuple[int, float]:
    """(checkpoint step to wait for, extra delay): seeded, somewhere in the middle of the run."""
    rng = random.Random(f"{KILL_SEED}-{harness}")
    saves = STEPS[harness] // SAVE_EVERY
    return SAVE_EVERY * rng.randint(1, saves - 3), rng.uniform(0.0, 0.02)


# --------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("harness", ["pretrain", "finetune"])
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(harness, flags, reference, tmp_path):
    out = tmp_path / "killed"
    step, delay = kill_point(harness)
    proc = run_samlm([harness, *flags[harness], "--out", out])
    try:
        wait_for_checkpoint(out, proc, step)
        time.sleep(delay)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (exit {proc.returncode}):\n{err}"
    assert not (out / "summary.json").exists()

    assert samlm(harness, *flags[harness], "--out", out, "--resume") == 0
    assert_same_run(harness, reference[harness], out)


# --------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("harness, signame", [("pretrain", "SIGTERM"), ("finetune", "SIGINT")])
def test_signal_saves_a_checkpoint_exits_130_and_resumes_exactly(harness, signame, flags, reference, tmp_path):
    out = tmp_path / "signalled"
    step, _ = kill_point(harness)
    proc = run_samlm([harness, *flags[harness], "--out", out])
    try:
        wait_for_checkpoint(out, proc, step)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "samlm: error" not in err
    assert f"received {signame}" in err
    summary = read_json(out / "summary.json")
    stopped = summary["step"]
    assert not summary["completed"] and summary["interrupted"] == signame and step <= stopped < STEPS[harness]
    assert io.load_latest_checkpoint(out / "checkpoints").step == stopped  # saved where it stopped
    assert all(r["step"] <= stopped for r in io.read_jsonl(out / "metrics.jsonl"))

    assert samlm(harness, *flags[harness], "--out", out, "--resume") == 0
    assert_same_run(harness, reference[harness], out)


# --------------------------------------------------------------------------- damaged checkpoints


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle: same size, different content
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "harness, file, how, reason",
    [
        ("pretrain", "model.safetensors", "truncate", "model.safetensors is truncated"),
        ("finetune", "state.pt", "corrupt", "state.pt is corrupted (sha256 mismatch)"),
    ],
)
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(
    harness, file, how, reason, flags, reference, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(reference[harness], run)
    steps = STEPS[harness]
    newest = run / "checkpoints" / f"checkpoint-{steps}"
    damage(newest / file, how)
    capsys.readouterr()

    assert samlm(harness, *flags[harness], "--out", run, "--resume") == 0
    err = capsys.readouterr().err
    assert f"samlm: warning: checkpoint {newest} is unusable: {reason}" in err
    assert (
        f"resumed from {run / 'checkpoints' / f'checkpoint-{steps - SAVE_EVERY}'} at step {steps - SAVE_EVERY}" in err
    )
    assert "Traceback" not in err
    assert_same_run(harness, reference[harness], run)  # steps redone from the previous checkpoint
    io.verify_checkpoint(newest)  # and the damaged one rewritten whole


def test_no_usable_checkpoint_is_one_line_naming_each(flags, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference["pretrain"], run)
    for _, path in io.checkpoint_dirs(run / "checkpoints"):
        damage(path / "model.safetensors", "truncate")
    capsys.readouterr()
    assert samlm("pretrain", *flags["pretrain"], "--out", run, "--resume") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("samlm: error:")]
    assert len(errors) == 1
    assert f"no usable checkpoint in {run / 'checkpoints'}" in errors[0]
    assert f"checkpoint-{PRETRAIN_STEPS}: model.safetensors is truncated" in errors[0]
    assert f"checkpoint-{PRETRAIN_STEPS - SAVE_EVERY}: model.safetensors is truncated" in errors[0]


# --------------------------------------------------------------------------- non-finite values


def assert_checkpoints_finite(run: Path) -> None:
    for _, path in io.checkpoint_dirs(run / "checkpoints"):
        io.verify_checkpoint(path)
        for name, tensor in load_file(str(path / "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), f"{path.name}/{name} holds NaN/Inf"


SHORT_PRETRAIN = [
    "--layers",
    2,
    "--width",
    32,
    "--heads",
    2,
    "--context",
    16,
    "--batch",
    4,
    "--max-chars",
    20000,
    "--val-batches",
    1,
    "--steps",
    12,
    "--eval-every",
    2,
    "--save-every",
    2,
    "--no-sharpness",
    "--no-progress",
]


def test_nonfinite_stop_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "diverged"
    assert samlm("pretrain", *SHORT_PRETRAIN, "--lr", 1e6, "--nonfinite", "stop", "--out", out) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("samlm: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err
    assert "consecutive steps with a non-finite loss or gradient" in errors[0]
    assert "--nonfinite skip" in errors[0]
    assert not (out / "summary.json").exists()
    assert_checkpoints_finite(out)


def test_nonfinite_skip_keeps_going_with_finite_weights(tmp_path):
    out = tmp_path / "skipped"
    assert samlm("pretrain", *SHORT_PRETRAIN, "--lr", 1e6, "--nonfinite", "skip", "--out", out) == 0
    summary = read_json(out / "summary.json")
    assert summary["completed"] and summary["nonfinite_steps"] > 0
    assert_checkpoints_finite(out)


def test_step_size_overflowing_float32_is_one_line(tmp_path, capsys):
    out = tmp_path / "overflow"
    assert samlm("pretrain", *SHORT_PRETRAIN, "--lr", 3e38, "--warmup", 0, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overflowed float32" in err and "lower the learning rate" in err


def test_finetune_max_nonfinite_sets_the_patience(t5_dir, tmp_path, capsys, monkeypatch):
    import dataclasses

    from samlm.harness import loop

    real_step = loop.train_step
    calls = {"n": 0}

    def nan_from_step_2(*args, **kwargs):  # the loss turns NaN at step 2 and stays so
        stats = real_step(*args, **kwargs)
        calls["n"] += 1
        return dataclasses.replace(stats, ascent_loss=math.nan, loss_perturbed=math.nan) if calls["n"] >= 2 else stats

    monkeypatch.setattr(loop, "train_step", nan_from_step_2)
    out = tmp_path / "ft"
    assert samlm("finetune", *finetune_flags(t5_dir), "--nonfinite", "stop", "--max-nonfinite", 3, "--out", out) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("samlm: error: training stopped at step 4: 3 consecutive steps with a non-finite")
    assert [step for step, _ in io.checkpoint_dirs(out / "checkpoints")] == [2]
    assert_checkpoints_finite(out)


def test_nan_weights_are_never_saved_through_the_harness(t5_dir, tmp_path, capsys, monkeypatch):
    from samlm.harness import loop

    real_step = loop.train_step
    calls = {"n": 0}

    def poisoning_step(optimizer, *args, **kwargs):
        stats = real_step(optimizer, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the update of step 3 turns a weight into NaN (loss stayed finite)
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return stats

    monkeypatch.setattr(loop, "train_step", poisoning_step)
    out = tmp_path / "poisoned"
    assert samlm("finetune", *finetune_flags(t5_dir), "--nonfinite", "skip", "--out", out) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("samlm: error: refusing to save checkpoint at step 4: non-finite (NaN/Inf) weights")
    assert [step for step, _ in io.checkpoint_dirs(out / "checkpoints")] == [2]
    assert_checkpoints_finite(out)
    assert not (out / "summary.json").exists()


# --------------------------------------------------------------------------- every write goes through samlm.io

SOURCE = Path(__file__).resolve().parents[1] / "src" / "samlm"
# (file, call) pairs that write something that is not a result of a run.
WRITE_ALLOWED = {
    ("bench.py", "open"): "os.devnull: silences the profiler's own log lines while it measures memory",
    ("store.py", "open"): "token streams are appended, fsynced and counted in progress.json after each "
    "chunk (resume truncates to the count); meta.json, written atomically last, "
    "is what makes a prepared directory complete (tests/test_prepared.py); the lock file holds no data",
}


def _writes(tree: ast.AST):
    """(lineno, what) of each call that writes a file directly (instead of through samlm.io)."""
    in_memory = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) in {"BytesIO", "StringIO"}
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(getattr(func, "value", None), "id", "")
        if name == "open":
            mode = (
                node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                yield node.lineno, "open"
        elif name in {"write_text", "write_bytes", "to_csv", "tofile", "save_file", "save_pretrained"}:
            yield node.lineno, name
        elif name == "dump" and owner in {"json", "pickle", "yaml"}:
            yield node.lineno, f"{owner}.dump"
        elif name == "save" and owner in {"torch", "np", "numpy"}:
            yield node.lineno, f"{owner}.save"
        elif name == "savefig" and not (
            node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in in_memory
        ):
            yield node.lineno, "savefig"


@pytest.mark.parametrize(
    "path", sorted(p for p in SOURCE.rglob("*.py") if p.name != "io.py"), ids=lambda p: str(p.relative_to(SOURCE))
)
def test_every_file_a_run_writes_goes_through_samlm_io(path):
    """Atomic writes (temp file, fsync, rename) are samlm.io's job: no module writes a file itself."""
    direct = [
        (line, what) for line, what in _writes(ast.parse(path.read_text())) if (path.name, what) not in WRITE_ALLOWED
    ]
    assert not direct, f"{path.relative_to(SOURCE)}: direct writes {direct}; use samlm.io.atomic_write_*"
