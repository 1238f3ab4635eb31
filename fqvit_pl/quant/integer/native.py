"""Fused CPU kernels of the integer model, compiled from ``csrc/*.cpp`` on first use.

The integer model's bulk elementwise passes (Log-Int-Softmax, the integer LayerNorm) are exact
integer arithmetic that ATen runs as many separate passes over memory; the kernels in ``csrc/``
do each in one or two passes per row. They are built with :func:`torch.utils.cpp_extension.load`
(the C++ compiler that ``torch.compile`` on CPU needs anyway) into torch's extension cache, once per
source version, and register operators under ``torch.ops.fqvit_native``; every operator has a pure
PyTorch equivalent in :mod:`.kernels` that gives the same bits, which the integer layers use when
the kernels cannot be built or ``FQVIT_NATIVE=0`` is set.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["native_ops", "native_available", "CFLAGS"]

SOURCES = Path(__file__).with_name("csrc")

#: ``-ffp-contract=off``: no fused multiply-add, so every float operation rounds as ATen's does.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


def _sources() -> list[Path]:
    return sorted(SOURCES.glob("*.cpp"))


def _build_name(sources: list[Path]) -> str:
    # one build per source version and torch version: helpers and upgrades never share a stale one
    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(_cpu_flags().encode())  # -march=native: a build is only for this CPU
    for flag in CFLAGS:
        digest.update(flag.encode())
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"fqvit_native_{digest.hexdigest()[:16]}"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _quiet_import_load():
    # its import logs "No CUDA runtime is found" on every CPU machine: not news for a CPU build
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    return load


@functools.cache
def native_ops() -> ModuleType | None:
    """Build (once per source version, cached by torch) and load the fused kernels.

    Returns ``torch.ops.fqvit_native``, or ``None`` when ``FQVIT_NATIVE=0`` is set, there are no
    sources, or the build fails (a warning names the reason; the pure PyTorch kernels are used).
    """
    if os.environ.get("FQVIT_NATIVE", "1") == "0":
        return None
    sources = _sources()
    if not sources:
        return None
    try:
        load = _quiet_import_load()
        load(
            name=_build_name(sources),
            sources=[str(p) for p in sources],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers: fall back, say why
        warnings.warn(
            f"fqvit_pl: the fused integer kernels in {SOURCES} could not be built ({error}); "
            "the integer model runs its pure PyTorch kernels (same results, slower). "
            "Set FQVIT_NATIVE=0 to skip the build.",
            stacklevel=2,
        )
        return None
    from . import native_fake  # noqa: F401  (shapes for torch.compile)

    return torch.ops.fqvit_native


def native_available() -> bool:
    """Whether the fused kernels are built and loaded (see :func:`native_ops`)."""
    return native_ops() is not None
