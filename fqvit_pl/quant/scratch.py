"""Scratch tensors that the eager integer kernels reuse within one model forward.

The eager Log-Int-Softmax and integer LayerNorm need a few temporaries the size of their input.
Allocated and freed per call, they make glibc's ``malloc`` shrink and regrow its heap over and over:
on CPU every regrowth costs a page fault per 4 KiB, which took about 40% of a quantized deit_tiny
forward on one thread (70 000 faults a forward, against 2 500 for the float model). Inside
:func:`scratch_scope` those temporaries live in a few numbered slots of raw memory, allocated once
and shared by every layer and kernel; they are released when the outermost scope closes, so
nothing outlives the forward. The price is memory held through the forward: the largest
temporaries of the LayerNorm and Log-Int-Softmax side by side (about 50 MB for swin_tiny at batch
8).

The quantized models open a scope in ``forward`` (:func:`with_scratch_scope`); a model of your own
built from :mod:`fqvit_pl.quant` layers can do the same. Only CPU tensors are pooled (CUDA's
caching allocator already reuses memory), and only by the no-autograd fast paths: a scratch tensor
is never returned or kept by a kernel.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, TypeVar

import torch
from torch import Tensor

__all__ = ["scratch_scope", "with_scratch_scope", "scratch_like"]

_STATE = threading.local()

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def scratch_scope() -> Iterator[None]:
    """Reuse the integer kernels' CPU temporaries until the outermost scope of this thread closes."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth
        if depth == 0:
            _STATE.pool = {}


def with_scratch_scope(forward: F) -> F:
    """Decorate a ``forward`` to run inside :func:`scratch_scope` (not while torch.compile traces it:
    compiled kernels take the traced path, which uses no scratch)."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return forward(*args, **kwargs)
        with scratch_scope():
            return forward(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def scratch_like(slot: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized contiguous tensor of ``like``'s shape and device (``dtype`` defaults to its).

    Inside a scope on CPU it is a view of the pooled buffer ``slot`` (its bytes, grown as needed: the
    same memory on every call). Kernels share the slots, as none runs while another is between two
    uses of a slot: a kernel numbers its temporaries from 0, and a kernel it calls takes slots above
    its caller's. Outside a scope, or off CPU, a fresh tensor.
    """
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu" or not getattr(_STATE, "depth", 0):
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    pool: dict = _STATE.__dict__.setdefault("pool", {})
    # Inference tensors cannot be written outside inference mode: one buffer per mode.
    key = (slot, torch.is_inference_mode_enabled())
    nbytes = like.numel() * dtype.itemsize
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = pool[key] = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(like.shape)
