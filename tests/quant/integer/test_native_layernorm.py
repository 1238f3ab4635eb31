"""The fused integer LayerNorm and residual kernels (``csrc/ln.cpp``) give the pure kernels' bits:
on random and worst-case codes, every PTF step, tiled and per-tensor scales, extreme gammas and
betas, constant tokens, and in the whole DeiT and Swin integer models, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from test_integer_kernels import layernorm_reference
from test_integer_models import ARCHS, _calibrated, _images

from fqvit_pl.quant import compile_integer, get_bit_type, to_integer
from fqvit_pl.quant.integer import kernels, native_ln
from fqvit_pl.quant.integer.native import native_ops
from fqvit_pl.quant.kernels.tables import floor_log2_thresholds

pytestmark = pytest.mark.skipif(
    native_ops() is None, reason="the fused kernels are not built (FQVIT_NATIVE=0 or no compiler)"
)
UINT8 = get_bit_type("uint8")


def _layernorm_case(seed, tokens, channels, max_alpha, *, tile=1, per_tensor=False):
    """Random LN-input codes and parameters: PTF steps ``2**0 .. 2**max_alpha`` per channel."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (tokens, channels), generator=g, dtype=torch.uint8)
    point_channels = channels // tile
    alphas = torch.randint(0, max_alpha + 1, (point_channels,), generator=g)
    alphas[0] = max_alpha  # the largest step occurs
    in_scale = torch.tensor(0.02) if per_tensor else 0.013 * 2.0 ** alphas.float()
    zp = torch.full((point_channels,), float(torch.randint(0, 256, (), generator=g)))
    gamma = torch.randn(channels, generator=g) * 0.5 + 1
    beta = torch.randn(channels, generator=g) * 0.3
    return codes, zp, in_scale, gamma, beta


def _both(codes, zp, in_scale, gamma, beta, s_out=0.021, zp_out=118.0, bits=7):
    args = (codes, zp, in_scale, gamma, beta, torch.tensor(s_out), torch.tensor(zp_out), UINT8)
    pure = kernels.int_layernorm_codes(*args, bits=bits)
    fused = native_ln.int_layernorm_codes_native(*args, bits=bits)
    return pure, fused


@pytest.mark.parametrize("max_alpha", [0, 1, 2, 3])  # PTF steps up to 1, 2, 4, 8
@pytest.mark.parametrize("channels", [48, 192, 1536])
@pytest.mark.parametrize("float_codes", [False, True])
def test_fused_layernorm_equals_the_pure_kernel(max_alpha, channels, float_codes):
    codes, zp, in_scale, gamma, beta = _layernorm_case(
        channels + max_alpha, 64, channels, max_alpha
    )
    if float_codes:  # the residual's integer-valued float32 codes
        codes = codes.to(torch.float32)
    pure, fused = _both(codes, zp, in_scale, gamma, beta)
    assert fused.dtype == torch.uint8 and fused.shape == codes.shape
    assert torch.equal(fused, pure)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_layernorm_equals_python_integers(seed):
    """Independent: int64 NumPy statistics and Python-int step 5 (test_integer_kernels)."""
    codes, zp, in_scale, gamma, beta = _layernorm_case(seed, 40, 96, 3)
    alphas = torch.round(torch.log2(in_scale / in_scale.min())).to(torch.int64)
    _, fused = _both(codes, zp, in_scale, gamma, beta)
    expected = layernorm_reference(
        codes.numpy(), int(zp[0]), alphas.numpy(), float(in_scale.min()), gamma.numpy(),
        beta.numpy(), 0.021, 118,
    )  # fmt: skip
    assert fused.to(torch.int64).numpy().tolist() == expected.tolist()


def test_fused_layernorm_tiles_patch_merging_scales_and_takes_a_per_tensor_point():
    codes, zp, in_scale, gamma, beta = _layernorm_case(5, 50, 4 * 24, 3, tile=4)
    pure, fused = _both(codes, zp, in_scale, gamma, beta)
    assert torch.equal(fused, pure)
    codes, zp, in_scale, gamma, beta = _layernorm_case(6, 50, 96, 0, per_tensor=True)
    pure, fused = _both(codes, zp[:1], in_scale, gamma, beta)
    assert torch.equal(fused, pure)


@pytest.mark.parametrize("bits", [3, 7, 12])
def test_fused_layernorm_extreme_gammas_betas_and_constant_tokens(bits):
    codes, zp, in_scale, gamma, beta = _layernorm_case(7, 48, 64, 3)
    # gammas from 0 and subnormal to huge, both signs; betas up to 1e30 (B overflows float32)
    gamma[:16] = torch.tensor([0.0, 1e-40, -1e-30, 1e-7, -1e-3, 1e3, -1e6, 1e20, -1e30, 3e38,
                               0.5, -0.5, 1.0, -1.0, 2.0, -2.0])  # fmt: skip
    beta[:12] = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e6, -1e6, 0.0, -0.0, 1e-30, 5.0,
                              -5.0, 1e10])  # fmt: skip
    codes[0] = 17  # with one step for all channels: std = 0, A infinite (NaN where gamma = 0)
    codes[1] = int(zp[0])  # x_q = 0: mean / std = 0 / 0, NaN values (code 0 both ways)
    codes[2, ::2], codes[2, 1::2] = 0, 255  # the widest token
    codes[3, :] = 255
    codes[3, 0] = 254  # almost constant: the float32 variance may round to <= 0
    for scale in (in_scale, torch.tensor(0.02)):  # PTF steps, and one step (constant x_q)
        pure, fused = _both(codes, zp, scale, gamma, beta, bits=bits)
        assert torch.equal(fused, pure)


def test_fused_layernorm_uses_threads_and_strided_codes():
    codes, zp, in_scale, gamma, beta = _layernorm_case(8, 2 * 197, 192, 3)
    strided = codes.reshape(2, 197, 192)[:, :1]  # the class tokens, as the final norm sees them
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for x in (codes, strided):
            pure, fused = _both(x, zp, in_scale, gamma, beta)
            assert torch.equal(fused, pure)
    finally:
        torch.set_num_threads(threads)


def _steps_3_to_5_aten(x_q, inv_std, mean_std, weight, bias, s_out, zp_out, bits=7):
    """§7 steps 3-5 as the pure eager kernel writes them (ATen's log2), from per-token factors."""
    a = inv_std * weight / s_out
    p = torch.exp2(torch.clamp(bits - torch.floor(torch.log2(torch.abs(a))), 0, 31))
    m = torch.clamp(torch.trunc(a * p), -(2 ** (bits + 1) - 1), 2 ** (bits + 1) - 1)
    b = torch.round((bias - mean_std * weight) / s_out * p)
    v = torch.round((m.double() * x_q.double() + b.double()) / p.double()) + zp_out
    return torch.clamp(v, 0, 255).to(torch.uint8)


def test_fused_multiplier_near_powers_of_two_where_aten_log2_rounds_up():
    """|A| at the floats just below and at each power of two (where ``floor(log2)`` is decided by
    ATen's rounding): the fused kernel's exponent-bit rule gives the same multiplier and shift."""
    thresholds = floor_log2_thresholds(torch.device("cpu"))
    exponents = torch.arange(-40, 40, dtype=torch.float32)
    power = torch.exp2(exponents)
    below = torch.nextafter(power, torch.zeros(()))
    candidates = torch.cat([power, below, torch.nextafter(below, torch.zeros(())), thresholds])
    candidates = candidates[torch.isfinite(candidates) & (candidates > 0)]
    weight = torch.cat([candidates, -candidates])  # A = 1 * weight / 1
    channels = weight.numel()
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 256, (4, channels), generator=g, dtype=torch.uint8)
    bias = torch.randn(channels, generator=g)
    inv_std = torch.ones(4, 1)
    mean_std = torch.tensor([[0.0], [0.5], [-2.0], [1e-3]])
    zp, step = torch.tensor(100.0), torch.ones(channels)
    s_out, zp_out = torch.tensor(1.0), torch.tensor(128.0)
    fused = torch.ops.fqvit_native.ln_apply(
        codes, zp, step, inv_std, mean_std, weight, bias, s_out, zp_out, thresholds, 7, 0, 255
    )
    x_q = codes.to(torch.float32) - zp
    assert torch.equal(fused, _steps_3_to_5_aten(x_q, inv_std, mean_std, weight, bias, s_out, 128))


def test_fused_layernorm_refuses_codes_it_cannot_sum_exactly():
    codes = torch.full((2, 8), 3.5)  # not integers
    with pytest.raises(RuntimeError, match="must be an integer"):
        torch.ops.fqvit_native.ln_stats(codes, torch.tensor(0.0), torch.ones(8))
    assert not native_ln.layernorm_native(codes, 32.0)  # PTF steps above 16: the pure kernel
    assert native_ln.layernorm_native(codes, 8.0)


# -- the residual -------------------------------------------------------------------------------


@pytest.mark.parametrize("x_float", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_residual_equals_dequantize_add_quantize(x_float, per_channel):
    g = torch.Generator().manual_seed(int(x_float) + 2 * int(per_channel))
    shape, channels = (3, 50, 96), 96
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x = x.to(torch.float32) if x_float else x
    branch = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x_scale = 0.01 * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()
    x_zp = torch.full((channels,), 90.0)
    b_scale, b_zp = torch.tensor(0.037), torch.tensor(131.0)
    if per_channel:  # the output point per channel (PTF), narrow enough that the clamps bite
        out_scale = 0.004 * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()
    else:
        out_scale = torch.tensor(0.009)
    out_zp = torch.full((channels,), 120.0) if per_channel else torch.tensor(120.0)
    pure = kernels.quantize_float(
        kernels.dequantize(x, x_scale, x_zp).add_(kernels.dequantize(branch, b_scale, b_zp)),
        out_scale, out_zp, UINT8,
    )  # fmt: skip
    fused = native_ln.residual_codes_native(
        x, x_scale, x_zp, branch, b_scale, b_zp, out_scale, out_zp, UINT8
    )
    assert fused.dtype == torch.float32
    assert torch.equal(fused, pure)
    assert pure.min() == 0 and pure.max() == 255  # the clamps were exercised


# -- whole models ---------------------------------------------------------------------------------


def _count_native_calls(monkeypatch) -> dict[str, int]:
    calls = {"layernorm": 0, "residual": 0}
    for key, name in (
        ("layernorm", "int_layernorm_codes_native"),
        ("residual", "residual_codes_native"),
    ):
        original = getattr(native_ln, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(native_ln, name, counted)
    return calls


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["deit_tiny", "swin_tiny"])
@torch.no_grad()
def test_integer_models_give_the_same_logits_with_and_without_the_fused_kernels(name, monkeypatch):
    """Swin's config has patch merging (tiled scales) and the per-tensor patch norm."""
    integer = to_integer(_calibrated(name, "minmax", True))
    images = _images(4, ARCHS[name]["img_size"], 11)
    with monkeypatch.context() as patch:
        calls = _count_native_calls(patch)
        fused = integer(images)
    assert calls["layernorm"] > 0 and calls["residual"] > 0
    with monkeypatch.context() as patch:
        patch.setattr(native_ln, "_loaded", lambda: False)  # as FQVIT_NATIVE=0
        calls = _count_native_calls(patch)
        pure = integer(images)
    assert calls == {"layernorm": 0, "residual": 0}
    assert torch.equal(fused, pure)
    torch._dynamo.reset()
    compiled = compile_integer(integer)  # the fused kernels as extern calls in the graph
    assert torch.equal(compiled(images), fused)
