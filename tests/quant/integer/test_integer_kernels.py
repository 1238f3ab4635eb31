"""The integer kernels against independent integer computations (Python ints, int64 NumPy) and
against the simulation's formulas given the same input codes (docs/method.md §7, §8, §12)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fqvit_pl.quant import get_bit_type
from fqvit_pl.quant.functional import fake_quantize, int_layernorm, log_int_softmax
from fqvit_pl.quant.integer import kernels

UINT8, UINT4, INT8 = get_bit_type("uint8"), get_bit_type("uint4"), get_bit_type("int8")


# -- Log-Int-Softmax -----------------------------------------------------------------------------


def _f32(x: float) -> float:
    return float(np.float32(x))


def lis_reference(codes: list[int], scale: float, bits: int = 4) -> list[int]:
    """§8 in Python integers on ``t = c - max(c)``: the exponents ``r`` (``2**bits`` for probability 0).

    The constants ``x0``, ``floor(b / s)``, ``floor(c / s**2)`` are formed in float32 as the contract's
    float formula forms them; everything after is exact integer arithmetic.
    """
    s = np.float32(scale)
    x0 = int(np.floor(np.float32(-0.6931) / s))
    a = 0.35815147
    b_int = int(np.floor(np.float32(0.96963238 / a) / s))
    c_int = int(np.floor(np.float32(1.0 / a) / (s * s)))
    n = 30
    top = max(codes)
    es = []
    for c in codes:
        x = max(c - top, n * x0)
        q = x // x0  # both negative (or x == 0): floor division is the floor of the quotient
        r = x - x0 * q
        z = r * (r + b_int) + c_int
        es.append(max(z * 2 ** (n - q), 0))
    total = sum(es)
    out = []
    for e in es:
        if e == 0:
            out.append(2**bits)
            continue
        y, rem = divmod(total, e)
        if 2 * rem > e or (2 * rem == e and y % 2 == 1):
            y += 1
        f = y.bit_length() - 1
        r = f + 1 if y - 2**f >= 2 ** (f - 1) and f >= 1 else f
        out.append(r if r < 2**bits else 2**bits)
    return out


@pytest.mark.parametrize("scale", [0.0625, 0.0371, 0.11, 0.0213])
def test_exact_lis_equals_python_integers(scale):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (64, 49), generator=generator, dtype=torch.uint8)
    codes[0] = 200  # a constant row
    codes[1, :] = 0
    codes[1, 7] = 255  # one dominant score: the others vanish
    s = torch.tensor(scale)
    table = kernels.lis_exp_table(s)
    r = kernels.log_int_softmax_codes(codes, table, kernels.lis_exponent_table(4))
    expected = [lis_reference(row, scale) for row in codes.tolist()]
    assert r.tolist() == expected


@pytest.mark.parametrize("scale", [0.0625, 0.0371, 0.11, 0.0213])
def test_lis_equals_the_simulation_on_the_same_codes(scale):
    """The default table reproduces the simulation's float32 ``x / s``: equal output for every score."""
    generator = torch.Generator().manual_seed(1)
    s, zp = torch.tensor(scale), torch.tensor(131.0)
    codes = torch.randint(0, 256, (4, 3, 197, 197), generator=generator, dtype=torch.uint8)
    x = (codes.float() - zp) * s  # the score point's fake-quantized values
    simulated = log_int_softmax(x, s, UINT4)
    integer = kernels.log_int_softmax_codes(
        codes, kernels.lis_exp_table_2d(s, zp), kernels.lis_prob_table(4)
    )
    assert torch.equal(integer, simulated)


def test_lis_mask_saturates_like_the_simulation():
    """Swin's -100 after the bias point: masked pairs take the saturated exponential, as simulated."""
    generator = torch.Generator().manual_seed(2)
    s, zp = torch.tensor(0.09), torch.tensor(120.0)
    codes = torch.randint(0, 256, (6, 2, 16, 16), generator=generator, dtype=torch.uint8)
    mask = torch.rand(6, 1, 16, 16, generator=generator) < 0.4
    mask[..., torch.arange(16), torch.arange(16)] = False  # a token always sees itself
    x = (codes.float() - zp) * s + torch.where(mask, -100.0, 0.0)
    simulated = log_int_softmax(x, s, UINT4)
    integer = kernels.log_int_softmax_codes(
        codes, kernels.lis_exp_table_2d(s, zp), kernels.lis_prob_table(4), mask
    )
    assert torch.equal(integer, simulated)


def test_int64_lis_path_equals_the_float64_path():
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (32, 197), generator=generator, dtype=torch.uint8)
    table = kernels.lis_exp_table(torch.tensor(0.05))
    out = kernels.lis_exponent_table(4)
    assert torch.equal(
        kernels.log_int_softmax_codes(codes, table, out, exact_float64=True),
        kernels.log_int_softmax_codes(codes, table, out, exact_float64=False),
    )


def test_attn_v_in_fp32_is_exact_in_the_worst_case():
    """Rows whose probabilities sum to the most the log rounding allows, times V codes of +-255."""
    tokens = 197
    # y = 1.5 * 2**f - 1 rounds to p = 2**-f: the largest p * (S / e); a row of one large score
    # and many at the rounding edge, plus codes at every exponent 0..15.
    probs = torch.zeros(8, tokens)
    for row in range(2, 8):  # random exponents 0..15, kept while the row sum stays <= 1.5
        exps = torch.randint(0, 16, (tokens,), generator=torch.Generator().manual_seed(row))
        total = 0.0
        for i, k in enumerate(exps.tolist()):
            if total + 2.0**-k <= 1.5:
                probs[row, i] = 2.0**-k
                total += 2.0**-k
        probs[row, -20:] = 2.0**-15  # the smallest grid step at the end of the row
    probs[0, :3] = torch.tensor([1.0, 0.25, 0.25])  # sums to 1.5
    probs[1] = 2.0**-7  # 197 * 2**-7 = 1.54: all multiples of 2**-7, exact as well
    v = torch.full((tokens, 64), 255.0)
    v[:, 1::2] = -255.0
    v[::3, 2] = 254.0
    fp32 = probs @ v
    exact = [
        [
            sum(int(p * 2**15) * int(vv) for p, vv in zip(probs[r].tolist(), v[:, col].tolist()))
            for col in range(64)
        ]
        for r in range(8)
    ]
    assert (fp32 * 2**15).to(torch.int64).tolist() == exact


# -- integer LayerNorm ---------------------------------------------------------------------------


def layernorm_reference(codes, zp, alphas, s_min, gamma, beta, s_out, zp_out, bits=7):
    """§7 with int64 NumPy statistics and Python-int step 5 (float32 for steps 2-4, as the contract)."""
    f32 = np.float32
    x_q = (codes.astype(np.int64) - zp) << alphas.astype(np.int64)  # [T, C]
    channels = x_q.shape[1]
    total = x_q.sum(axis=1)
    squares = (x_q * x_q).sum(axis=1)
    out = np.empty_like(codes, dtype=np.int64)
    for t in range(x_q.shape[0]):
        mean = f32(f32(total[t]) / f32(channels)) * f32(s_min)
        var = f32(f32(channels) * f32(squares[t])) - f32(f32(total[t]) * f32(total[t]))
        std = f32(f32(s_min) / f32(channels)) * np.sqrt(var, dtype=np.float32)
        for c in range(channels):
            a = f32(f32(f32(s_min) / std) * f32(gamma[c])) / f32(s_out)
            sign = int(np.sign(a))
            a = abs(a)
            n = int(min(max(bits - math.floor(math.log2(a)), 0), 31))
            m = int(min(max(math.floor(f32(a * f32(2.0**n))), 0), 2 ** (bits + 1) - 1))
            b = int(
                np.round(
                    f32(f32(f32(beta[c]) - f32(f32(mean / std) * f32(gamma[c]))) / f32(s_out))
                    * f32(2.0**n)
                )
            )
            v = sign * m * int(x_q[t, c]) + b
            q, rem = divmod(v, 2**n)
            if 2 * rem > 2**n or (2 * rem == 2**n and q % 2 == 1):
                q += 1
            out[t, c] = min(max(q + zp_out, 0), 255)
    return out


def _ptf_case(seed: int, tokens: int = 40, channels: int = 48):
    g = torch.Generator().manual_seed(seed)
    alphas = torch.randint(0, 4, (channels,), generator=g)
    s_min = 0.013
    in_scale = s_min * torch.pow(2.0, alphas.float())
    zp = torch.tensor(float(torch.randint(60, 200, (), generator=g)))
    codes = torch.randint(0, 256, (tokens, channels), generator=g, dtype=torch.uint8)
    gamma = torch.randn(channels, generator=g) * 0.5 + 1
    beta = torch.randn(channels, generator=g) * 0.3
    return codes, zp, alphas, in_scale, gamma, beta


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_layernorm_equals_python_integers_and_the_simulation(seed):
    codes, zp, alphas, in_scale, gamma, beta = _ptf_case(seed)
    s_out, zp_out = torch.tensor(0.021), torch.tensor(118.0)
    integer = kernels.int_layernorm_codes(codes, zp, in_scale, gamma, beta, s_out, zp_out, UINT8)
    expected = layernorm_reference(
        codes.numpy(), int(zp), alphas.numpy(), float(in_scale.min()), gamma.numpy(),
        beta.numpy(), float(s_out), int(zp_out),
    )  # fmt: skip
    assert integer.to(torch.int64).numpy().tolist() == expected.tolist()
    # the simulation: its LN-input point's values, §7 in float32, then the next point
    x = (codes.float() - zp) * in_scale
    y = int_layernorm(x, in_scale, s_out, gamma, beta)
    simulated = torch.clamp(torch.round(y / s_out + zp_out), 0, 255)
    assert torch.equal(integer.float(), simulated)


def test_integer_layernorm_tiles_patch_merging_scales():
    codes, zp, _, in_scale, gamma, beta = _ptf_case(3, channels=4 * 12)
    in_scale = in_scale[:12]
    s_out, zp_out = torch.tensor(0.03), torch.tensor(100.0)
    integer = kernels.int_layernorm_codes(codes, zp, in_scale, gamma, beta, s_out, zp_out, UINT8)
    x = (codes.float() - zp) * in_scale.repeat(4)
    simulated = torch.clamp(
        torch.round(int_layernorm(x, in_scale, s_out, gamma, beta) / s_out + zp_out), 0, 255
    )
    assert torch.equal(integer.float(), simulated)


# -- int8 GEMM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["int_mm", "onednn"])
def test_int8_linear_accumulates_exactly(backend):
    if backend == "onednn" and not kernels.onednn_available():
        pytest.skip("oneDNN quantized linear not available")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (37, 96), generator=g, dtype=torch.uint8)
    weight = torch.randint(-128, 128, (24, 96), generator=g, dtype=torch.int8)
    w_scale = torch.rand(24, generator=g) * 0.01 + 1e-3
    bias = torch.randn(24, generator=g)
    zp, s = 117, 0.04
    acc = (codes.numpy().astype(np.int64) - zp) @ weight.numpy().astype(np.int64).T
    expected = torch.from_numpy(acc).double() * (s * w_scale.double()) + bias.double()
    packed = kernels.prepack_weight(weight) if backend == "onednn" else None
    out = kernels.int8_linear(codes, s, zp, weight, w_scale, bias, packed=packed)
    # exact integer accumulation: only the final float32 scaling rounds
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    if backend == "int_mm":
        assert torch.equal(
            ((out - bias) / (s * w_scale)).round().to(torch.int64), torch.from_numpy(acc)
        )


def test_quantize_gives_the_simulation_codes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    s, zp = torch.tensor(0.031), torch.tensor(97.0)
    codes = kernels.quantize(x, s, zp, UINT8)
    assert torch.equal(kernels.dequantize(codes, s, zp), fake_quantize(x, s, zp, UINT8))
