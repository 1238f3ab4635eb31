"""The native attention matmuls (``csrc/attnmm.cpp``) give the float32 ``bmm`` path's bits: on random
and worst-case codes against that path and against integer arithmetic, and in whole integer DeiT and
Swin models, eager and compiled."""

from __future__ import annotations

import math

import pytest
import torch
from test_integer_compiled import TINY, _integer
from torch import nn

from fqvit_pl.quant import compile_integer
from fqvit_pl.quant.integer import kernels
from fqvit_pl.quant.integer.layers import IntegerAttention

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not kernels.native_attention_matmul(16),
        reason="the native attention matmuls are not built (FQVIT_NATIVE=0, no compiler) "
        "or this CPU lacks AVX-512 VNNI/BF16",
    ),
]

# (batch, tokens, heads, head_dim): DeiT's 197 tokens, Swin's 7x7 windows, odd and tiny sizes, the
# largest head the kernels take
SHAPES = [(2, 197, 3, 64), (3, 49, 2, 32), (2, 17, 1, 128), (1, 5, 2, 16), (1, 3, 1, 256)]
ZERO_POINTS = [0, 37, 128, 255]


def _codes(shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    batch, tokens, heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, tokens, 3 * heads * head_dim), generator=generator).to(
        torch.uint8
    )


def _split(qkv: torch.Tensor, heads: int, zero_point: int) -> list[torch.Tensor]:
    """q, k, v minus the zero point as int64 ``[B, heads, N, hd]`` (the independent reference)."""
    batch, tokens, width = qkv.shape
    x = qkv.to(torch.int64) - zero_point
    return list(x.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4))


def _lis_like(batch: int, heads: int, tokens: int, seed: int) -> torch.Tensor:
    """Probabilities 0 or ``2**-r`` (``r <= 15``) whose rows sum to at most 1.5 (Log-Int-Softmax's
    bound); row 0 is the worst case ``1 + 2**-2 + ... + 2**-15`` (every bit of 24 in use)."""
    generator = torch.Generator().manual_seed(seed)
    low = min(15, math.ceil(math.log2(tokens)) + 1)  # tokens * 2**-low <= 0.5
    r = torch.randint(low, 17, (batch, heads, tokens, tokens), generator=generator)
    probs = torch.where(r == 16, 0.0, torch.pow(2.0, -r.to(torch.float32)))
    worst = torch.zeros(tokens)
    worst[0] = 1.0
    count = min(tokens, 15)
    worst[1:count] = torch.pow(2.0, -torch.arange(2, count + 1, dtype=torch.float32))
    probs[:, :, 0] = worst
    return probs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_point", ZERO_POINTS)
def test_scores_equal_the_float32_path_and_integer_arithmetic(shape, zero_point):
    qkv = _codes(shape, seed=zero_point)
    heads = shape[2]
    native = kernels.attention_scores(qkv, heads, zero_point, native=True)
    reference = kernels.attention_scores(qkv, heads, zero_point, native=False)
    q, k, _ = _split(qkv, heads, zero_point)
    assert native.dtype == torch.float32 and native.shape == reference.shape
    assert torch.equal(native, reference)
    assert torch.equal(native.to(torch.int64), q @ k.transpose(-2, -1))


@pytest.mark.parametrize("code,zero_point", [(255, 0), (0, 255), (255, 128)])
def test_scores_worst_case_codes(code, zero_point):
    """Every product at ``+-255**2`` (or the extreme of the zero point) over the longest row the
    kernels take (head_dim 256): ``256 * 255**2 < 2**24`` must come out exact."""
    qkv = torch.full((2, 19, 3 * 256), code, dtype=torch.uint8)
    native = kernels.attention_scores(qkv, 1, zero_point, native=True)
    expected = 256 * (code - zero_point) ** 2
    assert torch.equal(native, torch.full_like(native, float(expected)))
    assert torch.equal(native, kernels.attention_scores(qkv, 1, zero_point, native=False))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_point", ZERO_POINTS)
def test_context_of_log_int_softmax_probabilities_equals_the_float32_path(shape, zero_point):
    batch, tokens, heads, head_dim = shape
    qkv = _codes(shape, seed=zero_point + 1)
    probs = _lis_like(batch, heads, tokens, seed=zero_point)
    native = kernels.attention_context(probs, qkv, heads, zero_point, native=True)
    reference = kernels.attention_context(probs, qkv, heads, zero_point, native=False)
    assert native.shape == (batch, tokens, heads * head_dim)
    assert torch.equal(native, reference)
    as_bf16 = probs.to(torch.bfloat16)  # exact: 0 and powers of two
    assert torch.equal(
        kernels.attention_context(as_bf16, qkv, heads, zero_point, native=True), native
    )
    assert torch.equal(kernels.attention_context(as_bf16, qkv, heads, zero_point), native)
    # independently: 2**15 * p is an integer, the float64 sums of integers are exact
    _, _, v = _split(qkv, heads, zero_point)
    exact = (probs.to(torch.float64) * 2**15) @ v.to(torch.float64) / 2**15
    assert torch.equal(native, exact.transpose(1, 2).reshape(native.shape).to(torch.float32))


@pytest.mark.parametrize("sign", [1, -1])
def test_context_worst_case_long_rows(sign):
    """The longest rows: 258 tokens, every probability ``+-255`` (a uint8 softmax point minus its
    zero point) and every ``v - zp = 255``: the sum ``258 * 255**2`` is just below ``2**24``; and
    the Log-Int-Softmax worst row (sum 1.5 - 2**-15) times 255."""
    tokens = 258
    qkv = torch.full((1, tokens, 3 * 32), 255, dtype=torch.uint8)
    probs = torch.full((1, 1, tokens, tokens), sign * 255.0)
    native = kernels.attention_context(probs, qkv, 1, 0, native=True)
    assert torch.equal(native, torch.full_like(native, sign * 258.0 * 255**2))
    assert torch.equal(native, kernels.attention_context(probs, qkv, 1, 0, native=False))
    lis = _lis_like(1, 1, tokens, seed=3)
    native = kernels.attention_context(lis, qkv, 1, 0, native=True)
    assert float(native[0, 0, 0]) == 255 * (1.5 - 2**-15)
    assert torch.equal(native, kernels.attention_context(lis, qkv, 1, 0, native=False))


def test_context_refuses_probabilities_that_are_not_bfloat16():
    qkv = torch.zeros(1, 5, 48, dtype=torch.uint8)
    probs = torch.full((1, 1, 5, 5), 0.1)
    with pytest.raises(RuntimeError, match="not exactly a bfloat16"):
        kernels.attention_context(probs, qkv, 1, 0, native=True)


@pytest.mark.parametrize(
    "qkv,heads,zero_point,message",
    [
        (torch.zeros(1, 5, 48), 1, 0, "expected uint8 qkv codes"),
        (torch.zeros(1, 5, 48, dtype=torch.uint8), 2, 0, "must be a multiple of 16"),
        (torch.zeros(1, 5, 50, dtype=torch.uint8), 1, 0, "is not 3 \\* heads \\* head_dim"),
        (torch.zeros(1, 5, 48, dtype=torch.uint8), 1, 256, "is not a uint8 code"),
    ],
)
def test_bad_input_is_a_named_error(qkv, heads, zero_point, message):
    with pytest.raises(RuntimeError, match=message):
        kernels.attention_scores(qkv, heads, zero_point, native=True)
    assert not kernels.native_attention_matmul(24)  # the model keeps the float32 path there


def _set_native(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, IntegerAttention):
            module.native_matmul = on


def _attention_layers(model: nn.Module) -> list[IntegerAttention]:
    return [m for m in model.modules() if isinstance(m, IntegerAttention)]


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_integer_model_with_native_matmuls_equals_without(name):
    integer = _integer(name)
    assert all(layer.native_matmul for layer in _attention_layers(integer))  # set by refresh
    images = torch.randn(4, 3, TINY[name]["img_size"], TINY[name]["img_size"])
    with_native = integer(images)
    _set_native(integer, False)
    assert torch.equal(with_native, integer(images))


@torch.no_grad()
def test_compiled_swin_with_native_matmuls_equals_eager_without():
    """Shifted windows (the mask) and the relative position bias; one compile (~30 s)."""
    torch._dynamo.reset()
    integer = _integer("swin_tiny")
    images = torch.randn(4, 3, TINY["swin_tiny"]["img_size"], TINY["swin_tiny"]["img_size"])
    compiled = compile_integer(integer)
    got = compiled(images)
    _set_native(integer, False)
    assert torch.equal(got, integer(images))
