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
