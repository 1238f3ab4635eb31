"""The fast (in-place, table, exp2) paths of fqvit_pl.quant equal the straightforward formulas bit for bit.

Every ``ref_*`` function below is a plain out-of-place transcription of the contract formula (the
implementation before the speed work), kept here as the reference. Results are compared on their
bits (``view(int)``), NaN positions compared separately. No timing is asserted anywhere.
"""

import contextlib
import copy

import pytest
import torch

from fqvit_pl.models import create_model
from fqvit_pl.quant import (
    QuantConfig,
    QuantLinear,
    calibrate,
    disable_quantization,
    enable_quantization,
    get_bit_type,
    scratch_scope,
)
from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import scratch as scratch_module

UINT8, INT8, UINT4 = get_bit_type("uint8"), get_bit_type("int8"), get_bit_type("uint4")


# ------------------------------------------------------------------------------------------------
# reference transcriptions


def ref_fake_quantize(x, scale, zero_point, bit_type):
    q = torch.clamp(torch.round(x / scale + zero_point), bit_type.lower, bit_type.upper)
    return (q - zero_point) * scale


def ref_int_exp(x, scale, n=30):
    a = 0.35815147
    b = 0.96963238 / a
    c = 1.0 / a
    x0 = torch.floor(-0.6931 / scale)
    x = torch.maximum(x, n * x0)
    q = torch.floor(x / x0)
    r = x - x0 * q
    z = r * (r + torch.floor(b / scale)) + torch.floor(c / scale**2)
    return torch.clamp(torch.floor(z * torch.pow(2.0, n - q)), min=0)


def ref_log_rounding(y, bit_type):
    f = torch.floor(torch.log2(y))
    r = torch.where(y - torch.pow(2.0, f) >= torch.pow(2.0, f - 1), f + 1, f)
    levels = 2**bit_type.bits
    out = torch.pow(2.0, -torch.clamp(r, 0, levels - 1))
    return torch.where(r >= levels, torch.zeros_like(out), out)


def ref_log_int_softmax(x, scale, bit_type):
    x = x / scale
    x = x - x.amax(dim=-1, keepdim=True)
    e = ref_int_exp(x, scale)
    y = torch.round(e.sum(dim=-1, keepdim=True) / e)
    return ref_log_rounding(y, bit_type)


def ref_int_layernorm(x, in_scale, out_scale, weight, bias, bits=7):
    channels = x.shape[-1]
    in_scale = in_scale.reshape(-1)
    if in_scale.numel() not in (1, channels):
        in_scale = in_scale.repeat(channels // in_scale.numel())
    x_q = torch.round(x / in_scale)
    s_min = in_scale.min()
    x_q = x_q * torch.round(in_scale / s_min)
    mean = x_q.mean(dim=-1, keepdim=True) * s_min
    std = (s_min / channels) * torch.sqrt(
        channels * x_q.pow(2).sum(dim=-1, keepdim=True) - x_q.sum(dim=-1, keepdim=True) ** 2
    )
    a = (s_min / std) * weight / out_scale
    sign = torch.sign(a)
    n = torch.clamp(bits - torch.floor(torch.log2(a.abs())), 0, 31)
    m = torch.clamp(torch.floor(a.abs() * torch.pow(2.0, n)), 0, 2 ** (bits + 1) - 1)
    b = torch.round((bias - (mean / std) * weight) / out_scale * torch.pow(2.0, n))
    y_q = torch.round((sign * m * x_q + b) / torch.pow(2.0, n))
    return y_q * out_scale


def ref_omse_candidate_errors(x, min_val, max_val, bit_type, num_candidates=90, chunk=8):
    factors = torch.tensor([1.0 - 0.01 * i for i in range(num_candidates)], dtype=x.dtype)
    mins, maxs = min_val * factors, max_val * factors
    scales, zero_points = Fq.asymmetric_qparams(mins, maxs, bit_type)
    flat = x.reshape(1, -1)
    errors = []
    for start in range(0, num_candidates, chunk):
        s, z = scales[start : start + chunk, None], zero_points[start : start + chunk, None]
        diff = ref_fake_quantize(flat, s, z, bit_type) - flat
        errors.append(diff.double().pow(2).sum(dim=1))
    return torch.cat(errors), mins, maxs


def ref_ptf_channel_errors(x_channels, scales, zero_point, bit_type):
    x = x_channels.unsqueeze(0)
    diff = ref_fake_quantize(x, scales.reshape(-1, 1, 1), zero_point, bit_type) - x
    return diff.double().pow(2).sum(dim=2).t()


# ------------------------------------------------------------------------------------------------
# helpers


def assert_bits_equal(got, expected):
    """Same shape and dtype, NaN at the same places, identical bits everywhere else."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64}[got.dtype]
    assert torch.equal(
        got[~nan].contiguous().view(int_type), expected[~nan].contiguous().view(int_type)
    )


MODES = ["no_grad", "inference_mode", "no_grad, scratch", "inference_mode, scratch"]


def run(mode, fn):
    """``fn()`` without autograd; in a ``scratch`` mode inside a scratch scope, after which every
    pooled buffer is overwritten with NaN bits: a result sharing pooled memory would change."""
    ctx = torch.inference_mode() if mode.startswith("inference_mode") else torch.no_grad()
    pooled = mode.endswith("scratch")
    with ctx, scratch_scope() if pooled else contextlib.nullcontext():
        result = fn()
        if pooled:
            for buffer in getattr(scratch_module._STATE, "pool", {}).values():
                buffer.view(torch.uint8).fill_(0xFF)
        return result


def gen(seed):
    return torch.Generator().manual_seed(seed)


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
    ((1, 5000), (8, 1), UINT8),  # omse-style candidate broadcast
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
    got = run(mode, lambda: Fq.fake_quantize(x, scale, zero_point, bit_type))
    assert_bits_equal(got, ref_fake_quantize(x, scale, zero_point, bit_type))
    assert torch.equal(x, before)  # the input is never written


@pytest.mark.parametrize("mode", MODES)
def test_fake_quantize_non_contiguous_and_tiny_scale(mode):
    g = gen(2)
    x = torch.randn(6, 50, 40, generator=g).transpose(0, 2)
    for scale in (torch.tensor(Fq.EPS), torch.tensor(1e-4), torch.tensor(3.0)):
        zp = torch.tensor(17.0)
        got = run(mode, lambda: Fq.fake_quantize(x, scale, zp, UINT8))
        assert_bits_equal(got, ref_fake_quantize(x, scale, zp, UINT8))


def test_fake_quantize_keeps_autograd_when_needed():
    x = torch.randn(10, 4, requires_grad=True)
    out = Fq.fake_quantize(x * 2, torch.tensor(0.1), torch.tensor(3.0), UINT8)
    assert out.requires_grad
    out.sum().backward()  # the out-of-place chain builds a graph (round has a zero gradient)
    assert x.grad is not None
    with torch.no_grad():
        assert_bits_equal(
            out.detach(), Fq.fake_quantize(x * 2, torch.tensor(0.1), torch.tensor(3.0), UINT8)
        )


def test_fake_quantize_other_dtypes_use_the_plain_chain():
    x = torch.randn(100, dtype=torch.float64)
    scale, zp = torch.tensor(0.01), torch.tensor(3.0)  # float32 scale with float64 data
    with torch.no_grad():
        assert torch.equal(
            Fq.fake_quantize(x, scale, zp, UINT8), ref_fake_quantize(x, scale, zp, UINT8)
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
    assert_bits_equal(run(mode, lambda: Fq.int_exp(x, s)), ref_int_exp(x, s))


def scores(shape, scale, seed):
    """Fake-quantized attention scores on the grid of ``scale`` (as the score point outputs them)."""
    g = gen(seed)
    raw = torch.randn(shape, generator=g) * 4
    s, zp = torch.tensor(scale), torch.tensor(128.0)
    return ref_fake_quantize(raw, s, zp, UINT8), s


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bit_type", [UINT4, UINT8, get_bit_type("uint6")])
@pytest.mark.parametrize("scale", [2.5e-3, 0.0173, 0.11, 4.0])
def test_log_int_softmax_is_bit_exact(mode, bit_type, scale):
    x, s = scores((2, 3, 37, 37), scale, seed=4)
    got = run(mode, lambda: Fq.log_int_softmax(x, s, bit_type))
    assert_bits_equal(got, ref_log_int_softmax(x, s, bit_type))


@pytest.mark.parametrize("mode", MODES)
def test_log_int_softmax_zero_exponentials_and_empty_rows(mode):
    # With a large scale the I-BERT polynomial can vanish: a row of zeros (S = 0: y = 0/0 = nan), or a
    # single zero exponential next to fractional scores (e == 0: y = inf, output 0).
    x = torch.tensor([[0.0, -4.0, -8.0, -400.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, -1.0, -6.0]])
    for s in (torch.tensor(4.0), torch.tensor(0.05)):
        for bits in (UINT4, UINT8):
            got = run(mode, lambda: Fq.log_int_softmax(x, s, bits))
            expected = ref_log_int_softmax(x, s, bits)
            assert_bits_equal(got, expected)
    assert torch.isnan(
        ref_log_int_softmax(x, torch.tensor(4.0), UINT4)
    ).any()  # the S == 0 case is exercised
    assert ref_log_int_softmax(x, torch.tensor(4.0), UINT8)[2].tolist() == [
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
        run(mode, lambda: Fq.log_int_softmax(masked, s, UINT4)),
        ref_log_int_softmax(masked, s, UINT4),
    )
    permuted = x.permute(1, 0, 2, 3)
    assert not permuted.is_contiguous()
    assert_bits_equal(
        run(mode, lambda: Fq.log_int_softmax(permuted, s, UINT4)),
        ref_log_int_softmax(permuted, s, UINT4),
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
    got = Fq._lis_table(bit_type.bits, y.device)[codes.long()]
    assert_bits_equal(got, ref_log_rounding(y, bit_type))
    # the same values laid out for the vectorized path of log2/pow in the reference
    assert_bits_equal(got.repeat(3), ref_log_rounding(y.repeat(3), bit_type))


# ------------------------------------------------------------------------------------------------
# integer LayerNorm


def ln_inputs(shape, channels_in, seed, per_tensor=False):
    g = gen(seed)
    if per_tensor:
        s_in = torch.tensor(0.03)
    else:
        s_in = 0.004 * 2.0 ** torch.randint(0, 4, (channels_in,), generator=g).float()
    x = torch.randn(shape, generator=g) * 2
    scale = s_in if per_tensor else s_in.repeat(shape[-1] // channels_in)
    x = ref_fake_quantize(x, scale, torch.tensor(80.0), UINT8)
    gamma = torch.randn(shape[-1], generator=g)
    gamma[:3] = torch.tensor([0.0, -1.0, 1e-30])  # a zero, a negative and an underflowing weight
    beta = torch.randn(shape[-1], generator=g) * 0.1
    return x, s_in, gamma, beta


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape, channels_in, per_tensor",
    [((4, 197, 192), 192, False), ((2, 49, 384), 96, False), ((3, 10, 96), 96, True)],
)
def test_int_layernorm_is_bit_exact(mode, shape, channels_in, per_tensor):
    x, s_in, gamma, beta = ln_inputs(shape, channels_in, seed=6, per_tensor=per_tensor)
    s_out = torch.tensor(0.021)
    got = run(mode, lambda: Fq.int_layernorm(x, s_in, s_out, gamma, beta))
    assert_bits_equal(got, ref_int_layernorm(x, s_in, s_out, gamma, beta))


@pytest.mark.parametrize("mode", MODES)
def test_int_layernorm_constant_token_and_large_values(mode):
    x, s_in, gamma, beta = ln_inputs((2, 6, 64), 64, seed=7)
    x[0, 0] = 0.0  # constant token: std = 0 (no epsilon, as published)
    x[0, 1] = s_in * 120  # the same integer on every channel in units of each channel's scale
    x[1, 2] = x[1, 2] * 1000  # far beyond the grid
    s_out = torch.tensor(0.5)
    got = run(mode, lambda: Fq.int_layernorm(x, s_in, s_out, gamma, beta))
    expected = ref_int_layernorm(x, s_in, s_out, gamma, beta)
    assert torch.isnan(expected).any() or torch.isinf(expected).any()
    assert_bits_equal(got, expected)


# ------------------------------------------------------------------------------------------------
# calibration searches


@pytest.mark.parametrize(
    "n, chunk, candidates", [(5000, 8, 90), (40_000, 8, 90), (333, 3, 10), (1000, 8, 5)]
)
def test_omse_candidate_errors_are_bit_exact(n, chunk, candidates):
    g = gen(8)
    x = torch.randn(n, 7, generator=g).t()  # a transposed [C, n] view, as channel_layout returns
    x[0, :3] = torch.tensor([40.0, -12.0, 0.0])
    mn, mx = x.min(), x.max()
    with torch.no_grad():
        errors, mins, maxs = Fq.omse_candidate_errors(x, mn, mx, UINT8, candidates, chunk)
    ref = ref_omse_candidate_errors(x, mn, mx, UINT8, candidates, chunk)
    assert_bits_equal(errors, ref[0])
    assert torch.equal(mins, ref[1]) and torch.equal(maxs, ref[2])


def test_ptf_channel_errors_are_bit_exact():
    g = gen(9)
    tokens = torch.randn(4, 50, 96, generator=g) * torch.linspace(0.1, 8, 96)
    channels = Fq.channel_layout(tokens)
    scales, zp = Fq.ptf_scales(channels.amin(1), channels.amax(1), UINT8)
    for mode in MODES:
        got = run(mode, lambda: Fq.ptf_channel_errors(channels, scales, zp, UINT8))
        assert_bits_equal(got, ref_ptf_channel_errors(channels, scales, zp, UINT8))


# ------------------------------------------------------------------------------------------------
# the cached quantized weight


def calibrated_linear():
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, config=QuantConfig().point("weight"))
    return calibrate(layer, [torch.randn(4, 16)])


def quantized_weight(layer):
    return ref_fake_quantize(
        layer.weight.detach(),
        layer.weight_quant.scale.reshape(-1, 1),
        layer.weight_quant.quantizer.zero_point.reshape(-1, 1),
        INT8,
    )


def test_weight_cache_is_reused_and_equal():
    layer = calibrated_linear()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer.weight_quant(layer.weight)
        assert layer.weight_quant(layer.weight) is first  # reused
        assert_bits_equal(first, quantized_weight(layer))
        out = layer(x)
    with torch.inference_mode():
        assert layer.weight_quant(layer.weight) is first
    expected = torch.nn.functional.linear(x, quantized_weight(layer), layer.bias)
    assert torch.equal(out, expected.detach())


@pytest.mark.parametrize("change", ["in_place", "data", "load_state_dict", "qparams", "optimizer"])
def test_weight_cache_refreshes_when_the_weight_or_its_scale_changes(change):
    layer = calibrated_linear()
    with torch.no_grad():
        stale = layer.weight_quant(layer.weight).clone()
    if change == "in_place":
        with torch.no_grad():
            layer.weight.mul_(3.0)
    elif change == "data":
        layer.weight.data = torch.randn_like(layer.weight)
    elif change == "load_state_dict":
        state = layer.state_dict()
        state["weight"] = torch.randn_like(layer.weight)
        layer.load_state_dict(state)
    elif change == "qparams":
        with torch.no_grad():
            layer.weight_quant.quantizer.scale.mul_(2.0)
    elif change == "optimizer":
        opt = torch.optim.SGD(layer.parameters(), lr=10.0)
        layer(torch.randn(4, 16)).pow(2).sum().backward()  # grad mode: the cache is not used
        layer.bias.grad = None
        layer.weight.grad = torch.ones_like(layer.weight)
        opt.step()
    with torch.no_grad():
        fresh = layer.weight_quant(layer.weight)
    assert_bits_equal(fresh, quantized_weight(layer))
    assert not torch.equal(fresh, stale)


def test_weight_cache_unused_when_quantization_is_off_or_grad_is_needed():
    layer = calibrated_linear()
    disable_quantization(layer)
    with torch.no_grad():
        assert layer.weight_quant(layer.weight) is layer.weight  # float: the weight itself
    assert layer.weight_quant._weight_cache is None
    enable_quantization(layer)
    out = layer.weight_quant(layer.weight)  # grad mode on: a fresh tensor in the autograd graph
    assert out.requires_grad and layer.weight_quant._weight_cache is None
    assert_bits_equal(out.detach(), quantized_weight(layer))


def test_weight_cache_is_not_state():
    layer = calibrated_linear()
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.weight_quant._weight_cache is not None
    assert not any("cache" in key for key in layer.state_dict())
    clone = copy.deepcopy(layer)
    assert clone.weight_quant._weight_cache is None
    with torch.no_grad():
        assert torch.equal(clone(torch.ones(1, 16)), layer(torch.ones(1, 16)))
    layer.weight_quant.clear_weight_cache()
    assert layer.weight_quant._weight_cache is None


# ------------------------------------------------------------------------------------------------
# whole models: the fast paths (no grad / inference) equal the plain ones (grad enabled)


TINY = {
    "deit_tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    "swin_tiny": dict(
        img_size=56, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=7
    ),
}


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize(
    "method, ptf, lis", [("minmax", True, True), ("omse", True, True), ("percentile", False, False)]
)
def test_calibrated_model_outputs_equal_with_and_without_grad(name, method, ptf, lis):
    torch.manual_seed(0)
    model = create_model(
        name, method=method, ptf=ptf, lis=lis, num_classes=10, model_kwargs=TINY[name]
    )
    size = TINY[name]["img_size"]
    calibrate(model, [torch.randn(2, 3, size, size) for _ in range(2)])
    x = torch.randn(2, 3, size, size)
    with_grad = model(x)  # weights require grad: every formula takes its plain out-of-place path
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = model(x)
        again = model(x)  # cached weights
    with torch.inference_mode():
        inference = model(x)
    for out in (no_grad, again, inference):
        assert_bits_equal(out, with_grad.detach())


@pytest.mark.parametrize("name", list(TINY))
def test_quantized_forward_traces_as_one_graph(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, model_kwargs=TINY[name])
    size = TINY[name]["img_size"]
    calibrate(model, [torch.randn(2, 3, size, size)])
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, size, size))
    assert explanation.graph_break_count == 0, explanation.break_reasons


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
        upper, lower = Fq.extreme_values(values, k, k + 1)
        assert torch.equal(upper.sort().values, torch.topk(values, k).values.sort().values)
        assert torch.equal(
            lower.sort().values, torch.topk(values, k + 1, largest=False).values.sort().values
        )
    with_nan = torch.randn(n, generator=g)
    with_nan[n // 2] = float("nan")
    upper, _ = Fq.extreme_values(with_nan, k, k)
    assert torch.isnan(upper).any()  # a NaN is reported, as torch.topk does
