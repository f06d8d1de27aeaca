"""samlm where users' PyTorch already is.

* A quiet import: building a Hugging Face model, importing transformers' Trainer and samlm's
  integration print nothing on stderr (no torchao in the harness extra: transformers imports it
  whenever it is installed, and it speaks on every import).
* An offline install: samlm's own wheel (as `make wheels` builds it, from a clean copy of the
  sources) installs with no index and no dependencies into a Python that already has torch and the
  libraries, and its ``samlm`` command runs from there, with its bundled corpora.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

QUIET = """
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=64, bos_token_id=0, eos_token_id=0))
LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
import transformers.trainer
from samlm.integrations.hf import SAMTrainer
import samlm.diagnostics.robustness
"""


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    env.pop("PYTHONPATH", None)
    return env


def test_building_a_model_and_importing_the_integration_print_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", QUIET], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == ""


def test_samlm_wheel_installs_with_no_index_over_an_existing_torch(tmp_path, python_without_samlm):
    had_build = (ROOT / "build").exists()
    built = subprocess.run(
        [
            sys.executable,
            ROOT / "scripts" / "wheelhouse.py",
            tmp_path / "wheels",
            "--samlm-only",
            "--no-build-isolation",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = Path(built.stdout.strip().splitlines()[-1])
    assert wheel.name.startswith("samlm-") and wheel.name.endswith("-py3-none-any.whl")
    assert (ROOT / "build").exists() == had_build  # built from a copy: nothing left in the checkout
    install = [sys.executable, "-m", "pip", "--isolated", "--python", python_without_samlm, "install"]
    done = subprocess.run(
        [*install, "--no-index", "--no-deps", "--no-compile", "-q", wheel], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]

    bin_dir = Path(python_without_samlm).parent
    helped = subprocess.run(
        [bin_dir / "samlm", "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    assert "pretrain" in helped.stdout and "bench" in helped.stdout
    where = subprocess.run(
        [
            python_without_samlm,
            "-c",
            "import importlib.resources as r, importlib.util as u; "
            "print(u.find_spec('samlm').origin); print((r.files('samlm') / 'resources' / 'tinyshakespeare.txt').is_file())",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(bin_dir.parent) and where[1] == "True"  # the wheel's, not the checkout's


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_wheels_and_install_wheels_name_the_target_and_use_no_index():
    def dry_run(*args):
        return subprocess.run(
            [MAKE, "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout

    wheels = dry_run("wheels", "WHEEL_PYTHON=3.12", "WHEEL_PLATFORM=manylinux2014_x86_64 manylinux_2_28_x86_64")
    assert "scripts/wheelhouse.py" in wheels and "--python-version 3.12" in wheels and "--torch " in wheels
    assert "--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64" in wheels
    install = dry_run("install-wheels", "WHEELS=/some/wheelhouse", "PYTHON=python3", "VENV=/nonexistent/samlm-venv")
    assert "python3 -m venv --system-site-packages /nonexistent/samlm-venv" in install
    assert "pip install --no-index --find-links \"/some/wheelhouse\" 'samlm[harness]'" in install
