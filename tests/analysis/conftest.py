"""Shared helpers of the analysis tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is as fast, and immune to the stalls of a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
