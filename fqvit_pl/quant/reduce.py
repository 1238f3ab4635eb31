"""How observer statistics combine across processes.

Observers never talk to torch.distributed themselves: they hand each statistic, with its merge
rule, to the current :class:`StatReducer`. On one process the reducer is the identity; under an
initialized process group :class:`DistributedReducer` merges them, so every rank ends with the
statistics of the concatenation of all ranks' batches.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "MergeRule",
    "StatReducer",
    "LocalReducer",
    "DistributedReducer",
    "get_reducer",
    "use_reducer",
    "merge",
]

#: ``min``/``max``/``sum``: elementwise; ``cat``: concatenate 1-D tensors along dim 0 in rank order.
MergeRule = Literal["min", "max", "sum", "cat"]


def merge(a: Tensor, b: Tensor, rule: MergeRule) -> Tensor:
    """Combine two partial results of one statistic by its rule (``a`` first in order)."""
    if rule == "min":
        return torch.minimum(a, b)
    if rule == "max":
        return torch.maximum(a, b)
    if rule == "sum":
        return a + b
    if rule == "cat":
        return torch.cat([a.reshape(-1), b.reshape(-1)])
    raise ValueError(f"unknown merge rule {rule!r}")


class StatReducer:
    """Merges a statistic computed on this process's data with every other process's."""

    def reduce(self, value: Tensor, rule: MergeRule) -> Tensor:
        """Return the statistic merged over all processes (the identity on one process)."""
        return value

    @property
    def distributed(self) -> bool:
        return False


class LocalReducer(StatReducer):
    """The single-process reducer: nothing to merge."""


class DistributedReducer(StatReducer):
    """Merges statistics over a ``torch.distributed`` process group (any backend)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        # NCCL only moves CUDA tensors; gloo and others take CPU ones.
        nccl = dist.get_backend(group) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    @property
    def distributed(self) -> bool:
        return True

    def reduce(self, value: Tensor, rule: MergeRule) -> Tensor:
        if rule == "cat":
            return self._gather_cat(value.reshape(-1).to(self.device)).to(value.device)
        op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[rule]
        out = value.to(self.device, copy=True)
        dist.all_reduce(out, op=op, group=self.group)
        return out.to(value.device)

    def _gather_cat(self, value: Tensor) -> Tensor:
        world = dist.get_world_size(self.group)
        size = torch.tensor([value.numel()], device=value.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=self.group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=value.dtype, device=value.device)
        padded[: value.numel()] = value
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[: int(n.item())] for part, n in zip(parts, sizes)])


_current: StatReducer = LocalReducer()


def get_reducer() -> StatReducer:
    """The reducer observers use now."""
    return _current


@contextlib.contextmanager
def use_reducer(reducer: StatReducer) -> Iterator[StatReducer]:
    """Make ``reducer`` the current one inside the ``with`` block."""
    global _current
    previous, _current = _current, reducer
    try:
        yield reducer
    finally:
        _current = previous
