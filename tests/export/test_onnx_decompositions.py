"""The exact graph's elementwise decompositions, run by ONNX Runtime on crafted inputs.

Each subgraph is built by the exporter's own method and compared bit for bit with an independent
computation (Python integers / ``math.frexp``) or with the integer model's kernel
(:mod:`fqvit_pl.quant.integer.kernels`) on inputs that reach the bounds of the exactness proofs:
extreme codes, PTF factors up to 8, row sums past 2**52, masked pairs, clamped exponents.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from export_helpers import ieee_sqrt

from fqvit_pl.quant.bit_type import get_bit_type
from fqvit_pl.quant.integer import kernels
from fqvit_pl.quant.integer.layers import IntegerAttention, IntPoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fqvit_pl.export.onnx_graph import OPSET, _Exporter  # noqa: E402


def _run(build, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Build a one-output graph with ``build(exporter, input names)`` and run it in ONNX Runtime."""
    from onnx import TensorProto, helper

    exporter = _Exporter(torch.nn.Identity())
    out = build(exporter, list(inputs))
    dtypes = {
        np.dtype(np.uint8): TensorProto.UINT8,
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.int32): TensorProto.INT32,
    }
    graph = helper.make_graph(
        exporter.g.nodes,
        "subgraph",
        [
            helper.make_tensor_value_info(n, dtypes[a.dtype], list(a.shape))
            for n, a in inputs.items()
        ],
        [helper.make_value_info(out, onnx.TypeProto())],
        exporter.g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)[0]


def _point(scale, zero_point: int, bit_type: str = "uint8") -> IntPoint:
    scale = torch.as_tensor(scale, dtype=torch.float32)
    point = IntPoint(get_bit_type(bit_type), None if scale.dim() == 0 else scale.numel())
    point.scale.copy_(scale)
    point.zero_point.fill_(zero_point)
    return point


# -- the PTF LayerNorm's power of two ------------------------------------------------------------


def test_ptf_power_is_two_to_the_clamped_exponent():
    """``2**-clamp(7 - floor(log2 |a|), 0, 31)`` for powers of two, their float32 neighbours,
    1.5 * 2**k and its neighbours, the clamp's edges (2**-24, 256), zero, subnormals, infinity and
    random magnitudes, both signs, against ``math.frexp``."""
    k = np.arange(-45, 30, dtype=np.float64)
    powers = (2.0**k).astype(np.float32)
    values = np.concatenate([
        powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf)),
        (1.5 * 2.0**k).astype(np.float32), np.nextafter((1.5 * 2.0**k).astype(np.float32), 0),
        np.float32(10.0) ** np.random.default_rng(0).uniform(-12, 6, 4000).astype(np.float32),
        np.array([0.0, np.inf, 1e-45, 1e-40, 3e38, 255.99998], np.float32),
    ])  # fmt: skip
    values = np.concatenate([values, -values]).astype(np.float32)
    out = _run(lambda ex, names: ex._ptf_power(names[0], 7), {"a": values})

    def expected(a: float) -> float:
        if a == 0:
            return 2.0**-31
        if math.isinf(a):
            return 1.0
        exponent = math.frexp(abs(a))[1] - 1  # floor(log2 |a|), exact
        return 2.0 ** -min(max(7 - exponent, 0), 31)

    assert out.tolist() == [expected(float(a)) for a in values]


def test_ptf_power_of_every_float32_mantissa():
    """Every float32 of the binades ``[2**-24, 2**-23)``, ``[1, 2)`` and ``[128, 256)`` (the
    unit-in-the-first-place formula works mantissa by mantissa; the binades are its extremes)."""
    mantissas = np.arange(2**23, dtype=np.uint32)
    values = np.concatenate(
        [((np.uint32(e + 127) << 23) | mantissas).view(np.float32) for e in (-24, 0, 7)]
    )
    out = _run(lambda ex, names: ex._ptf_power(names[0], 7), {"a": values})
    expected = np.repeat(np.float32([2.0**-31, 2.0**-7, 1.0]), 2**23)
    assert np.array_equal(out, expected)


# -- Log-Int-Softmax -----------------------------------------------------------------------------


def _python_probability(y: int, levels: int) -> float:
    """§8 steps 4-5 by Python integers: ``2**(L-1-r)`` with ``r = floor(log2 y) + [y - 2**f >=
    2**(f-1)]``, 0 for ``r >= L``."""
    f = y.bit_length() - 1
    r = f + (y - 2**f >= 2 ** (f - 1) if f > 0 else 0)
    return float(2 ** (levels - 1 - r)) if r < levels else 0.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log_rounding_of_every_quotient(bits):
    """The probability lookup for every integer ``y`` up to the clamp ``2**L``, by Python integers."""
    levels = 2**bits
    y = np.arange(1, 2**levels + 1, dtype=np.int32)
    out = _run(lambda ex, names: ex._lookup(ex._lis_probability_table(bits), names[0]), {"y": y})
    assert out.tolist() == [_python_probability(int(v), levels) for v in y]


def _quotient_rows() -> np.ndarray:
    """Rows ``[2 m, (2k - 1) m, 0]``: ``S / e = k + 1/2`` exactly for the first entry (ties of
    both parities for every ``k`` up to ``2**16 + 1``) and ``(2k + 1) / (2k - 1)`` for the
    second; the same scaled by ``2**34`` (``S`` up to ~2**52); ``2 m`` moved off the ties by its
    last float32 bit; ties broken by a 1 that only an exact row sum keeps; a row with a zero
    exponential and a row of zeros."""
    k = np.arange(1, 2**16 + 2, dtype=np.float64)
    rows = []
    for scale in (1.0, 2.0**34):
        for shift in (0.0, 1.0, -1.0):
            first = 2 * scale + shift * max(1.0, scale * 2.0**-22)
            rows.append(np.stack([np.full_like(k, first), (2 * k - 1) * scale, 0 * k], axis=1))
    big = 2.0**25  # [E, (k - 1/2) E, 1]: S / E = k + 1/2 + 2**-25, only if the sum keeps the 1
    rows.append(np.stack([np.full_like(k, big), (k - 0.5) * big, np.ones_like(k)], axis=1))
    rows.append(np.array([[5.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
    out = np.concatenate(rows).astype(np.float32)
    assert np.array_equal(out.astype(np.float64), np.concatenate(rows))  # float32 integers
    return out


def test_float64_quotient_rounds_half_to_even_and_clamps():
    """``min(round(S / e), 2**16)`` (half to even) by Python fractions on ties of every parity,
    near-ties, row sums near 2**52, ``e = 0`` (infinite: clamped) and a row of zeros (0 / 0:
    clamped, probability 0 as the int64 division gives)."""
    e = _quotient_rows()
    out = _run(lambda ex, names: ex._lis_quotient_float64(names[0], 16), {"e": e})
    for row, got in zip(e.astype(np.int64).tolist(), out.tolist()):
        total = sum(row)
        assert total < 2**52
        # Python's round() rounds half to even
        assert got == [min(round(Fraction(total, v)), 2**16) if v else 2**16 for v in row]


def _score_rows(tokens: int, seed: int) -> np.ndarray:
    """Rows of score codes: random, all equal (the largest row sum), one high code with the rest
    at 0 (exponentials that floor to 0), two codes, and the full code range."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 256, tokens), rng.integers(90, 140, tokens),
            np.full(tokens, 255), np.full(tokens, 0), np.r_[255, np.zeros(tokens - 1)],
            np.r_[np.full(tokens // 2, 200), np.full(tokens - tokens // 2, 199)],
            np.linspace(0, 255, tokens).round()]  # fmt: skip
    rows += [rng.integers(0, 256, tokens) for _ in range(25)]
    return np.stack(rows).astype(np.uint8)


def _attn(
    scale: float, zero_point: int, bits: int, exact_table: bool, tokens: int, grid: str = "uint8"
):
    point = _point(scale, zero_point, grid)
    table = (
        kernels.lis_exp_table(point.scale)
        if exact_table
        else kernels.lis_exp_table_2d(point.scale, point.zero_point)
    )
    return SimpleNamespace(
        lis_point=lambda: point,
        lis_exp_table=table,
        softmax_bits=bits,
        exact_float64=float(table.max()) * tokens < 2.0**52,  # the converter's choice
    )


@pytest.mark.parametrize("exact_table", [False, True])
@pytest.mark.parametrize(
    "scale, tokens, bits",
    [(0.05, 49, 4), (0.11, 197, 4), (0.004, 197, 4), (0.0015, 64, 3), (0.02, 16, 2)],
)
def test_log_int_softmax_equals_the_integer_models_kernel(scale, tokens, bits, exact_table):
    """Both exponential tables, the float64 path and the int64 path (small scales: row sums past
    2**52), narrower softmax grids: the graph's ``2**(L-1) p`` equals the integer model's ``p``."""
    attn = _attn(scale, 117, bits, exact_table, tokens)
    codes = _score_rows(tokens, seed=tokens)
    out = _run(
        lambda ex, names: ex.log_int_softmax(names[0], attn, None, tokens), {"scores": codes}
    )
    reference = kernels.log_int_softmax_codes(
        torch.from_numpy(codes), attn.lis_exp_table, kernels.lis_prob_table(bits),
        exact_float64=attn.exact_float64,
    )  # fmt: skip
    assert np.array_equal(out * 2.0 ** -(2**bits - 1), reference.numpy())
    if scale == 0.004:
        assert not attn.exact_float64  # this case takes the int64 path


def test_log_int_softmax_of_the_exact_table_equals_python_integers():
    """The exact table's §8 by Python integers: ``S``, ``y = round(S / e)`` (half to even) and the
    log rounding, with no float anywhere."""
    tokens, bits = 197, 4
    attn = _attn(0.03, 100, bits, True, tokens)
    codes = _score_rows(tokens, seed=1)
    out = _run(
        lambda ex, names: ex.log_int_softmax(names[0], attn, None, tokens), {"scores": codes}
    )
    table = [int(v) for v in attn.lis_exp_table.tolist()]
    for row, got in zip(codes.tolist(), out.tolist()):
        e = [table[max(row) - c] for c in row]
        total = sum(e)
        for e_i, p in zip(e, got):
            if e_i == 0:
                assert p == 0.0
                continue
            y = round(Fraction(total, e_i))  # Python rounds half to even
            f = y.bit_length() - 1
            r = f + (y - 2**f >= 2 ** (f - 1) if f > 0 else 0)
            assert p == (2.0 ** (15 - r) if r < 16 else 0.0)


@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("exact_table", [False, True])
def test_log_int_softmax_sends_masked_pairs_to_the_saturated_exponential(exact_table, int64):
    """Swin's shift mask: masked pairs take the table's saturated entry and never the row max
    (in one window all masked pairs at the top code), both tables, both divisions."""
    tokens, windows = 16, 4
    attn = _attn(0.06, 90, 4, exact_table, tokens)
    attn.exact_float64 = not int64
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (2, windows, 3, tokens, tokens)).astype(np.uint8)
    mask = rng.random((windows, tokens, tokens)) < 0.5
    mask[:, np.arange(tokens), np.arange(tokens)] = False  # every row keeps one pair
    codes[..., np.arange(tokens), np.arange(tokens)] = 0  # ... whose code is the lowest
    codes[0, :, 0] = np.where(mask, 255, codes[0, :, 0])
    lis_mask = mask[None, :, None]
    out = _run(
        lambda ex, names: ex.log_int_softmax(names[0], attn, lis_mask, tokens), {"scores": codes}
    )
    reference = kernels.log_int_softmax_codes(
        torch.from_numpy(codes), attn.lis_exp_table, kernels.lis_prob_table(4),
        torch.from_numpy(lis_mask), exact_float64=attn.exact_float64,
    )  # fmt: skip
    assert np.array_equal(out * 2.0**-15, reference.numpy())


def _every_pair(grid: str) -> np.ndarray:
    """One row per row maximum ``m`` of the grid, ``[m, lower, ..., m, m, ...]``: every
    (row maximum, code) pair of the tables occurs."""
    bt = get_bit_type(grid)
    rows = [
        np.r_[m, np.arange(bt.lower, m + 1), np.full(bt.upper - m, m)]
        for m in range(bt.lower, bt.upper + 1)
    ]
    return np.stack(rows).astype(np.uint8)


@pytest.mark.parametrize("exact_table", [False, True])
@pytest.mark.parametrize(
    "grid, zero_point, scale",
    [
        ("uint8", 117, 0.04),  # a trained network's scale: float64 division
        ("uint8", 117, 0.004),  # row sums past 2**52: int64 division
        ("uint8", 30, 1.7),  # floor(C / s**2) = 0: exponentials 0, rows of zeros
        ("uint6", 20, 0.09),
        ("uint4", 7, 0.3),
    ],
)
def test_log_int_softmax_of_every_table_entry(grid, zero_point, scale, exact_table):
    """Every (row maximum, code) pair of 4..8-bit score grids through the graph equals the integer
    model's kernel (its int64 division at scale 1.7: on a row of zeros the float64 kernel finds no
    key for ``0 / 0``, and the graph gives probability 0, as the int64 division)."""
    codes = _every_pair(grid)
    tokens = codes.shape[1]
    attn = _attn(scale, zero_point, 4, exact_table, tokens, grid)
    assert attn.exact_float64 == (scale != 0.004)
    out = _run(
        lambda ex, names: ex.log_int_softmax(names[0], attn, None, tokens), {"scores": codes}
    )
    reference = kernels.log_int_softmax_codes(
        torch.from_numpy(codes), attn.lis_exp_table, kernels.lis_prob_table(4),
        exact_float64=attn.exact_float64 and scale != 1.7,
    )  # fmt: skip
    assert np.array_equal(out * 2.0**-15, reference.numpy())
    if scale == 1.7:
        assert (out == 0).all(axis=1).any()  # a row of zeros occurred


# -- the attention scores' codes -----------------------------------------------------------------


def _attention(
    head_dim: int, s_qkv: float, zp_qkv: int, s_score: float, zp_score: int,
    grid: str = "uint8", window: tuple[int, int] | None = None,
) -> IntegerAttention:  # fmt: skip
    """An integer attention layer with 2 heads of ``head_dim`` and the given points."""
    attn = IntegerAttention(
        2 * head_dim, 2, True, get_bit_type("uint8"), get_bit_type("uint4"), True,
        window_size=window,
    )  # fmt: skip
    for point, s, zp in ((attn.qkv_point, s_qkv, zp_qkv), (attn.score_point, s_score, zp_score)):
        point.scale.fill_(s)
        point.zero_point.fill_(zp)
    attn.score_point.bit_type = get_bit_type(grid)
    return attn


@pytest.mark.parametrize(
    "s_qkv, zp_qkv, s_score, zp_score, grid, window, path",
    [
        (0.0431, 131, 0.0377, 117, "uint8", None, "product"),  # fl(step / s) itself
        (0.013563358899778258, 143, 0.11514606738680391, 122, "uint8", None, "product"),  # its neighbour
        (0.0352367882187436, 105, 0.10733437539769432, 158, "uint8", None, "division"),  # none fits
        (0.05, 128, 0.04, 117, "uint8", None, "division"),  # step / s = 2**-5 exactly, and no fit
        (0.0431, 131, 0.0911, 20, "uint6", None, "product"),  # a narrower grid: clamped
        (0.0472, 125, 0.0402, 117, "uint8", (2, 2), "product"),  # Swin: (q * scale) @ k^T
    ],
)  # fmt: skip
def test_score_codes_of_every_accumulator(s_qkv, zp_qkv, s_score, zp_score, grid, window, path):
    """The score codes of every ``q @ k^T`` accumulator a 4-dim head can produce equal the integer
    model's (``IntegerAttention.score_step``, ``kernels.quantize_float``), whether the graph
    multiplies by one verified constant or divides as the integer model."""
    attn = _attention(4, s_qkv, zp_qkv, s_score, zp_score, grid, window)
    bound = 4 * max(zp_qkv, 255 - zp_qkv) ** 2
    acc = np.arange(-bound, bound + 1, dtype=np.int32)
    ops = []

    def build(ex, names):
        out = ex._score_codes(names[0], attn)
        ops.extend(n.op_type for n in ex.g.nodes)
        return out

    out = _run(build, {"acc": acc})
    point = attn.score_point
    reference = kernels.quantize_float(
        torch.from_numpy(acc).to(torch.float32) * attn.score_step(), point.scale,
        point.zero_point, point.bit_type,
    )  # fmt: skip
    assert np.array_equal(out, reference.numpy())
    assert ("Div" in ops) == (path == "division")


@pytest.mark.parametrize(
    "s_bias, zp_bias, divide",
    [
        (0.06, 110, False),  # fl(1 / s) fits
        (0.08829787525711608, 110, False),  # fl(1 / s) does not fit, its neighbour does
        (0.06, 110, True),  # no multiplier (forced): the division, as the integer model
    ],
)
def test_swin_bias_codes_of_every_code_and_bias(s_bias, zp_bias, divide, monkeypatch):
    """Swin: every score code at every position plus the relative position bias, quantized to the
    bias point, equals the integer model's (``IntegerAttention.scores``)."""
    if divide:
        monkeypatch.setattr(_Exporter, "_verified_multiplier", staticmethod(lambda *a: None))
    attn = _attention(4, 0.05, 128, 0.043, 121, window=(3, 3))
    g = torch.Generator().manual_seed(0)
    attn.bias_table_codes.copy_(torch.randint(0, 256, attn.bias_table_codes.shape, generator=g))
    attn.bias_table_point.scale.fill_(0.021)
    attn.bias_table_point.zero_point.fill_(131)
    attn.bias_point.scale.fill_(s_bias)
    attn.bias_point.zero_point.fill_(zp_bias)
    tokens = attn.window_area
    codes = np.broadcast_to(
        np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 2, tokens, tokens)
    ).copy()
    out = _run(lambda ex, names: ex._biased_codes(names[0], attn), {"codes": codes})
    value = attn.score_point.dequantize(torch.from_numpy(codes)) + attn.relative_bias()
    point = attn.bias_point
    reference = kernels.quantize_float(value, point.scale, point.zero_point, point.bit_type)
    assert np.array_equal(out, reference.numpy())


# -- the PTF LayerNorm ---------------------------------------------------------------------------


def _ln_codes(tokens: int, channels: int, zero_point: int, seed: int) -> np.ndarray:
    """Random tokens plus the extremes: every code at 0 / 255 on alternate channels (the largest
    variance), one code off a constant, and a constant token but for one channel."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (tokens, channels))
    codes[0] = np.where(np.arange(channels) % 2, 255, 0)
    codes[1] = zero_point
    codes[1, 0] += 1
    codes[2] = 255
    codes[2, -1] = 0
    codes[3] = rng.integers(zero_point - 3, zero_point + 4, channels)
    return codes.astype(np.uint8)


@pytest.mark.parametrize(
    "channels, factors, out_type, gamma_scale",
    [
        (64, (1,), "uint8", 1.0),  # k = 1: squares in float32
        (96, (1, 2, 4, 8), "uint8", 1.0),  # PTF up to 8: squares in float64
        (96, (1, 2, 4, 8), "uint6", 1.0),  # a narrower output grid
        (48, (1, 8), "uint8", 1e-9),  # |A| below 2**-24: N clamped at 31, large B
        (48, (1, 8), "uint8", 1e4),  # |A| above 2**8: N clamped at 0, M at 255
        (8256, (8,), "uint8", 1.0),  # C * 255 * 8 >= 2**24: the row sum in float64
    ],
)
def test_integer_layernorm_equals_the_integer_models_kernel(
    channels, factors, out_type, gamma_scale, monkeypatch
):
    monkeypatch.setattr(torch, "sqrt", ieee_sqrt)
    g = torch.Generator().manual_seed(channels)
    k = torch.tensor(factors, dtype=torch.float32)[torch.arange(channels) % len(factors)]
    in_point = _point(0.013 * k, 121)
    out_point = _point(0.021, 131 if out_type == "uint8" else 30, out_type)
    weight = (torch.randn(channels, generator=g) * 0.4 + 1) * gamma_scale
    weight[::7] *= -1
    bias = torch.randn(channels, generator=g) * 0.3
    norm = SimpleNamespace(channels=channels, weight=weight, bias=bias, integer=True, eps=1e-6)
    codes = _ln_codes(6 if channels > 1000 else 40, channels, 121, seed=channels)
    out = _run(
        lambda ex, names: ex.layer_norm(names[0], norm, in_point, out_point), {"codes": codes}
    )
    reference = kernels.int_layernorm_codes(
        torch.from_numpy(codes), in_point.zero_point, in_point.scale, weight, bias,
        out_point.scale, out_point.zero_point, out_point.bit_type,
    )  # fmt: skip
    assert np.array_equal(out, reference.numpy())


@pytest.mark.parametrize("int64", [False, True])
def test_log_int_softmax_rounds_a_tie_to_even(int64):
    """``S / e = 2.5`` exactly (one code at the row maximum, three ``|x0|`` below it, whose
    exponential is exactly half): ``y = 2`` (half to even), ``r = 1``, ``p = 1/2``; rounding half up
    would give ``y = 3``, ``r = 2``. Both the float64 and the int64 division."""
    attn = _attn(0.004, 117, 4, True, 4)
    attn.exact_float64 = not int64  # the integer model's choice decides the path
    x0 = int(torch.floor(-0.6931 / attn.lis_point().scale))
    table = attn.lis_exp_table
    assert float(table[-x0]) * 2 == float(table[0])  # e(|x0| below the max) = e(max) / 2
    codes = np.array([[255, 255 + x0, 255 + x0, 255 + x0]], np.uint8)
    out = _run(lambda ex, names: ex.log_int_softmax(names[0], attn, None, 4), {"scores": codes})
    # the max: y = round(2.5) = 2 -> r = 1; the others: S / e = 5 -> r = floor(log2 5) + 0 = 2
    assert (out * 2.0**-15).tolist() == [[0.5, 0.25, 0.25, 0.25]]


def _ln_case(channels: int, factors, gamma, out_type: str, out_scale: float, zp_in: int = 121):
    """A LayerNorm with PTF factors ``factors`` (cycled over the channels), gains ``gamma`` and
    biases of a few output steps, its input and output points."""
    g = torch.Generator().manual_seed(channels + len(factors))
    k = torch.tensor(factors, dtype=torch.float32)[torch.arange(channels) % len(factors)]
    in_point = _point(0.013 * k, zp_in)
    zp_out = {"uint8": 131, "uint6": 30, "uint4": 0}[out_type]
    out_point = _point(out_scale, zp_out, out_type)
    bias = torch.randn(channels, generator=g) * 3 * out_scale
    norm = SimpleNamespace(channels=channels, weight=gamma, bias=bias, integer=True, eps=1e-6)
    return norm, in_point, out_point


def _ln_check(norm, in_point, out_point, codes: np.ndarray, monkeypatch, form=None):
    """The exported LayerNorm (step 5's form as the exporter decides, or ``form``) against the
    integer model's kernel on ``codes``."""
    monkeypatch.setattr(torch, "sqrt", ieee_sqrt)
    if form is not None:
        monkeypatch.setattr(_Exporter, "_ln_sum_form", staticmethod(lambda *a: form))
    out = _run(
        lambda ex, names: ex.layer_norm(names[0], norm, in_point, out_point), {"codes": codes}
    )
    reference = kernels.int_layernorm_codes(
        torch.from_numpy(codes), in_point.zero_point, in_point.scale, norm.weight, norm.bias,
        out_point.scale, out_point.zero_point, out_point.bit_type,
    )  # fmt: skip
    np.testing.assert_array_equal(out, reference.numpy())
    return out


def _every_exponent_gamma(channels: int, seed: int) -> torch.Tensor:
    """Gains of both signs whose ``|A|`` covers every binade from below 2**-24 (``N = 31``) to
    above 2**8 (``N = 0``), plus exact zeros."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.linspace(-40, 14, channels)
    gamma = 2.0 ** (exponents + torch.rand(channels, generator=g))
    gamma[1::3] *= -1
    gamma[::17] = 0.0
    return gamma


@pytest.mark.parametrize("factors", [(1,), (2,), (4,), (8,), (1, 2, 4, 8), (8, 1, 1, 2, 4)])
@pytest.mark.parametrize("out_type", ["uint8", "uint4"])
def test_integer_layernorm_every_multiplier_exponent(factors, out_type, monkeypatch):
    """``N`` from 0 to 31 in one LayerNorm (gains spread over 54 binades, negative and zero), every
    PTF factor and mixes, 8-bit and 4-bit outputs, on extreme and random codes: float64 step 5."""
    channels = 216
    norm, in_point, out_point = _ln_case(
        channels, factors, _every_exponent_gamma(channels, len(factors)), out_type, 0.021
    )
    codes = _ln_codes(64, channels, 121, seed=len(factors))
    out = _ln_check(norm, in_point, out_point, codes, monkeypatch)
    assert out.min() == 0 and out.max() == out_point.bit_type.upper  # both saturations reached


def _bounded_gamma(channels: int, out_scale: float, x_max: float, n_max: int) -> torch.Tensor:
    """Gains of both signs (and zeros) with ``|gamma| / (s_out max|x_q|)`` from exactly the bound
    ``2**(7 - n_max) (1 + 2**-15)`` (``N <= n_max`` whatever the codes) up to 2**9 times it."""
    g = torch.Generator().manual_seed(channels + n_max)
    edge = out_scale * x_max * 2.0 ** (7 - n_max) * (1 + 2.0**-15)
    gamma = edge * 2.0 ** (torch.rand(channels, generator=g) * 9)
    gamma[torch.arange(channels) % 3 == 1] *= -1
    gamma[5] = 0.0
    gamma[7] = edge
    return gamma


@pytest.mark.parametrize("n_max, form", [(15, "float32"), (23, "float32_split"), (24, "float64")])
@pytest.mark.parametrize("channels", [96, 768, 1024])
@pytest.mark.parametrize("factors", [(1,), (1, 2, 4, 8)])
def test_integer_layernorm_sum_form_at_its_bound(n_max, form, channels, factors, monkeypatch):
    """Gains right at each form's bound on ``N`` (the smallest gain reaches it) choose that form;
    on codes at 0 / 255 (the largest std), constant tokens (``std = 0``: ``A = +-inf``, and
    ``B`` infinite or NaN), random tokens, it equals the kernel, and so does the float64 form."""
    out_scale, x_max = 0.05, max(factors) * 134  # max(zp, 255 - zp) with zp = 121
    gamma = _bounded_gamma(channels, out_scale, x_max, n_max)
    norm, in_point, out_point = _ln_case(channels, factors, gamma, "uint8", out_scale)
    scales = in_point.scale.repeat(channels // in_point.scale.numel())
    assert _Exporter._ln_sum_form(norm, scales, scales.min(), 121, out_point, 7) == form
    codes = _ln_codes(40, channels, 121, seed=channels)
    codes[4] = 121  # constant tokens: mean 0 (B NaN) and mean > 0 (B infinite)
    codes[5] = 200
    codes[6] = np.where(np.arange(channels) % 2, 255, 0)
    out = _ln_check(norm, in_point, out_point, codes, monkeypatch)
    assert np.array_equal(out, _ln_check(norm, in_point, out_point, codes, monkeypatch, "float64"))


def _ln_ties(norm, in_point, out_point, codes: np.ndarray) -> int:
    """How many outputs are exact ties ``(M x_q + B) / 2**N = j + 1/2``: §7 steps 1-5 in NumPy
    float32 and Python integers (``N`` from ``math.frexp``), independent of the exporter."""
    f32 = np.float32
    scale = in_point.scale.numpy().astype(f32)
    s_min = scale.min()
    k = np.round(scale / s_min).astype(f32)
    x_q = (codes.astype(f32) - f32(int(in_point.zero_point.reshape(-1)[0]))) * k
    c = f32(codes.shape[-1])
    total = x_q.astype(np.float64).sum(-1, keepdims=True).astype(f32)
    squares = (x_q.astype(np.float64) ** 2).sum(-1, keepdims=True).astype(f32)
    mean = (total / c) * s_min
    std = (s_min / c) * np.sqrt(c * squares - total * total)
    gamma, beta = norm.weight.numpy().astype(f32), norm.bias.numpy().astype(f32)
    s_out = f32(float(out_point.scale))
    a = ((s_min / std) * gamma) / s_out
    offset = ((beta - (mean / std) * gamma) / s_out).astype(f32)
    ties = 0
    for a_e, o_e, x_e in zip(a.ravel(), offset.ravel(), x_q.ravel()):
        n = min(max(7 - (math.frexp(abs(float(a_e)))[1] - 1), 0), 31)
        m = int(math.copysign(min(math.floor(abs(float(a_e)) * 2**n), 255), float(a_e)))
        b = int(np.round(f32(o_e) * f32(2.0**n)))  # float32 product (exact), half to even
        z = m * int(x_e) + b
        ties += n > 0 and z % 2**n == 2 ** (n - 1)
    return ties


@pytest.mark.parametrize("out_type", ["uint8", "uint6"])
@pytest.mark.parametrize("form", ["float32", "float32_split", "float64"])
def test_integer_layernorm_rounds_ties_to_even(form, out_type, monkeypatch):
    """Tokens of std about one code step and gains making ``|A|`` a few units (``N`` about 5):
    one sum ``M x_q + B`` in a few dozen is an exact tie (more than 50 here, counted in Python
    integers), which step 5 rounds half to even on every form (on the float32 forms that is
    QuantizeLinear's rounding): rounding them up or away from zero would differ."""
    channels = 64
    rng = np.random.default_rng(0)
    codes = (121 + rng.integers(-1, 2, (48, channels))).astype(np.uint8)
    gamma = torch.from_numpy(rng.uniform(0.2, 0.4, channels).astype(np.float32))
    gamma[::2] *= -1
    norm, in_point, out_point = _ln_case(channels, (1, 2), gamma, out_type, 0.05)
    norm.bias = torch.from_numpy((rng.integers(-8, 9, channels) * 0.025).astype(np.float32))
    assert _ln_ties(norm, in_point, out_point, codes) > 50
    _ln_check(norm, in_point, out_point, codes, monkeypatch, form)


def test_integer_layernorm_float64_sum_where_float32_would_round(monkeypatch):
    """Why step 5 needs float64 outside the float32 bound: ``N = 31`` (``A = 2**-26``,
    ``M = 32``) and ``B = 2.5 * 2**31`` (``beta / s_out = 2.5`` exactly, mean 0): the exact
    ``(B +- 32) / 2**31`` rounds to 3 or 2 with the sign of ``x_q``, while float32's
    ``B +- 32 = B`` would be the tie 2.5, rounded to 2 everywhere."""
    channels = 64
    codes = np.where(np.arange(channels) % 2, 122, 120)[None].repeat(2, 0).astype(np.uint8)
    codes[1] = codes[1, ::-1]
    gamma = torch.full((channels,), 2.0**-30)  # A = (s_min / std) gamma / s_out = 2**-26
    norm, in_point, out_point = _ln_case(channels, (1,), gamma, "uint8", 2.0**-4)
    norm.bias = torch.full((channels,), 2.5 * 2.0**-4)
    scales = in_point.scale.repeat(channels)
    assert _Exporter._ln_sum_form(norm, scales, scales.min(), 121, out_point, 7) == "float64"
    out = _ln_check(norm, in_point, out_point, codes, monkeypatch)
    assert np.array_equal(out, np.where(codes > 121, 131 + 3, 131 + 2))
    for form in ("float32", "float32_split"):  # both valid only up to N = 23: here N = 31
        monkeypatch.setattr(_Exporter, "_ln_sum_form", staticmethod(lambda *a, f=form: f))
        forced = _run(
            lambda ex, names: ex.layer_norm(names[0], norm, in_point, out_point), {"codes": codes}
        )
        assert (forced == 131 + 2).all()


@pytest.mark.parametrize("form", ["float32", "float32_split", "float64"])
def test_integer_layernorm_saturates_huge_offsets(form, monkeypatch):
    """Biases whose ``O = offset / s_out`` is finite beyond 2**22 or overflows to ``+-inf`` (so
    ``B`` is infinite) saturate to 0 or 255 with their sign, on every form of step 5."""
    channels = 48
    gamma = torch.linspace(0.5, 2.0, channels)
    norm, in_point, out_point = _ln_case(channels, (1, 2), gamma, "uint8", 0.05)
    huge = torch.tensor([3e38, -3e38, 1e6, -1e6, 2.0**22 * 0.05, -(2.0**22) * 0.05])
    norm.bias = huge.repeat(channels // huge.numel())
    out = _ln_check(
        norm, in_point, out_point, _ln_codes(16, channels, 121, seed=1), monkeypatch, form
    )
    assert (out[:, 0::2] == 255).all() and (out[:, 1::2] == 0).all()


@pytest.mark.parametrize("int64", [False, True])
def test_masked_pairs_add_the_saturated_exponential_to_the_row_sum(int64):
    """The tie above plus two masked pairs (Swin) at the top code: their saturated exponential
    ``int_exp(n x0)`` joins the row sum (as in the integer model), which lifts the maximum's
    ``S / e`` past 2.5: ``y = 3``, ``r = 2``, by Python integers; the masked pairs get 0."""
    attn = _attn(0.004, 117, 4, True, 6)
    attn.exact_float64 = not int64
    x0 = int(torch.floor(-0.6931 / attn.lis_point().scale))
    codes = np.array([[255, 255 + x0, 255 + x0, 255 + x0, 255, 255]], np.uint8)
    mask = np.array([[False, False, False, False, True, True]])
    out = _run(lambda ex, names: ex.log_int_softmax(names[0], attn, mask, 6), {"scores": codes})
    table = [int(v) for v in attn.lis_exp_table.tolist()]
    e = [table[0], table[-x0], table[-x0], table[-x0], table[kernels.MASKED], table[kernels.MASKED]]
    assert e[-1] > 0
    expected = [_python_probability(round(Fraction(sum(e), v)), 16) for v in e]
    assert out.tolist() == [expected]
    assert expected[0] == 2.0**13  # r = 2 (without the masked pairs' sum: the tie, r = 1)
