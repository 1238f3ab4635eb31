"""The pure formulas of the contract, each checked against an independent transcription."""

import math

import numpy as np
import pytest
import torch

from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import get_bit_type, kernels

UINT8, INT8, UINT4 = get_bit_type("uint8"), get_bit_type("int8"), get_bit_type("uint4")
EPS = float(np.finfo(np.float32).eps)


def test_channel_layout_of_weights_and_activations():
    w = torch.arange(24.0).reshape(4, 3, 2)
    assert torch.equal(Fq.channel_layout(w, weight=True), w.reshape(4, 6))
    tokens = torch.arange(24.0).reshape(2, 3, 4)  # [B, N, C]
    laid = Fq.channel_layout(tokens)
    assert laid.shape == (4, 6)
    assert torch.equal(laid[1], tokens[..., 1].reshape(-1))
    image = torch.arange(48.0).reshape(2, 3, 2, 4)  # NCHW: channel is dim 1
    laid = Fq.channel_layout(image)
    assert laid.shape == (3, 16)
    assert torch.equal(laid[2].sort().values, image[:, 2].reshape(-1).sort().values)
    with pytest.raises(ValueError, match="rank 5"):
        Fq.channel_layout(torch.zeros(1, 1, 1, 1, 1))


def test_asymmetric_range_by_hand():
    scale, zp = Fq.asymmetric_qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8)
    assert scale.item() == pytest.approx(4 / 255)
    assert zp.item() == 64  # round(255 / 4) = round(63.75)
    x_hat = Fq.fake_quantize(torch.tensor([1.0, 100.0, -5.0]), scale, zp, UINT8)
    # 1/(4/255) + 64 = 127.75 -> 128; the others clip to 255 and 0.
    assert x_hat.tolist() == pytest.approx(
        [(128 - 64) * 4 / 255, (255 - 64) * 4 / 255, (0 - 64) * 4 / 255]
    )


def test_symmetric_divisor_is_127_5():
    scale, zp = Fq.symmetric_qparams(torch.tensor([-2.0, -0.5]), torch.tensor([1.0, 3.0]), INT8)
    assert scale.tolist() == pytest.approx([2 / 127.5, 3 / 127.5])
    assert zp.tolist() == [0.0, 0.0]


def test_constant_range_gives_eps_scale():
    scale, zp = Fq.asymmetric_qparams(torch.tensor(0.7), torch.tensor(0.7), UINT8)
    assert scale.item() == EPS
    assert zp.item() == 0  # -round(0.7 / eps) clamps to the lower bound


def test_round_half_to_even():
    x_hat = Fq.fake_quantize(
        torch.tensor([0.5, 1.5, 2.5]), torch.tensor(1.0), torch.tensor(0.0), UINT8
    )
    assert x_hat.tolist() == [0.0, 2.0, 2.0]


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
@pytest.mark.parametrize("q", [0.99999, 0.00001, 0.5, 0.25])
def test_exact_quantile_equals_torch_quantile(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(Fq.exact_quantile(x, q), torch.quantile(x, q))


def test_exact_quantile_from_tails_only():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1))
    for q in (0.99999, 0.00001):
        k = Fq.quantile_tail_size(x.numel(), q)
        tail = torch.topk(x, k, largest=q >= 0.5).values
        assert torch.equal(Fq.exact_quantile(tail, q, numel=x.numel()), torch.quantile(x, q))


def test_omse_errors_are_sums_of_squared_errors():
    x = torch.tensor([[0.0, 0.3, 0.9, 2.1, -0.37]])
    mins, maxs = Fq.omse_candidates(x.min(), x.max(), num_candidates=5)
    errors = Fq.omse_candidate_errors(x, mins, maxs, UINT8)
    for i in range(5):
        lo, hi = -0.37 * (1 - 0.01 * i), 2.1 * (1 - 0.01 * i)
        s = (hi - lo) / 255
        z = min(max(-round(lo / s), 0), 255)
        expected = sum(
            ((min(max(round(v / s + z), 0), 255) - z) * s - v) ** 2 for v in x.reshape(-1).tolist()
        )
        assert mins[i].item() == pytest.approx(lo) and maxs[i].item() == pytest.approx(hi)
        assert errors[i].item() == pytest.approx(
            expected, rel=1e-3
        )  # float32 rounding of tiny errors


def test_ptf_candidates_are_powers_of_two():
    scales, zp = Fq.ptf_scales(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 7.0]), UINT8)
    s8 = 8.0 / 255
    assert scales.tolist() == pytest.approx([s8 / 8, s8 / 4, s8 / 2, s8])
    assert zp.item() == round(1 / s8)


def test_log2_quantizer():
    p = torch.tensor([1.0, 0.5, 0.3, 2.0**-15, 2.0**-16, 2.0**-20])
    out = Fq.log2_fake_quantize(p, UINT4)
    # round(-log2 0.3) = round(1.737) = 2; 2**-16 overflows 4 bits -> 0.
    assert out.tolist() == [1.0, 0.5, 0.25, 2.0**-15, 0.0, 0.0]


def _lis_transcription(row: np.ndarray, s: float, bits: int) -> list:
    """§8 step by step on one row, element by element, in float32."""
    f32 = np.float32
    s = f32(s)
    x = [f32(v) / s for v in row]
    x_max = max(x)
    x = [v - x_max for v in x]
    a = 0.35815147
    b, c = f32(0.96963238 / a), f32(1 / a)
    x0 = np.floor(f32(-0.6931) / s)
    e = []
    for v in x:
        v = max(v, f32(30) * x0)
        q = np.floor(v / x0)
        r = v - x0 * q
        z = r * (r + np.floor(b / s)) + np.floor(c / (s * s))
        e.append(max(np.floor(z * f32(2.0 ** (30 - q))), f32(0)))
    total = f32(0)
    for v in e:
        total = total + v
    out = []
    for v in e:
        y = np.inf if v == 0 else np.round(total / v)
        if np.isinf(y):
            out.append(0.0)
            continue
        f = math.floor(math.log2(y))
        r = f + 1 if y - 2.0**f >= 2.0 ** (f - 1) else f
        out.append(0.0 if r >= 2**bits else 2.0 ** (-min(max(r, 0), 2**bits - 1)))
    return out


def test_log_int_softmax_against_the_contract():
    s = 0.0625  # exact in binary, so both sides see identical integers
    rows = torch.tensor(
        [
            [0.0, -0.5, -1.0, -3.0, 2.0, -6.0, 1.0, 0.25],
            [4.0, 4.0, 3.9375, -10.0, -2.0, 0.0, 1.0, 3.0],
        ]
    )
    out = Fq.log_int_softmax(rows, torch.tensor(s), UINT4)
    for row, got in zip(rows.numpy(), out):
        assert got.tolist() == _lis_transcription(row, s, 4)


def test_log_int_softmax_properties():
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor(0.05)
    x = torch.round(torch.randn(6, 4, 10, 10, generator=gen) * 40) * s
    out = Fq.log_int_softmax(x, s, UINT4)
    nonzero = out[out > 0]
    exponents = -torch.log2(nonzero)
    assert (
        torch.equal(exponents, exponents.round()) and exponents.min() >= 0 and exponents.max() <= 15
    )
    assert (nonzero >= 2.0**-15).all()
    # The row maximum gets the row's largest output; it maps to 1 where it dominates.
    argmax = x.argmax(dim=-1, keepdim=True)
    assert torch.equal(out.gather(-1, argmax), out.amax(dim=-1, keepdim=True))
    dominant = torch.tensor([[5.0, 0.0, -1.0, -2.0]])
    assert Fq.log_int_softmax(dominant, torch.tensor(0.125), UINT4)[0, 0].item() == 1.0
    # Probabilities below 2**-15 (and those whose integer exp underflows) map to 0.
    far = torch.tensor([[0.0, -12.0, -30.0]])
    got = Fq.log_int_softmax(far, torch.tensor(0.125), UINT4)
    assert got[0, 1].item() == 0.0 and got[0, 2].item() == 0.0
    # 8-bit Log-Int-Softmax keeps 2**-17 (≈ exp(-12)), which 4 bits cannot.
    assert Fq.log_int_softmax(far, torch.tensor(0.125), get_bit_type("uint8"))[0, 1].item() > 0


def _int_layernorm_transcription(
    x: np.ndarray,
    s_in: np.ndarray,
    s_out: float,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 0.0,
) -> np.ndarray:
    """§7 step by step for one token, in float32, with explicit loops (``eps``: the opt-in
    epsilon, added to the variance, ``std = sqrt(std**2 + eps)``)."""
    f32 = np.float32
    C = x.shape[0]
    s_min = min(s_in)
    x_q = [np.round(f32(x[c]) / f32(s_in[c])) * np.round(f32(s_in[c]) / s_min) for c in range(C)]
    total, total_sq = f32(0), f32(0)
    for v in x_q:
        total, total_sq = total + v, total_sq + v * v
    mean = total / f32(C) * s_min
    std = (s_min / f32(C)) * np.sqrt(f32(C) * total_sq - total * total)
    if eps:
        std = np.sqrt(std * std + f32(eps))
    out = []
    for c in range(C):
        A = (s_min / std) * f32(gamma[c]) / f32(s_out)
        N = min(max(7 - math.floor(math.log2(abs(A))), 0), 31)
        M = min(max(math.floor(abs(A) * 2.0**N), 0), 255)
        B = np.round((f32(beta[c]) - (mean / std) * f32(gamma[c])) / f32(s_out) * f32(2.0**N))
        y_q = np.round((f32(np.sign(A)) * f32(M) * x_q[c] + B) / f32(2.0**N))
        out.append(y_q * f32(s_out))
    return np.array(out, dtype=np.float32)


def test_int_layernorm_against_the_contract_and_float():
    gen = torch.Generator().manual_seed(0)
    C = 16
    s_in = 0.01 * 2.0 ** torch.randint(0, 4, (C,), generator=gen).float()
    x = torch.randint(-60, 60, (5, C), generator=gen).float() * s_in  # on each channel's grid
    gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen) * 0.1
    s_out = 0.03
    got = Fq.int_layernorm(x, s_in, torch.tensor(s_out), gamma, beta)
    for token, row in zip(x.numpy(), got.numpy()):
        expected = _int_layernorm_transcription(
            token, s_in.numpy(), s_out, gamma.numpy(), beta.numpy()
        )
        np.testing.assert_array_equal(row, expected)
    # Against float LayerNorm: the error is the output rounding (s_out/2) plus M's 8-bit precision.
    reference = torch.nn.functional.layer_norm(x, (C,), gamma, beta, eps=0.0)
    bound = s_out / 2 + reference.abs().max() / 2**7 + s_out
    assert (got - reference).abs().max() <= bound


def test_int_layernorm_epsilon_is_opt_in():
    gen = torch.Generator().manual_seed(2)
    C, s_out = 8, torch.tensor(0.05)
    s_in = 0.01 * 2.0 ** torch.randint(0, 3, (C,), generator=gen).float()
    x = torch.randint(-40, 40, (4, C), generator=gen).float() * s_in
    x[1] = 0.0  # a constant token
    gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen) * 0.1
    # As published: no epsilon, a token whose integers are all equal divides by zero.
    published = kernels.int_layernorm(x, s_in, s_out, gamma, beta)
    assert torch.isnan(published[1]).all()
    assert torch.isfinite(published[[0, 2, 3]]).all()
    eps = 1e-6
    got = kernels.int_layernorm(x, s_in, s_out, gamma, beta, eps=eps)  # the fast path
    assert torch.isfinite(got).all()
    for token, row in zip(x.numpy(), got.numpy()):
        expected = _int_layernorm_transcription(
            token, s_in.numpy(), float(s_out), gamma.numpy(), beta.numpy(), eps=eps
        )
        np.testing.assert_array_equal(row, expected)
    # A constant token normalizes to beta, as in float LayerNorm (within the output rounding).
    assert (got[1] - beta).abs().max() <= float(s_out)
    # The plain formula and the compiled-kernel path give the same bits.
    assert torch.equal(Fq.int_layernorm(x, s_in, s_out, gamma, beta, eps=eps), got)
    traced = kernels.traced.int_layernorm(x, s_in, s_out, gamma, beta, 7, eps)
    assert torch.equal(traced, got)


def test_int_layernorm_tiles_scales_for_patch_merging():
    gen = torch.Generator().manual_seed(1)
    C = 4
    s_in = torch.tensor([0.01, 0.02, 0.04, 0.08])
    tiled = s_in.repeat(4)  # channel order c0..c3, c0..c3, ...
    x = torch.randint(-30, 30, (3, 4 * C), generator=gen).float() * tiled
    gamma, beta = torch.rand(4 * C, generator=gen) + 0.5, torch.zeros(4 * C)
    got = Fq.int_layernorm(x, s_in, torch.tensor(0.05), gamma, beta)
    assert torch.equal(got, Fq.int_layernorm(x, tiled, torch.tensor(0.05), gamma, beta))
    for token, row in zip(x.numpy(), got.numpy()):
        np.testing.assert_array_equal(
            row,
            _int_layernorm_transcription(token, tiled.numpy(), 0.05, gamma.numpy(), beta.numpy()),
        )


def _fake_quantize_transcription(x, scale, zero_point, lower, upper) -> np.ndarray:
    """§4 element by element in float32: ``(clip(rint(x / s + zp)) - zp) * s``."""
    f32 = np.float32
    out = []
    for v, s, z in np.broadcast(x, scale, zero_point):
        q = min(max(np.rint(f32(v) / f32(s) + f32(z)), f32(lower)), f32(upper))
        out.append((q - f32(z)) * f32(s))
    return np.array(out, dtype=np.float32).reshape(np.broadcast_shapes(x.shape, scale.shape))


def test_fake_quantize_against_the_contract():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.125  # ties: half to even
    x[1, 0] = 1e4  # far outside the grid
    for scale, zp, bt in (
        (torch.tensor(0.125), torch.tensor(7.0), UINT8),
        (torch.rand(5, generator=gen) * 0.1 + 0.01, torch.zeros(5), INT8),
    ):
        got = Fq.fake_quantize(x, scale, zp, bt).numpy()
        expected = _fake_quantize_transcription(
            x.numpy(), scale.numpy(), zp.numpy(), bt.lower, bt.upper
        )
        np.testing.assert_array_equal(got, expected)


def test_int_exp_against_the_contract():
    f32 = np.float32
    for s in (0.05, 0.0173, 2.5e-3):
        x = -torch.arange(0, int(12 / s), 7, dtype=torch.float32)
        got = Fq.int_exp(x, torch.tensor(s)).numpy()
        s32 = f32(s)
        x0 = np.floor(f32(-0.6931) / s32)
        b, c = f32(0.96963238 / 0.35815147), f32(1 / 0.35815147)
        for v, g in zip(x.numpy(), got):
            v = max(v, f32(30) * x0)
            q = np.floor(v / x0)
            r = v - x0 * q
            z = r * (r + np.floor(b / s32)) + np.floor(c / (s32 * s32))
            assert g == max(np.floor(z * f32(2.0 ** (30 - q))), f32(0))
        # the polynomial approximates exp: e * a s**2 2**-30 ~ exp(x s)
        approx = got.astype(np.float64) * 0.35815147 * s * s * 2.0**-30
        np.testing.assert_allclose(
            approx, np.exp(x.numpy() * s), rtol=0, atol=0.015
        )  # I-BERT: about 1%


def test_omse_and_ptf_errors_against_numpy():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 400, generator=gen) ** 3
    mins, maxs = Fq.omse_candidates(x.min(), x.max(), 12)
    errors = Fq.omse_candidate_errors(x, mins, maxs, UINT8, chunk=5)
    xs = x.numpy().reshape(-1)
    for i in range(12):
        s, z = Fq.asymmetric_qparams(mins[i], maxs[i], UINT8)
        lo, hi = (
            float(x.min()) * float(np.float32(1 - 0.01 * i)),
            float(x.max()) * float(np.float32(1 - 0.01 * i)),
        )
        assert mins[i].item() == pytest.approx(lo, rel=1e-6)
        assert maxs[i].item() == pytest.approx(hi, rel=1e-6)
        fq = _fake_quantize_transcription(xs, s.numpy(), z.numpy(), 0, 255)
        # float32 differences, squared and summed exactly enough in float64
        expected = np.sum((fq - xs).astype(np.float64) ** 2)
        assert errors[i].item() == pytest.approx(expected, rel=1e-12)
    scales, zp = Fq.ptf_scales(x.amin(1), x.amax(1), UINT8)
    ptf = Fq.ptf_channel_errors(x, scales, zp, UINT8)
    for c in range(3):
        for j in range(4):
            fq = _fake_quantize_transcription(x[c].numpy(), scales[j].numpy(), zp.numpy(), 0, 255)
            expected = np.sum((fq - x[c].numpy()).astype(np.float64) ** 2)
            assert ptf[c, j].item() == pytest.approx(expected, rel=1e-12)
