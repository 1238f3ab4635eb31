"""Shared helpers of the analysis tests."""

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (``one_thread``, tests/conftest.py)."""
