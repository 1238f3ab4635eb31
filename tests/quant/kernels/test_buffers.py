"""The one buffer pool of fqvit_pl.quant.kernels: named temporaries reused from call to call."""

import threading

import torch

from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, get_bit_type, kernels
from fqvit_pl.quant.kernels import buffers
from fqvit_pl.quant.kernels.buffers import release_buffers, reused_tensor


def pool() -> dict:
    return getattr(buffers._THREAD_STATE, "pool", {})


def test_a_name_reuses_its_memory_and_grows_when_needed():
    release_buffers()
    big = reused_tensor("test.a", (4, 6), torch.float32, torch.device("cpu"))
    small = reused_tensor("test.a", (2, 3), torch.float32, torch.device("cpu"))
    other = reused_tensor("test.b", (2, 3), torch.float32, torch.device("cpu"))
    assert small.data_ptr() == big.data_ptr() != other.data_ptr()
    assert small.shape == (2, 3) and small.is_contiguous()
    grown = reused_tensor("test.a", (10, 10), torch.float32, torch.device("cpu"))
    assert grown.shape == (10, 10)
    as_int = reused_tensor("test.a", (2, 3), torch.int32, torch.device("cpu"))
    assert as_int.dtype == torch.int32 and as_int.data_ptr() != grown.data_ptr()
    release_buffers()
    assert not pool()


def test_minimum_size_and_initialization_on_allocation():
    release_buffers()
    calls = []

    def ramp(t):
        calls.append(t.numel())
        torch.arange(t.numel(), out=t)

    first = reused_tensor("test.ramp", (5,), torch.int64, "cpu", min_numel=64, initialize=ramp)
    again = reused_tensor("test.ramp", (64,), torch.int64, "cpu", min_numel=64, initialize=ramp)
    assert (
        calls == [64]
        and torch.equal(again, torch.arange(64))
        and first.data_ptr() == again.data_ptr()
    )
    reused_tensor("test.ramp", (100,), torch.int64, "cpu", initialize=ramp)
    assert calls == [64, 100]
    release_buffers()


def test_inference_tensors_get_their_own_buffer():
    normal = reused_tensor("test.mode", (8,), torch.float32, "cpu")
    with torch.inference_mode():
        inference = reused_tensor("test.mode", (8,), torch.float32, "cpu")
        inference.fill_(1.0)
    normal.fill_(2.0)  # writable outside inference mode: not the inference buffer
    assert inference.is_inference() and not normal.is_inference()
    release_buffers()


def test_each_thread_has_its_own_pool():
    seen = {}

    def worker(name):
        seen[name] = reused_tensor("test.thread", (16,), torch.float32, "cpu").data_ptr()
        barrier.wait()  # both alive at once

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] != seen["b"]


def test_integer_kernels_pool_their_temporaries_on_cpu_only():
    release_buffers()
    scale = torch.tensor(0.05)
    scores = torch.round(torch.randn(2, 3, 17, 17) * 40) * scale
    x = torch.randn(2, 17, 96)
    with torch.no_grad():
        kernels.log_int_softmax(scores, scale, get_bit_type("uint4"))
        assert {key[0] for key in pool()} == {"softmax.shifted", "int_exp.q"}
        kernels.int_layernorm(
            x, torch.full((96,), 0.1), torch.tensor(0.05), torch.ones(96), torch.zeros(96)
        )
        assert {key[0] for key in pool()} >= {"layernorm.x_q", "layernorm.work"}
        release_buffers()
        kernels.log_int_softmax(scores.to("meta"), scale.to("meta"), get_bit_type("uint4"))
    assert not pool()


def test_a_model_forward_returns_fresh_tensors():
    torch.manual_seed(0)
    model = create_model(
        "deit_tiny",
        method="minmax",
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    calibrate(model, [images])
    with torch.no_grad():
        first = model(images)
        kept = first.clone()
        second = model(images)
    assert torch.equal(first, kept)  # not overwritten by the second forward's temporaries
    assert torch.equal(first, second)
    assert pool()  # the temporaries stay for the next forward
    release_buffers()
