"""Shared test settings."""

import subprocess
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_per_test():
    """Two xdist workers share 2 cores: more threads per test only adds contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def float32_default():
    """Every test starts from torch's float32 default (a module that wants float64 sets it in its
    own fixture), whatever an earlier test in the same xdist worker left behind."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def float64_default():
    """float64 for the test, for modules pinned against float64 references:
    ``pytestmark = pytest.mark.usefixtures("float64_default")`` (runs after float32_default)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def pytest_configure(config):
    """Prepared-data cache (samlm.data.cache) in a temporary directory, never ~/.cache: every
    test process (and the CLI subprocesses they start) shares it, as runs on one machine do.

    And a per-session temporary directory as TMPDIR for every process started from here on (xdist
    workers, CLI subprocesses, torchrun and the ``torchelastic_*`` directories it makes): removed
    at the end, so a run leaves nothing behind in the system's temporary directory, and a test
    session never touches another's files there. This process keeps its own (already resolved)
    temporary directory, so pytest's ``tmp_path`` roots stay where pytest looks for them."""
    import os
    import tempfile

    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    if "SAMLM_CACHE" not in os.environ:
        os.environ["SAMLM_CACHE"] = config._samlm_made_cache = tempfile.mkdtemp(prefix="samlm-test-cache-")
    tempfile.gettempdir()  # resolve (and cache) this process's own before TMPDIR changes
    config._samlm_made_tmp = tempfile.mkdtemp(prefix="samlm-test-tmp-")
    config._samlm_old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = config._samlm_made_tmp


def pytest_unconfigure(config):
    """What this session made goes with it (xdist workers inherit the controller's)."""
    import os
    import shutil

    made_tmp = getattr(config, "_samlm_made_tmp", None)
    if made_tmp:
        old = config._samlm_old_tmpdir
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        shutil.rmtree(made_tmp, ignore_errors=True)
    made = getattr(config, "_samlm_made_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def python_without_samlm(tmp_path):
    """A Python with the suite's torch and libraries but without samlm, as a cluster node's Python
    with its own PyTorch: a venv (no pip) whose .pth lists the suite's site-packages as plain paths,
    so the .pth files there (the editable samlm's among them) are not read. Its ``bin/python``."""
    import sysconfig
    import venv

    env = tmp_path / "python-without-samlm"
    venv.create(env, with_pip=False, symlinks=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    suite = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(purelib) / "suite-site-packages.pth").write_text("".join(f"{path}\n" for path in suite))
    return python
