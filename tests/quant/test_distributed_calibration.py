"""Calibration under torch.distributed (gloo, CPU): W ranks give exactly the single-process parameters."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_calibrate import TinyBlock  # noqa: E402  (tests/quant is on sys.path under pytest's rootdir mode)

from fqvit_pl.quant import QuantConfig, calibrate, calibration_checksum

CASES = [(method, True, True) for method in ("minmax", "ema", "percentile", "omse")] + [
    ("omse", False, False)
]
GLOBAL_BATCH = 6  # divisible by 2 and 3


def _global_batches() -> list:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(GLOBAL_BATCH, 5, 8, generator=gen) for _ in range(3)]
    batches[1][:, :, 2] *= 30  # an outlier channel for the PTF search
    return batches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, uneven: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        per_rank = GLOBAL_BATCH // world
        for method, ptf, lis in CASES:
            torch.manual_seed(0)
            model = TinyBlock(QuantConfig(method, ptf=ptf, lis=lis))
            shards = [b[rank * per_rank : (rank + 1) * per_rank] for b in _global_batches()]
            if uneven and rank == 0:
                shards = shards[:-1]
            try:
                calibrate(model, shards)
            except RuntimeError as err:
                torch.save({"error": str(err)}, os.path.join(out_dir, f"{method}-{ptf}-{rank}.pt"))
                continue
            torch.save(
                {"state": model.state_dict(), "checksum": calibration_checksum(model)},
                os.path.join(out_dir, f"{method}-{ptf}-{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path, uneven: bool = False) -> None:
    mp.start_processes(
        _worker,
        args=(world, _free_port(), str(tmp_path), uneven),
        nprocs=world,
        start_method="spawn",
    )


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process_on_the_concatenated_batches(world, tmp_path):
    _run(world, tmp_path)
    for method, ptf, lis in CASES:
        torch.manual_seed(0)
        single = calibrate(TinyBlock(QuantConfig(method, ptf=ptf, lis=lis)), _global_batches())
        expected = single.state_dict()
        for rank in range(world):
            got = torch.load(tmp_path / f"{method}-{ptf}-{rank}.pt", weights_only=True)
            assert got["checksum"] == calibration_checksum(single), (method, rank)
            for key, value in expected.items():
                assert torch.equal(got["state"][key], value), (method, rank, key)


def test_different_batch_counts_fail_loudly(tmp_path):
    _run(2, tmp_path, uneven=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"minmax-True-{rank}.pt", weights_only=True)
        assert "different numbers of calibration batches" in got["error"]
