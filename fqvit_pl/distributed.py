"""Multi-process helpers that keep every number equal to the single-process run.

- :func:`eval_sampler` splits an evaluation set over the ranks without padding, so no image is
  scored twice (Lightning's default ``DistributedSampler`` pads to a multiple of the world size).
- :func:`shard_batch` gives each rank its contiguous part of a global calibration batch, so the
  ranks' batches concatenated in rank order are exactly the single-process batch.
"""

from __future__ import annotations

from typing import Any, Sized

import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Sampler

__all__ = ["world_info", "eval_sampler", "shard_batch"]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eval_sampler(dataset: Sized) -> Sampler | None:
    """An unpadded, in-order split of ``dataset`` over the ranks, or ``None`` on one process.

    Rank r gets indices ``r, r + W, r + 2W, …``: the ranks' shares may differ by one image, and
    every image is scored exactly once. Lightning leaves a loader with this sampler as it is.
    """
    rank, world = world_info()
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous part of every tensor in ``batch`` (split along dim 0).

    Tuples, lists and dicts are split element by element; other values are passed through.
    Raises ``ValueError`` when a batch has fewer samples than there are ranks.
    """
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] < world:
            raise ValueError(
                f"a calibration batch of {batch.shape[0]} samples cannot be split over {world} processes; "
                "raise the calibration batch size"
            )
        return torch.tensor_split(batch, world)[rank]
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(item, rank, world) for item in batch)
    if isinstance(batch, dict):
        return {key: shard_batch(value, rank, world) for key, value in batch.items()}
    return batch
