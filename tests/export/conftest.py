"""Tests of fqvit_pl.export run single-threaded (bitwise comparisons, shared CPU)."""

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (``one_thread``, tests/conftest.py)."""
