"""The eager fast paths (fqvit_pl.quant.kernels.inplace and the dispatcher) equal the plain
formulas of fqvit_pl.quant.functional bit for bit.

Results are compared on their bits (``view(int)``), NaN positions separately. Each test runs the
dispatcher (fast kernels on, no autograd) against the plain formula on the same inputs; the plain
formulas themselves are checked against independent NumPy transcriptions in
tests/quant/test_functional.py. No timing is asserted anywhere.
"""

import pytest
import torch
from kernel_inputs import MODES, assert_bits_equal, gen, ln_inputs, run, scores

from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import get_bit_type, kernels
from fqvit_pl.quant.kernels import inplace, tables

UINT8, INT8, UINT4 = get_bit_type("uint8"), get_bit_type("int8"), get_bit_type("uint4")


# ------------------------------------------------------------------------------------------------
# exp2 == pow(2, .) on every integer the formulas use


@pytest.mark.parametrize("length", [1, 7, 601, 601 * 37])  # scalar loop and vectorized body + tail
def test_exp2_equals_pow2_on_integers(length):
    k = torch.arange(-300, 301, dtype=torch.float32).repeat(length // 601 + 1)[: max(length, 601)]
    k = torch.cat([k, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    assert_bits_equal(torch.exp2(k), torch.pow(2.0, k))


# ------------------------------------------------------------------------------------------------
# fake quantization


FQ_CASES = [
    # x shape, scale shape, bit type, weight layout
    ((4, 197, 192), (), UINT8),
    ((3, 5, 7), (7,), UINT8),  # per channel on the last dim
    ((2, 3, 9, 9), (1, 3, 1, 1), UINT8),  # NCHW per channel
    ((64, 48), (64, 1), INT8),  # weight per output channel
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_shape, s_shape, bit_type", FQ_CASES)
def test_fake_quantize_fast_path_is_bit_exact(mode, x_shape, s_shape, bit_type):
    g = gen(1)
    x = torch.randn(x_shape, generator=g) * 3
    scale = torch.rand(s_shape, generator=g) * 0.05 + 1e-3
    zero_point = (
        torch.zeros(s_shape)
        if bit_type.signed
        else torch.randint(0, 256, s_shape, generator=g).float()
    )
    # exact ties x/s + zp = k + 0.5 (round half to even) and values far outside the grid
    x.view(-1)[:50] = ((torch.arange(50.0) - 25 + 0.5) * scale.reshape(-1)[0]).float()
    x.view(-1)[50:60] = 1e4
    before = x.clone()
    got = run(mode, lambda: kernels.fake_quantize(x, scale, zero_point, bit_type))
    assert_bits_equal(got, Fq.fake_quantize(x, scale, zero_point, bit_type))
    assert torch.equal(x, before)  # the input is never written


@pytest.mark.parametrize("mode", MODES)
def test_fake_quantize_non_contiguous_and_tiny_scale(mode):
    g = gen(2)
    x = torch.randn(6, 50, 40, generator=g).transpose(0, 2)
    for scale in (torch.tensor(Fq.EPS), torch.tensor(1e-4), torch.tensor(3.0)):
        zp = torch.tensor(17.0)
        got = run(mode, lambda: kernels.fake_quantize(x, scale, zp, UINT8))
        assert_bits_equal(got, Fq.fake_quantize(x, scale, zp, UINT8))


def test_fake_quantize_keeps_autograd_when_needed():
    x = torch.randn(10, 4, requires_grad=True)
    out = kernels.fake_quantize(x * 2, torch.tensor(0.1), torch.tensor(3.0), UINT8)
    assert out.requires_grad
    out.sum().backward()  # the out-of-place chain builds a graph (round has a zero gradient)
    assert x.grad is not None
    with torch.no_grad():
        assert_bits_equal(
            out.detach(), kernels.fake_quantize(x * 2, torch.tensor(0.1), torch.tensor(3.0), UINT8)
        )


def test_fake_quantize_broadcast_beyond_the_input_uses_the_plain_chain():
    x, scale, zp = torch.randn(1, 500), torch.rand(8, 1) * 0.05 + 1e-3, torch.full((8, 1), 7.0)
    with torch.no_grad():
        assert_bits_equal(
            kernels.fake_quantize(x, scale, zp, UINT8), Fq.fake_quantize(x, scale, zp, UINT8)
        )


def test_fake_quantize_other_dtypes_use_the_plain_chain():
    x = torch.randn(100, dtype=torch.float64)
    scale, zp = torch.tensor(0.01), torch.tensor(3.0)  # float32 scale with float64 data
    with torch.no_grad():
        assert torch.equal(
            kernels.fake_quantize(x, scale, zp, UINT8), Fq.fake_quantize(x, scale, zp, UINT8)
        )


# ------------------------------------------------------------------------------------------------
# integer exponential and Log-Int-Softmax


SCALES = [1e-4, 2.5e-3, 0.0173, 0.11, 0.9, 4.0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", SCALES)
def test_int_exp_is_bit_exact(mode, scale):
    g = gen(3)
    s = torch.tensor(scale)
    x = -torch.randint(0, int(40 / scale) + 2, (3000,), generator=g).float()
    x[:5] = torch.tensor([0.0, -1.0, -0.5, -1e9, float("-inf")])
    assert_bits_equal(run(mode, lambda: inplace.int_exp(x, s)), Fq.int_exp(x, s))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bit_type", [UINT4, UINT8, get_bit_type("uint6")])
@pytest.mark.parametrize("scale", [2.5e-3, 0.0173, 0.11, 4.0])
def test_log_int_softmax_is_bit_exact(mode, bit_type, scale):
    x, s = scores((2, 3, 37, 37), scale, seed=4)
    got = run(mode, lambda: kernels.log_int_softmax(x, s, bit_type))
    assert_bits_equal(got, Fq.log_int_softmax(x, s, bit_type))


@pytest.mark.parametrize("mode", MODES)
def test_log_int_softmax_zero_exponentials_and_empty_rows(mode):
    # With a large scale the I-BERT polynomial can vanish: a row of zeros (S = 0: y = 0/0 = nan), or a
    # single zero exponential next to fractional scores (e == 0: y = inf, output 0).
    x = torch.tensor([[0.0, -4.0, -8.0, -400.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, -1.0, -6.0]])
    for s in (torch.tensor(4.0), torch.tensor(0.05)):
        for bits in (UINT4, UINT8):
            got = run(mode, lambda: kernels.log_int_softmax(x, s, bits))
            expected = Fq.log_int_softmax(x, s, bits)
            assert_bits_equal(got, expected)
    assert torch.isnan(
        Fq.log_int_softmax(x, torch.tensor(4.0), UINT4)
    ).any()  # the S == 0 case is exercised
    assert Fq.log_int_softmax(x, torch.tensor(4.0), UINT8)[2].tolist() == [
        0.5,
        0.0,
        2.0**-3,
        0.25,
    ]  # e == 0 → 0


@pytest.mark.parametrize("mode", MODES)
def test_log_int_softmax_masked_and_non_contiguous(mode):
    x, s = scores((4, 2, 49, 49), 0.02, seed=5)
    mask = torch.zeros(49, 49)
    mask[:20, 20:] = -100.0  # Swin's shift mask, added after the point (off the grid)
    masked = x + mask
    assert_bits_equal(
        run(mode, lambda: kernels.log_int_softmax(masked, s, UINT4)),
        Fq.log_int_softmax(masked, s, UINT4),
    )
    permuted = x.permute(1, 0, 2, 3)
    assert not permuted.is_contiguous()
    assert_bits_equal(
        run(mode, lambda: kernels.log_int_softmax(permuted, s, UINT4)),
        Fq.log_int_softmax(permuted, s, UINT4),
    )


def log_rounding_inputs():
    """y = 1/probability around every power of two and every 1.5 * power of two, integers, inf, nan."""
    values = [torch.arange(1, 2**16 + 1, dtype=torch.float32)]
    for k in range(0, 128):
        for base in (2.0**k, 1.5 * 2.0**k):
            if base > torch.finfo(torch.float32).max:
                continue
            center = torch.tensor([base], dtype=torch.float32)
            up, down = center.clone(), center.clone()
            for _ in range(6):  # six float32 neighbours on each side
                up = torch.nextafter(up, torch.tensor([float("inf")]))
                down = torch.nextafter(down, torch.tensor([0.0]))
                values += [up, down]
            values.append(center)
    values.append(torch.tensor([float("inf"), float("nan"), torch.finfo(torch.float32).max]))
    y = torch.cat(values)
    return y[(y >= 1) | torch.isnan(y)]


@pytest.mark.parametrize("bit_type", [UINT4, UINT8, get_bit_type("uint3"), get_bit_type("uint7")])
def test_log_rounding_table_equals_floor_log2_rounding(bit_type):
    y = log_rounding_inputs()
    codes = torch.bitwise_right_shift(y.view(torch.int32), 22).bitwise_and_(511)
    got = tables.lis_table(bit_type.bits, y.device)[codes.long()]
    assert_bits_equal(got, Fq.log_rounding(y, bit_type.bits))
    # the same values laid out for the vectorized path of log2/pow in the reference
    assert_bits_equal(got.repeat(3), Fq.log_rounding(y.repeat(3), bit_type.bits))


# ------------------------------------------------------------------------------------------------
# integer LayerNorm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape, channels_in, per_tensor",
    [((4, 197, 192), 192, False), ((2, 49, 384), 96, False), ((3, 10, 96), 96, True)],
)
def test_int_layernorm_is_bit_exact(mode, shape, channels_in, per_tensor):
    x, s_in, gamma, beta = ln_inputs(shape, channels_in, seed=6, per_tensor=per_tensor)
    s_out = torch.tensor(0.021)
    got = run(mode, lambda: kernels.int_layernorm(x, s_in, s_out, gamma, beta))
    assert_bits_equal(got, Fq.int_layernorm(x, s_in, s_out, gamma, beta))


@pytest.mark.parametrize("mode", MODES)
def test_int_layernorm_constant_token_and_large_values(mode):
    x, s_in, gamma, beta = ln_inputs((2, 6, 64), 64, seed=7)
    x[0, 0] = 0.0  # constant token: std = 0 (no epsilon, as published)
    x[0, 1] = s_in * 120  # the same integer on every channel in units of each channel's scale
    x[1, 2] = x[1, 2] * 1000  # far beyond the grid
    s_out = torch.tensor(0.5)
    got = run(mode, lambda: kernels.int_layernorm(x, s_in, s_out, gamma, beta))
    expected = Fq.int_layernorm(x, s_in, s_out, gamma, beta)
    assert torch.isnan(expected).any() or torch.isinf(expected).any()
    assert_bits_equal(got, expected)


# ------------------------------------------------------------------------------------------------
# calibration searches


@pytest.mark.parametrize(
    "n, chunk, candidates", [(5000, 8, 90), (40_000, 8, 90), (333, 3, 10), (1000, 8, 5)]
)
def test_omse_chunk_errors_are_the_full_search_bits(n, chunk, candidates):
    g = gen(8)
    x = torch.randn(n, 7, generator=g).t()  # a transposed [C, n] view, as channel_layout returns
    x[0, :3] = torch.tensor([40.0, -12.0, 0.0])
    mins, maxs = Fq.omse_candidates(x.min(), x.max(), candidates)
    scales, zero_points = Fq.asymmetric_qparams(mins, maxs, UINT8)
    chunks = [list(range(i, min(i + chunk, candidates))) for i in range(0, candidates, chunk)]
    with torch.no_grad():
        errors = inplace.omse_chunk_errors(x.reshape(1, -1), scales, zero_points, UINT8, chunks)
    assert_bits_equal(torch.cat(errors), Fq.omse_candidate_errors(x, mins, maxs, UINT8, chunk))


def test_ptf_channel_errors_are_bit_exact():
    g = gen(9)
    tokens = torch.randn(4, 50, 96, generator=g) * torch.linspace(0.1, 8, 96)
    channels = Fq.channel_layout(tokens)
    scales, zp = Fq.ptf_scales(channels.amin(1), channels.amax(1), UINT8)
    for mode in MODES:
        got = run(mode, lambda: kernels.ptf_channel_errors(channels, scales, zp, UINT8))
        assert_bits_equal(got, Fq.ptf_channel_errors(channels, scales, zp, UINT8))


# ------------------------------------------------------------------------------------------------
# percentile tails


@pytest.mark.parametrize(
    "n, k", [(10, 3), (1000, 1), (100_000, 13), (257_001, 40), (3_000_000, 96)]
)
def test_extreme_values_are_topk_values(n, k):
    g = gen(12)
    ties = torch.randint(-3, 4, (n,), generator=g).float()
    spikes = torch.zeros(n)
    spikes[torch.randint(0, n, (5,), generator=g)] = torch.tensor([9.0, 9.0, -9.0, 7.0, 9.0])
    for values in (
        torch.randn(n, generator=g),
        ties,
        spikes,
        torch.sort(torch.randn(n, generator=g)).values,
    ):
        upper, lower = kernels.extreme_values(values, k, k + 1)
        assert torch.equal(upper.sort().values, torch.topk(values, k).values.sort().values)
        assert torch.equal(
            lower.sort().values, torch.topk(values, k + 1, largest=False).values.sort().values
        )
    with_nan = torch.randn(n, generator=g)
    with_nan[n // 2] = float("nan")
    upper, _ = kernels.extreme_values(with_nan, k, k)
    assert torch.isnan(upper).any()  # a NaN is reported, as torch.topk does
