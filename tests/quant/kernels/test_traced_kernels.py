"""Under torch.compile the integer LayerNorm and Log-Int-Softmax compute the eager bits.

Inductor fuses their elementwise chains; only the order-dependent float32 row sums run as an opaque
op calling the eager reductions. These tests compile the kernels (``fullgraph``, static shapes) and
compare their bits with the eager fast kernels and with the plain formulas of
fqvit_pl.quant.functional.
The elementwise operations whose result could depend on the implementation (``log2`` before a
floor, powers of two) are checked exhaustively where they could differ.
"""

import torch
from kernel_inputs import assert_bits_equal, ln_inputs, scores

from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import get_bit_type, kernels
from fqvit_pl.quant.kernels import tables, traced

UINT4 = get_bit_type("uint4")


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def powers_of_two_neighbourhoods(ulps: int = 2048) -> torch.Tensor:
    """Every positive normal float32 within ``ulps`` steps of a power of two (the only inputs where
    ``floor(log2 a)`` of a 1-ulp-accurate ``log2`` can differ between implementations)."""
    exponents = torch.arange(-125, 127, dtype=torch.int32)
    centers = (exponents + 127) << 23  # the bit patterns of 2**e
    steps = torch.arange(-ulps, ulps + 1, dtype=torch.int32)
    bits = (centers[:, None] + steps[None, :]).reshape(-1)
    return bits.view(torch.float32)


def test_floor_log2_is_the_same_in_every_implementation():
    """Eager's vector and scalar ``log2`` agree after the floor (the thresholds table relies on it)."""
    a = powers_of_two_neighbourhoods()
    floor_log2 = compiled(lambda t: torch.floor(torch.log2(t)))
    eager = torch.floor(torch.log2(a))
    # eager's vectorized loop and its scalar tail (a one-element tensor takes the scalar path)
    scalar = torch.stack([torch.floor(torch.log2(v.reshape(1)))[0] for v in a[::997]])
    assert torch.equal(scalar, eager[::997])
    assert torch.equal(floor_log2(a), eager)
    assert torch.equal(floor_log2(a[5:]), eager[5:])  # shifted: other elements in the vector tails


def test_powers_of_two_from_bits_are_exp2():
    k = torch.arange(-126.0, 128.0)
    exact = torch.tensor([2.0 ** int(v) for v in k.tolist()]).float()  # Python's exact doubles
    assert torch.equal(torch.exp2(k), exact)  # what the eager kernels use
    assert torch.equal(tables.power_of_two(k), exact)
    assert torch.equal(compiled(tables.power_of_two)(k), exact)


def test_lis_outputs_from_codes_are_the_table():
    codes = torch.arange(512, dtype=torch.int32)
    for bits in (1, 4, 6):
        assert_bits_equal(traced.lis_from_keys(codes, bits), tables.lis_table(bits, codes.device))
        assert_bits_equal(
            compiled(lambda c: traced.lis_from_keys(c, bits))(codes),
            tables.lis_table(bits, codes.device),
        )


def test_compiled_int_layernorm_is_eager():
    kernel = compiled(lambda *args: kernels.int_layernorm(*args))
    for shape, channels_in, per_tensor in [
        ((4, 197, 192), 192, False),
        ((2, 49, 384), 96, False),
        ((3, 10, 96), 96, True),
    ]:
        x, s_in, gamma, beta = ln_inputs(shape, channels_in, seed=21, per_tensor=per_tensor)
        x[0, 0] = x[0, 0, 0]  # a constant token: no epsilon, as published (NaN, in every path)
        s_out = torch.tensor(0.0213)
        with torch.no_grad():
            eager = kernels.int_layernorm(x, s_in, s_out, gamma, beta)
            got = kernel(x, s_in, s_out, gamma, beta)
        assert_bits_equal(got, eager)
        assert_bits_equal(got, Fq.int_layernorm(x, s_in, s_out, gamma, beta))


def test_compiled_kernels_are_eager_on_many_random_inputs():
    """Rare last-bit differences (a ``sqrt`` of another math library, say) show on enough inputs."""
    layernorm = compiled(lambda *args: kernels.int_layernorm(*args))
    softmax = torch.compile(
        lambda a, b: kernels.log_int_softmax(a, b, UINT4), fullgraph=True, dynamic=False
    )
    g = torch.Generator().manual_seed(25)
    for seed in range(40):
        x, s_in, gamma, beta = ln_inputs((8, 197, 192), 192, seed=100 + seed)
        s_out = torch.rand((), generator=g) * 0.05 + 0.005
        scores_x, s = scores(
            (2, 3, 197, 197), float(torch.rand((), generator=g)) * 0.1 + 0.002, seed=200 + seed
        )
        with torch.inference_mode():
            assert_bits_equal(
                layernorm(x, s_in, s_out, gamma, beta),
                kernels.int_layernorm(x, s_in, s_out, gamma, beta),
            )
            assert_bits_equal(softmax(scores_x, s), kernels.log_int_softmax(scores_x, s, UINT4))


def test_compiled_int_layernorm_sums_squares_in_eager_order():
    """Sums of squares far above 2**24, where float32 rounding depends on the summation order."""
    x, s_in, gamma, beta = ln_inputs((8, 50, 768), 768, seed=22)
    s_in.fill_(0.004 * 8)  # every channel in units of s_min * 8: squares up to 2**22
    s_in[0] = 0.004
    x = torch.round(x / s_in) * s_in
    assert float((torch.round(x / 0.004) ** 2).sum(-1).max()) > 2**26
    kernel = compiled(lambda *args: kernels.int_layernorm(*args))
    with torch.inference_mode():
        assert_bits_equal(
            kernel(x, s_in, torch.tensor(0.05), gamma, beta),
            kernels.int_layernorm(x, s_in, torch.tensor(0.05), gamma, beta),
        )


def test_compiled_log_int_softmax_is_eager():
    for bit_type, scales in ((UINT4, (2.5e-3, 0.0173, 0.11)), (get_bit_type("uint8"), (0.0173,))):
        kernel = compiled(lambda a, b: kernels.log_int_softmax(a, b, bit_type))
        for scale in scales:  # one graph: the scale is an input
            x, s = scores((2, 3, 197, 197), scale, seed=23)
            x[0, 0, :5] = x.min()  # rows whose exponentials underflow to 0 (y infinite: output 0)
            with torch.no_grad():
                eager = kernels.log_int_softmax(x, s, bit_type)
                got = kernel(x, s)
            assert_bits_equal(got, eager)
            assert_bits_equal(got, Fq.log_int_softmax(x, s, bit_type))


def test_row_ops_are_the_eager_reductions():
    x = torch.randint(-2040, 2041, (3, 7, 385)).float()
    s_min = torch.tensor(0.013)
    mean, std = torch.ops.fqvit.layernorm_row_stats(x, x * x, s_min)
    assert_bits_equal(mean, x.mean(-1, keepdim=True) * s_min)
    assert_bits_equal(
        std,
        (s_min / 385)
        * torch.sqrt(385 * (x * x).sum(-1, keepdim=True) - x.sum(-1, keepdim=True) ** 2),
    )
    e = torch.floor(torch.rand(3, 7, 385) * 2**30)
    e[0, 0, :3] = 0.0  # y infinite
    assert_bits_equal(
        torch.ops.fqvit.inverse_probabilities(e), torch.round(e.sum(-1, keepdim=True) / e)
    )
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.fqvit.layernorm_row_stats.default, (x, x * x, s_min), test_utils=checks
    )
    torch.library.opcheck(torch.ops.fqvit.inverse_probabilities.default, (e,), test_utils=checks)


def test_layernorm_power_is_the_log2_formula_for_every_float():
    """Every float within 3000 of a power of two (where ``floor(log2)`` could differ from the exponent),
    random floats of every magnitude, 0, subnormals and inf."""
    exponents = torch.arange(-126, 128, dtype=torch.int32)
    steps = torch.arange(-3000, 3001, dtype=torch.int32)
    bits = (((exponents + 127) << 23)[:, None] + steps[None, :]).reshape(-1)
    bits = bits[(bits >= 0) & (bits <= 0x7F800000)]
    g = torch.Generator().manual_seed(24)
    magnitudes = 10.0 ** torch.randint(-44, 39, (200_000,), generator=g).float()
    a = torch.cat(
        [
            bits.view(torch.float32),
            torch.rand(200_000, generator=g) * magnitudes,
            torch.tensor([0.0, 1e-45, 1e-39, float("inf")]),
        ]
    )
    assert tables.floor_log2_thresholds(a.device) is not None
    for n_bits in (7, 3, 20):
        expected = torch.exp2(torch.clamp(n_bits - torch.floor(torch.log2(a)), 0, 31))
        assert torch.equal(tables.layernorm_power(a, n_bits), expected)
