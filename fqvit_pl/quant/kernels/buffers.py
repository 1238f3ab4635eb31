"""The one buffer pool of fqvit_pl.quant: temporaries that the fast kernels reuse from call to call.

Allocated and freed per call, multi-megabyte temporaries make glibc's ``malloc`` shrink and regrow
its heap over and over, and on CPU every regrowth costs a page fault per 4 KiB, a large share of
the eager integer LayerNorm and Log-Int-Softmax (``benchmarks/README.md`` has the numbers). Here
each temporary has a name; the memory behind a name is allocated once per thread (and device, and
inference mode), grown when a larger tensor is asked for, and reused by every later call. It stays
allocated until :func:`release_buffers`. A kernel never returns or keeps a pooled tensor: its
result is always a fresh tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

__all__ = ["reused_tensor", "release_buffers"]

_THREAD_STATE = threading.local()


def _pool() -> dict:
    pool = getattr(_THREAD_STATE, "pool", None)
    if pool is None:
        pool = _THREAD_STATE.pool = {}
    return pool


def reused_tensor(
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    min_numel: int = 0,
    initialize: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """An uninitialized contiguous ``shape`` tensor: the same memory on every call with ``name``.

    The memory is this thread's, for this device and inference mode (an inference tensor cannot be
    written outside inference mode). It is grown to at least ``min_numel`` elements when it is
    allocated; ``initialize`` is called on the whole new buffer then, for contents that every user
    keeps (a cached ramp, say). Two live tensors must not share a name.
    """
    device = torch.device(device)
    key = (name, device, dtype, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    pool = _pool()
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = torch.empty(max(numel, min_numel), dtype=dtype, device=device)
        if initialize is not None:
            initialize(buffer)
    return buffer[:numel].view(shape)


def release_buffers() -> None:
    """Free this thread's pooled temporaries (they are allocated again on the next use)."""
    _THREAD_STATE.pool = {}
