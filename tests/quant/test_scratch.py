"""Scratch tensors of the eager integer kernels: reused inside a scope, released when it closes."""

import threading

import torch

from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, get_bit_type, scratch_scope, with_scratch_scope
from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import scratch as scratch_module
from fqvit_pl.quant.scratch import scratch_like


def pool() -> dict:
    return getattr(scratch_module._STATE, "pool", {})


def test_outside_a_scope_every_request_is_a_fresh_tensor():
    like = torch.zeros(3, 5)
    a, b = scratch_like(0, like), scratch_like(0, like)
    assert a.shape == (3, 5) and a.data_ptr() != b.data_ptr()
    assert not pool()


def test_inside_a_scope_a_slot_reuses_its_memory_until_the_outermost_scope_closes():
    with scratch_scope():
        big = scratch_like(0, torch.zeros(4, 6))
        with scratch_scope():  # nested: same pool
            small = scratch_like(0, torch.zeros(2, 3))
            other = scratch_like(1, torch.zeros(2, 3))
            as_int = scratch_like(
                0, torch.zeros(2, 3), dtype=torch.int32
            )  # the same bytes, another dtype
        assert small.data_ptr() == big.data_ptr() == as_int.data_ptr()
        assert small.shape == (2, 3) and small.is_contiguous() and as_int.dtype == torch.int32
        assert other.data_ptr() != big.data_ptr()
        grown = scratch_like(0, torch.zeros(10, 10, dtype=torch.float64))
        assert grown.shape == (10, 10) and grown.dtype == torch.float64
        assert pool()  # still alive: the outer scope is open
    assert not pool()


def test_inference_tensors_get_their_own_buffer():
    with scratch_scope():
        normal = scratch_like(0, torch.zeros(8))
        with torch.inference_mode():
            inference = scratch_like(0, torch.zeros(8))
            inference.fill_(1.0)
        normal.fill_(2.0)  # writable outside inference mode: not the inference buffer
        assert inference.is_inference() and not normal.is_inference()


def test_only_cpu_tensors_are_pooled():
    with scratch_scope():
        meta = scratch_like(0, torch.empty(4, device="meta"))
        assert meta.device.type == "meta"
        assert not pool()


def test_each_thread_has_its_own_pool():
    seen = {}

    def worker(name):
        with scratch_scope():
            seen[name] = scratch_like(0, torch.zeros(16)).data_ptr()
            barrier.wait()  # both scopes open at once

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] != seen["b"]


def test_integer_kernels_use_the_pool_inside_a_scope():
    scale = torch.tensor(0.05)
    scores = torch.round(torch.randn(2, 3, 17, 17) * 40) * scale
    x = torch.randn(2, 17, 96)
    with torch.no_grad(), scratch_scope():
        Fq.log_int_softmax(scores, scale, get_bit_type("uint4"))
        assert {key[0] for key in pool()} == {0, 1}
        Fq.int_layernorm(
            x, torch.full((96,), 0.1), torch.tensor(0.05), torch.ones(96), torch.zeros(96)
        )
        assert {key[0] for key in pool()} == {0, 1, 2, 3}


def test_quantized_model_forward_runs_in_a_scope_and_keeps_nothing():
    torch.manual_seed(0)
    model = create_model(
        "deit_tiny",
        method="minmax",
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    calibrate(model, [images])
    used = []
    model.blocks[0].attn.softmax.register_forward_hook(
        lambda *_: used.append({key[0] for key in pool()})
    )
    with torch.no_grad():
        pooled = model(images)
        assert used == [{0, 1, 2, 3}]  # pooled during the forward (LayerNorm and Log-Int-Softmax)
        assert not pool()  # and released after it
        unpooled = type(model).forward.__wrapped__(
            model, images
        )  # the same forward without a scope
    assert torch.equal(pooled, unpooled)


def test_decorated_function_passes_arguments_and_result_through():
    @with_scratch_scope
    def f(a, *, b):
        """Docstring kept."""
        assert getattr(scratch_module._STATE, "depth", 0) == 1
        return a + b

    assert f(1, b=2) == 3 and f.__doc__ == "Docstring kept."
