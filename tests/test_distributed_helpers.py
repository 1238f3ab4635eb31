"""Splitting calibration batches and evaluation sets over ranks, without a process group."""

import pytest
import torch

from fqvit_pl.distributed import eval_sampler, shard_batch, world_info


def test_shards_concatenate_to_the_global_batch():
    images, labels = torch.arange(14.0).reshape(7, 2), torch.arange(7)
    for world in (1, 2, 3):
        parts = [shard_batch((images, labels), rank, world) for rank in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
        assert isinstance(parts[0], tuple)
    assert shard_batch({"x": images}, 1, 2)["x"].shape[0] == 3


def test_a_batch_smaller_than_the_world_is_refused():
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        shard_batch(torch.zeros(3, 2), 0, 4)


def test_single_process_needs_no_sampler():
    assert world_info() == (0, 1)
    assert eval_sampler(list(range(5))) is None
