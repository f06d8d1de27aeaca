"""`make gpu-check`'s script: without a GPU it refuses in one line; in smoke mode (the same
commands on the CPU, tiny shapes) every step runs and the summary names every target."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env(tmp_path, **extra):
    venv = Path(sys.executable).parent.parent  # the venv running the tests
    return {
        **os.environ,
        "VENV": str(venv),
        "OUT": str(tmp_path / "gc"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in done.stderr


def test_smoke_mode_runs_every_check(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=_env(tmp_path, GPU_CHECK_SMOKE="1"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
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
