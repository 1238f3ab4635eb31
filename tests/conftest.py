"""Fixtures shared by the whole test suite."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, then restore the count: small tensors are as fast on one,
    bitwise comparisons do not depend on the machine's core count, and a busy 2-core machine does
    not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
