"""Calibration under torch.distributed (gloo, CPU): W ranks give exactly the single-process parameters.

Two kinds of network, calibrated in the same spawned processes (one spawn per world size): the
small ``TinyBlock`` of the calibration tests, and the real (reduced) DeiT and Swin, whose position
embedding and relative-position bias tables are the same tensor on every rank (replicated inputs).
"""

import contextlib
import functools
import os
import socket
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_calibrate import TinyBlock  # noqa: E402  (tests/quant is on sys.path under pytest's rootdir mode)

from fqvit_pl.quant import (
    QuantAct,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate,
    calibration_checksum,
)

CASES = [(method, True, True) for method in ("minmax", "ema", "percentile", "omse")] + [
    ("omse", False, False)
]
GLOBAL_BATCH = 6  # divisible by 2 and 3
#: Reduced real networks: every kind of point of the full ones, few and small.
NETWORKS = {
    "deit_tiny": dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "swin_tiny": dict(
        img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,)
    ),
}
NETWORK_CASES = [
    (name, method) for name in NETWORKS for method in ("minmax", "ema", "percentile", "omse")
]


def _global_batches() -> list:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(GLOBAL_BATCH, 5, 8, generator=gen) for _ in range(3)]
    batches[1][:, :, 2] *= 30  # an outlier channel for the PTF search
    return batches


def _global_images() -> list:
    # One batch: the merges across batches are TinyBlock's part; each collective costs wall time.
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)]


def _network(name: str, method: str) -> torch.nn.Module:
    from fqvit_pl.models import create_model  # here: only the processes that need timm import it

    torch.manual_seed(0)
    model = create_model(name, method=method, num_classes=10, model_kwargs=NETWORKS[name])
    with torch.no_grad():  # position embedding / bias tables with a wide spread, as trained ones
        for key, param in model.named_parameters():
            if key == "pos_embed" or key.endswith("relative_position_bias_table"):
                param.normal_(0.0, 0.5)
    return model


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """Linear layers and convolutions one sample at a time: CPU GEMMs may round differently for
    different batch sizes, and the ranks see smaller batches than one process does."""

    def linear(self, x):
        weight = self.weight_quant(self.weight)
        return torch.cat([F.linear(x[i : i + 1], weight, self.bias) for i in range(len(x))])

    def conv(self, x):
        weight = self.weight_quant(self.weight)
        return torch.cat(
            [self._conv_forward(x[i : i + 1], weight, self.bias) for i in range(len(x))]
        )

    saved = QuantLinear.forward, QuantConv2d.forward
    QuantLinear.forward, QuantConv2d.forward = linear, conv
    try:
        yield
    finally:
        QuantLinear.forward, QuantConv2d.forward = saved


@functools.cache
def _single_process_network(name: str, method: str) -> dict:
    with batch_invariant():
        return calibrate(_network(name, method), _global_images()).state_dict()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, uneven: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
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
        if uneven:
            # A point wrongly declared replicated: each rank keeps its own range, and the ranks'
            # checksums tell.
            point = QuantAct(4, QuantConfig("minmax").point("activation"), replicated_input=True)
            try:
                calibrate(point, [torch.full((2, 4), float(rank + 1))])
            except RuntimeError as err:
                torch.save({"error": str(err)}, os.path.join(out_dir, f"replicated-{rank}.pt"))
            return
        with batch_invariant():
            for name, method in NETWORK_CASES:
                model = _network(name, method)
                calibrate(
                    model, [b[rank * per_rank : (rank + 1) * per_rank] for b in _global_images()]
                )
                torch.save(model.state_dict(), os.path.join(out_dir, f"{name}-{method}-{rank}.pt"))
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
    # The real networks, all four methods with ptf and lis: the replicated points (pos_quant,
    # bias_table_quant) included, every buffer equals the single-process calibration.
    for name, method in NETWORK_CASES:
        expected = _single_process_network(name, method)
        for rank in range(world):
            got = torch.load(tmp_path / f"{name}-{method}-{rank}.pt", weights_only=True)
            differing = [key for key, value in expected.items() if not torch.equal(got[key], value)]
            assert not differing, (name, method, rank, differing[:5])


def test_different_batch_counts_fail_loudly(tmp_path):
    _run(2, tmp_path, uneven=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"minmax-True-{rank}.pt", weights_only=True)
        assert "different numbers of calibration batches" in got["error"]
        got = torch.load(tmp_path / f"replicated-{rank}.pt", weights_only=True)
        assert "checksums differ" in got["error"] and "replicated_input=True" in got["error"]
