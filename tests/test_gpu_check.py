"""`make gpu-check`'s script: a pre-flight names each missing thing in one line before any long step
(without a GPU it refuses there); in smoke mode (the same commands on the CPU, tiny shapes) every
step runs and the summary names every target. The smoke run goes through `make gpu-check PYTHON=...`
with a Python that has torch but not samlm, as on a cluster node: no venv is made, nothing is
installed, and samlm runs from this checkout (PYTHONPATH=src), torchrun's worker included."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
MAKE = shutil.which("make")


def _env(tmp_path, **extra):
    env = {**os.environ, "OUT": str(tmp_path / "gc"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    env.pop("PYTHONPATH", None)  # samlm comes from wherever the script finds it
    env.pop("VENV", None)
    return env


def _preflight_module():
    spec = importlib.util.spec_from_file_location("gpu_check_preflight", ROOT / "scripts" / "gpu_check_preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_without_a_gpu_in_the_preflight(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=_env(tmp_path, PYTHON=sys.executable), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith("gpu-check: ") for line in lines), lines
    assert any(line.startswith("gpu-check: missing: a CUDA GPU") for line in lines)
    assert "== 1." not in done.stderr and not (tmp_path / "gc").exists()  # no step started


def test_preflight_prints_one_line_per_missing_import(monkeypatch, capsys):
    preflight = _preflight_module()
    monkeypatch.setattr(preflight, "IMPORTS", ("numpy", "samlm_test_absent_one", "samlm_test_absent_two"))
    assert preflight.main(["--smoke"]) == 2
    err = capsys.readouterr().err.splitlines()
    missing = [line for line in err if line.startswith("gpu-check: missing: ")]
    assert [line.split()[2] for line in missing] == ["samlm_test_absent_one", "samlm_test_absent_two"]
    assert any("skipped (smoke mode" in line for line in err) and err[-1].startswith("gpu-check: pre-flight failed")


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_gpu_check_with_python_makes_no_venv_and_runs_no_pip():
    def dry_run(*args):
        return subprocess.run(
            [MAKE, "-n", "-C", str(ROOT), "VENV=/nonexistent/samlm-venv", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    with_python = dry_run("gpu-check", "PYTHON=python3")
    assert 'PYTHON="python3" bash scripts/gpu_check.sh' in with_python
    assert "venv" not in with_python and "pip" not in with_python
    assert "pip install" in dry_run("gpu-check")  # the default still sets up .venv


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_smoke_mode_runs_every_check_from_the_checkout(tmp_path, python_without_samlm):
    probe = [
        python_without_samlm,
        "-c",
        "import importlib.util as u; print(u.find_spec('samlm'), u.find_spec('torch'))",
    ]
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.startswith("None ModuleSpec")
    done = subprocess.run(
        [MAKE, "-s", "-C", str(ROOT), "gpu-check", f"PYTHON={python_without_samlm}"],
        env=_env(tmp_path, GPU_CHECK_SMOKE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f" from {ROOT / 'src' / 'samlm'}" in done.stderr  # the checkout's samlm, via PYTHONPATH=src
    assert "gpu-check: pre-flight ok" in done.stderr and "gpu-check: missing" not in done.stderr
    summary = (tmp_path / "gc" / "summary.md").read_text()
    for target in (
        "SAM <= 1.25x AdamW",
        "F-SAM <= 1.55x AdamW",
        "within 10% of the bare loop",
        "pretrain-fsam completed",
        "pretrain-sam-fp16 completed",
        "torchrun-fsam completed",
    ):
        assert target in summary
    assert "| torchrun-fsam completed | yes |" in summary and "| pretrain-sam-fp16 completed | yes |" in summary
