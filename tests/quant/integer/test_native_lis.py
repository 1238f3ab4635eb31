"""The fused Log-Int-Softmax kernel (``torch.ops.fqvit_native.lis_softmax``, csrc/lis.cpp): bit for
bit the pure PyTorch path it replaces (score quantization, Swin's bias point and mask,
``kernels.log_int_softmax_codes``), on random and worst-case accumulators, against independent
references (Python integers, the simulation), and inside DeiT and Swin integer models, eager and
compiled (docs/method.md §8, §12)."""

from __future__ import annotations

import pytest
import torch
from test_integer_compiled import TINY, _integer
from test_integer_kernels import lis_reference
from test_integer_models import _images
from torch import Tensor, nn

from fqvit_pl.quant import compile_integer, get_bit_type
from fqvit_pl.quant.functional import log_int_softmax
from fqvit_pl.quant.integer import IntegerAttention, kernels, native

UINT8, UINT4 = get_bit_type("uint8"), get_bit_type("uint4")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not native.native_available(), reason="the fused kernels are not built"),
]


def _t(x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _pure(acc, step, scale, zp, table, exact, bias=None, bias_scale=None, bias_zp=None, mask=None):
    """The integer attention's PyTorch path: ``scores`` then ``context``'s Log-Int-Softmax."""
    scores = kernels.quantize_float(acc * step, scale, zp, UINT8)
    if bias is not None:
        value = kernels.dequantize(scores, scale, zp).add_(bias)
        scores = kernels.quantize_float(value, bias_scale, bias_zp, UINT8)
    batch, heads, n, _ = acc.shape
    if mask is not None:
        scores = scores.view(-1, mask.shape[0], heads, n, n)
        mask = (mask != 0)[None, :, None]
    probs = kernels.log_int_softmax_codes(
        scores, table, kernels.lis_prob_table(4), mask, exact_float64=exact
    )
    return probs.view(batch, heads, n, n)


def _native(acc, step, scale, zp, table, exact, bias=None, bias_scale=None, bias_zp=None, mask=None, dtype=None):  # fmt: skip
    return native.native_ops().lis_softmax(
        acc, step, scale, zp, 0, 255, bias, bias_scale, bias_zp, 0, 255, mask, table, 4, exact,
        dtype,
    )  # fmt: skip


def _accumulators(shape, spread: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-spread, spread + 1, shape, generator=g).to(torch.float32)


def _swin_mask(windows: int, n: int, seed: int) -> Tensor:
    """0 / -100 like Swin's shift mask: never on the diagonal, so no row is all masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.where(torch.rand(windows, n, n, generator=g) < 0.4, -100.0, 0.0)
    mask[:, torch.arange(n), torch.arange(n)] = 0.0
    return mask


# score scale, number of tokens: typical, small (huge exponentials) and large (saturating) scales
CASES = [(0.157, 197), (0.05, 49), (0.0123, 64), (0.6, 13), (1.3, 7), (0.157, 1)]


@pytest.mark.parametrize("exact", [True, False], ids=["float64", "int64"])
@pytest.mark.parametrize("score_scale,n", CASES)
def test_native_equals_pytorch_on_random_accumulators(score_scale, n, exact):
    acc = _accumulators((3, 2, n, n), 20000, seed=n)
    step, scale, zp = _t(1.3e-3), _t(score_scale), _t(128.0)
    for table in (kernels.lis_exp_table_2d(scale, zp), kernels.lis_exp_table(scale)):
        expected = _pure(acc, step, scale, zp, table, exact)
        assert torch.equal(_native(acc, step, scale, zp, table, exact), expected)


@pytest.mark.parametrize("exact", [True, False], ids=["float64", "int64"])
@pytest.mark.parametrize("score_scale,n", [(0.157, 49), (0.0371, 16), (0.6, 9)])
def test_native_equals_pytorch_with_swin_bias_and_mask(score_scale, n, exact):
    windows = 4
    acc = _accumulators((2 * windows, 3, n, n), 20000, seed=n)
    step, scale, zp = _t(1.3e-3), _t(0.2), _t(120.0)
    bias = torch.randn(3, n, n, generator=torch.Generator().manual_seed(1)) * 3
    bias_scale, bias_zp = _t(score_scale), _t(131.0)
    mask = _swin_mask(windows, n, seed=2)
    for table in (kernels.lis_exp_table_2d(bias_scale, bias_zp), kernels.lis_exp_table(bias_scale)):
        args = (acc, step, scale, zp, table, exact, bias, bias_scale, bias_zp)
        assert torch.equal(_native(*args, mask=mask), _pure(*args, mask=mask))
        assert torch.equal(_native(*args), _pure(*args))  # unshifted windows: bias only


def test_native_worst_cases():
    """Rows of equal scores, rows clamped at both ends of the grid, one-token rows, and the
    accumulator's largest values (``head_dim * 255**2``)."""
    n = 37
    acc = _accumulators((2, 2, n, n), 300, seed=3)
    acc[0, 0] = 1234.0  # every score of every row equal
    acc[0, 1, :5] = 4e6  # saturates above the grid
    acc[1, 0, :5] = -4e6  # saturates below the grid
    acc[1, 1, 3] = torch.where(torch.arange(n) % 2 == 0, 258 * 255**2, -(258 * 255**2)).float()
    step, zp = _t(1.0), _t(100.0)
    for score_scale in (0.0023, 0.1, 1.0, 1.6):
        scale = _t(score_scale)
        table = kernels.lis_exp_table_2d(scale, zp)
        for exact in (True, False):
            assert torch.equal(
                _native(acc, step, scale, zp, table, exact),
                _pure(acc, step, scale, zp, table, exact),
            )
    one = _accumulators((1, 1, 1, 1), 5, seed=4)
    table = kernels.lis_exp_table_2d(_t(0.1), zp)
    assert torch.equal(_native(one, step, _t(0.1), zp, table, True), torch.ones(1, 1, 1, 1))


def _near_boundaries(scale: float, zp: float, step: float, count: int, seed: int) -> Tensor:
    """``count`` accumulators whose scores lie within 3 ulps of a half-integer ``k + 1/2`` of the
    grid (where one float operation more or less, or another order, moves a code), shuffled."""
    k = torch.arange(-2, 258, dtype=torch.float64)
    x = ((k + 0.5 - zp) * scale / step).to(torch.float32)
    near = [x]
    for direction in (float("inf"), float("-inf")):
        y = x
        for _ in range(3):
            y = torch.nextafter(y, torch.full_like(y, direction))
            near.append(y)
    values = torch.cat(near)
    g = torch.Generator().manual_seed(seed)
    repeats = -(-count // values.numel())
    order = torch.cat([torch.randperm(values.numel(), generator=g) for _ in range(repeats)])
    return values[order[:count]]


@pytest.mark.parametrize("step", [1.0, 1.3e-3, 0.7])
def test_native_rounds_at_code_boundaries_as_pytorch(step):
    """Scores near the rounding boundaries of the score point and, with Swin's bias, of the bias
    point: the same codes as ATen's operations in their order."""
    n, scale, zp = 35, _t(0.0371), _t(128.0)
    acc = _near_boundaries(0.0371, 128.0, step, 2 * n * n, seed=0).reshape(2, 1, n, n)
    table = kernels.lis_exp_table_2d(scale, zp)
    args = (acc, _t(step), scale, zp, table, True)
    assert torch.equal(_native(*args), _pure(*args))
    # a bias that puts (c - zp) * s + bias of the first matrix near the bias point's boundaries
    bias_scale, bias_zp = _t(0.0517), _t(131.0)
    value = kernels.dequantize(kernels.quantize_float(acc[0] * step, scale, zp, UINT8), scale, zp)
    target = _near_boundaries(0.0517, 131.0, 1.0, n * n, seed=1).reshape(1, n, n)
    bias = (target.double() - value.double()).float()
    table = kernels.lis_exp_table_2d(bias_scale, bias_zp)
    args = (acc, _t(step), scale, zp, table, True, bias, bias_scale, bias_zp)
    assert torch.equal(_native(*args), _pure(*args))


def test_native_zero_exponentials_give_probability_zero():
    """``e == 0`` makes ``y`` infinite: probability 0, as the PyTorch path. (A row whose every
    exponential is 0, score scales above 1.67, gives ``0 / 0``: the PyTorch path's table lookup
    then fails with an index error; the kernel gives probability 0 there.)"""
    n = 29
    acc = _accumulators((2, 2, n, n), 30000, seed=5)
    step, scale, zp = _t(1e-3), _t(0.157), _t(128.0)
    table = kernels.lis_exp_table_2d(scale, zp)
    table[torch.arange(0, 65536, 3)] = 0.0  # a third of the (row max, code) pairs: e == 0
    table[256 * torch.arange(256) + torch.arange(256)] = 1e6  # never a whole row of zeros
    for exact in (True, False):
        expected = _pure(acc, step, scale, zp, table, exact)
        assert (expected == 0).float().mean() > 0.2
        assert torch.equal(_native(acc, step, scale, zp, table, exact), expected)
    zero = torch.zeros(65537, dtype=torch.float64)
    assert torch.equal(_native(acc, step, scale, zp, zero, True), torch.zeros_like(acc))


@pytest.mark.parametrize("scale", [0.0625, 0.0371, 0.11])
def test_native_equals_python_integers(scale):
    """With unit steps the accumulator is the code; the exact [257] table against §8 in Python ints."""
    codes = _accumulators((1, 4, 24, 24), 127, seed=6).add_(128)
    unit = _t(1.0)
    probs = _native(codes, unit, unit, _t(0.0), kernels.lis_exp_table(_t(scale)), True)
    for row, got in zip(codes.reshape(-1, 24).tolist(), probs.reshape(-1, 24).tolist()):
        expected = [
            0.0 if r == 16 else 2.0**-r for r in lis_reference([int(c) for c in row], scale)
        ]
        assert got == expected


@pytest.mark.parametrize("scale", [0.0625, 0.0371, 0.11, 0.0213])
def test_native_equals_the_simulation_on_the_same_codes(scale):
    """The [65537] table: the simulation's Log-Int-Softmax of the fake-quantized scores."""
    codes = _accumulators((2, 3, 50, 50), 127, seed=7).add_(128)
    s, zp, unit = _t(scale), _t(131.0), _t(1.0)
    probs = _native(codes, unit, unit, _t(0.0), kernels.lis_exp_table_2d(s, zp), True)
    assert torch.equal(probs, log_int_softmax((codes - zp) * s, s, UINT4))


def test_native_bfloat16_output_is_the_same_probabilities():
    acc = _accumulators((2, 3, 33, 33), 20000, seed=8)
    step, scale, zp = _t(1.3e-3), _t(0.157), _t(128.0)
    table = kernels.lis_exp_table_2d(scale, zp)
    fp32 = _native(acc, step, scale, zp, table, True)
    bf16 = _native(acc, step, scale, zp, table, True, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), fp32)


def test_native_threads_give_the_same_bits():
    acc = _accumulators((4, 3, 61, 61), 20000, seed=9)
    step, scale, zp = _t(1.3e-3), _t(0.157), _t(128.0)
    table = kernels.lis_exp_table_2d(scale, zp)
    one = _native(acc, step, scale, zp, table, True)
    torch.set_num_threads(2)  # the fixture restores the count
    assert torch.equal(_native(acc, step, scale, zp, table, True), one)


def test_native_bad_input_is_a_named_error():
    table = kernels.lis_exp_table_2d(_t(0.1), _t(0.0))
    with pytest.raises(RuntimeError, match=r"lis_softmax: acc must be \[batch, heads, N, N\]"):
        _native(torch.zeros(3, 4), _t(1.0), _t(1.0), _t(0.0), table, True)
    with pytest.raises(RuntimeError, match="exp_table"):
        _native(torch.zeros(1, 1, 2, 2), _t(1.0), _t(1.0), _t(0.0), table[:10], True)


# -- in the integer models ------------------------------------------------------------------------


def _set_native(model: nn.Module, on: bool) -> list[IntegerAttention]:
    attentions = [m for m in model.modules() if isinstance(m, IntegerAttention) and m.lis]
    for attention in attentions:
        attention.native_lis = on
    return attentions


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_integer_model_native_equals_pytorch_eager_and_compiled(name):
    integer = _integer(name)
    assert all(a.native_lis for a in _set_native(integer, True)), "refresh_tables turns it on"
    images = _images(4, TINY[name]["img_size"], 5)
    native_logits = integer(images)
    _set_native(integer, False)
    expected = integer(images)
    assert torch.equal(native_logits, expected)
    for attention in _set_native(integer, False):  # the int64 path, both ways
        attention.exact_float64 = False
    int64_logits = integer(images)
    _set_native(integer, True)
    assert torch.equal(integer(images), int64_logits)
    for attention in _set_native(integer, True):
        attention.exact_float64 = True
    torch._dynamo.reset()
    compiled = compile_integer(integer)  # the default backend, as the eager runs above
    with torch.profiler.profile() as profile:
        compiled_logits = compiled(images)
    assert any("lis_softmax" in event.name for event in profile.events()), "fused in the graph"
    assert torch.equal(compiled_logits, expected)
