"""Shared test settings."""

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
    """Prepared-data cache (samlm.data.prepared) in a temporary directory, never ~/.cache: every
    test process (and the CLI subprocesses they start) shares it, as runs on one machine do."""
    import os
    import tempfile

    if "SAMLM_CACHE" not in os.environ:
        os.environ["SAMLM_CACHE"] = config._samlm_made_cache = tempfile.mkdtemp(prefix="samlm-test-cache-")


def pytest_unconfigure(config):
    """The cache this session made goes with it (xdist workers inherit the controller's)."""
    import shutil

    made = getattr(config, "_samlm_made_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
