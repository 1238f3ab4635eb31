"""The pruned OMSE search (fqvit_pl.quant.kernels.omse_pruning) against the full search it reproduces.

Expected values come from the full search (``functional.omse_candidate_errors``, itself checked
against an independent NumPy transcription in tests/quant/test_functional.py) or from exact float64/integer
arithmetic here, never from the code under test.
"""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fqvit_pl.quant import OmseObserver, get_bit_type
from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant.kernels import omse_pruning as S
from fqvit_pl.quant.reduce import DistributedReducer

UINT8, UINT4 = get_bit_type("uint8"), get_bit_type("uint4")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` float32 values of one of the shapes that calibration meets (and some it should survive)."""
    g = _gen(seed)
    z = torch.randn(n, generator=g)
    if kind == "normal":
        return z * 0.7 + 0.1
    if kind == "cubed":  # heavy tails: the range is set by a few outliers
        return z**3
    if kind == "gelu":
        return torch.nn.functional.gelu(z * 2)
    if kind == "softmax":  # in [0, 1], most of the mass near 0
        return torch.softmax(
            z.reshape(-1, 1) if n < 8 else z.reshape(-1, math.gcd(n, 64)), dim=-1
        ).reshape(-1)
    if kind == "duplicates":  # few distinct values, each many times
        return torch.linspace(-1.3, 2.9, 37)[torch.randint(0, 37, (n,), generator=g)]
    if kind == "constant":
        return torch.full((n,), 0.8125)
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "two_values":
        return torch.where(z > 0.3, torch.tensor(3.25), torch.tensor(-0.5))
    if kind == "integers":  # on the grid of the widest candidate: errors can be exactly 0
        return torch.randint(-40, 215, (n,), generator=g).float()
    if kind == "negative":
        return -(z.abs() + 0.05)
    if kind == "positive":
        return z.abs() * 3 + 1.0
    if kind == "tiny":  # scales clamp to eps; subnormal-range differences
        return z * 1e-6
    if kind == "huge":  # bins wider than 1: the float64 binning path
        return z * 3e6
    if (
        kind == "subnormal_neg"
    ):  # values next to 0 on both sides, where the binning's floor is delicate
        v = z * 1e-3
        v[: n // 3] = -torch.rand(n // 3, generator=g) * 1e-38
        return v
    raise ValueError(kind)


KINDS = [
    "normal",
    "cubed",
    "gelu",
    "softmax",
    "duplicates",
    "constant",
    "zeros",
    "two_values",
    "integers",
    "negative",
    "positive",
    "tiny",
    "huge",
    "subnormal_neg",
]


def _full(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bit_type=UINT8):
    """The full search: ``(errors, mins, maxs)`` of the 90 candidates."""
    mins, maxs = Fq.omse_candidates(lo, hi)
    with torch.no_grad():
        return Fq.omse_candidate_errors(x, mins, maxs, bit_type), mins, maxs


def _search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bit_type=UINT8, **kwargs):
    """The pruned search over the same 90 candidates."""
    mins, maxs = Fq.omse_candidates(lo, hi)
    with torch.no_grad():
        return S.omse_search(x, mins, maxs, bit_type, **kwargs)


def _bounds(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bit_type=UINT8):
    """The bounds of the pruned search, always computed (no small-tensor shortcut)."""
    scales, zps = Fq.asymmetric_qparams(*Fq.omse_candidates(lo, hi), bit_type)
    flat = x.reshape(-1)
    stats = S.bin_statistics(flat, float(flat.min()), float(flat.max()))
    assert stats is not None
    return S.error_bounds(stats, scales, zps, bit_type)


def _check(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bit_type=UINT8) -> tuple:
    """Bounds hold; the pruned choice is the full search's; returns (survivors, bound widths)."""
    errors, mins, maxs = _full(x, lo, hi, bit_type)
    b_lo, b_hi = _bounds(x, lo, hi, bit_type)
    assert (b_lo <= errors).all() and (errors <= b_hi).all(), (
        (b_lo > errors) | (errors > b_hi)
    ).nonzero()
    choice = _search(x, lo, hi, bit_type, min_numel=0)
    best = int(torch.argmin(errors))
    assert choice.index == best
    assert choice.survivors[best]
    return int(choice.survivors.sum()), (b_hi - b_lo) / errors.clamp(min=1e-300)


# ------------------------------------------------------------------------------------------------
# bounds and choice on many tensors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 1000, 40_000])
def test_bounds_hold_and_choice_is_the_full_search(kind, n):
    x = _data(kind, n, seed=n).reshape(1, -1)
    _check(x, x.min(), x.max())


@pytest.mark.parametrize("kind", ["normal", "cubed", "softmax", "integers", "negative"])
def test_running_range_wider_than_the_last_batch(kind):
    # The running min/max come from earlier batches: the candidates reach beyond the data.
    x = _data(kind, 20_000, seed=3).reshape(1, -1)
    span = float(x.max() - x.min()) + 1.0
    _check(x, x.min() - 0.7 * span, x.max() + 2.0 * span)


@pytest.mark.parametrize("kind", ["normal", "gelu", "softmax"])
def test_other_bit_widths(kind):
    x = _data(kind, 30_000, seed=5).reshape(1, -1)
    for bits in ("uint4", "uint6", "uint2"):
        _check(x, x.min(), x.max(), get_bit_type(bits))


@pytest.mark.parametrize("kind", ["normal", "cubed", "gelu"])
def test_large_tensor_prunes_to_few_exact_evaluations(kind):
    x = _data(kind, 2**20 + 12_344, seed=11).reshape(8, -1)  # above 2**20 elements, several rows
    survivors, widths = _check(x, x.min(), x.max())
    assert survivors <= 4
    assert float(widths.median()) < 1e-3  # the bounds are informative, not just valid


def test_bounds_are_tight_for_typical_activations():
    x = _data("gelu", 200_000, seed=2).reshape(1, -1)
    survivors, widths = _check(x, x.min(), x.max())
    assert survivors <= 3 and float(widths.median()) < 1e-4


def test_transposed_layout_as_channel_layout_returns():
    # channel_layout gives a transposed [C, n] view; the full search flattens it channel-major.
    tokens = _data("cubed", 3 * 4000 * 6, seed=4).reshape(3, 4000, 6)
    x = Fq.channel_layout(tokens)
    assert not x.is_contiguous()
    _check(x, x.min(), x.max())


# ------------------------------------------------------------------------------------------------
# ties


def test_tie_keeps_the_first_candidate():
    for x in (torch.zeros(1, 50_000), torch.full((1, 50_000), -3.5), torch.full((1, 30_000), 2.0)):
        errors, mins, maxs = _full(x, x.min(), x.max())
        assert bool((errors == errors[0]).all())  # every candidate ties
        choice = _search(x, x.min(), x.max(), UINT8, min_numel=0)
        assert choice.index == 0


def test_exact_tie_between_distinct_candidates_keeps_the_first():
    # Even integers on [0, 255]: candidate 0 (scale 1) and candidate 50 (scale 0.5) both represent
    # every value exactly, so both errors are 0: two different (scale, zero point) pairs tie.
    x = (torch.randint(0, 51, (1, 40_000), generator=_gen(2)) * 2).float()
    lo, hi = torch.tensor(0.0), torch.tensor(255.0)
    errors, _, _ = _full(x, lo, hi)
    assert errors[0] == 0 and errors[50] == 0
    choice = _search(x, lo, hi, UINT8, min_numel=0)
    assert choice.index == 0 and bool(choice.survivors[50])


# ------------------------------------------------------------------------------------------------
# the exact evaluation of survivors


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1000, 5000, 40_000, 2**20 + 3])
def test_selected_errors_are_the_full_search_bits(n, threads):
    x = _data("cubed", n, seed=n).reshape(1, -1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full, mins, maxs = _full(x, x.min(), x.max())
        for select in (
            [0],
            [89],
            [88, 89],
            [7, 8],
            [3, 40, 41, 87],
            list(range(0, 90, 9)),
            [5, 6, 7, 8, 9, 10, 11, 12],
        ):
            with torch.no_grad():
                part = S.survivor_errors(x, mins, maxs, UINT8, select)
            for i in select:
                assert part[i].view(torch.int64) == full[i].view(torch.int64), (n, select, i)
            finite = torch.isfinite(part)
            assert torch.equal(part[finite], full[finite]) and bool(
                (part[~finite] == math.inf).all()
            )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_row_sums_do_not_depend_on_the_other_rows(threads):
    # What lets survivor_errors put 2..8 survivors in one chunk of their own: the
    # float64 row sum of a [R, n] tensor gives each row the same bits for every R >= 2 (a single row
    # is summed in another order once it is split across threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = _gen(0)
        for n in [1, 31, 1000, 16385, 32768, 65537, 300_001, 1_210_368]:
            rows = (
                torch.randn(8, n, generator=g, dtype=torch.float64) ** 2
                * torch.logspace(-3, 3, 8, dtype=torch.float64)[:, None]
            )
            reference = rows.sum(dim=1)
            for r in range(2, 9):
                for pick in ([*range(r)], [*range(8 - r, 8)], [0, 7, *range(1, r - 1)]):
                    got = rows[pick].contiguous().sum(dim=1)
                    assert torch.equal(got.view(torch.int64), reference[pick].view(torch.int64)), (
                        n,
                        pick,
                    )
    finally:
        torch.set_num_threads(previous)


def test_selection_in_the_autograd_path():
    x = _data("normal", 3000, seed=1).reshape(1, -1).double()  # float64 data: the out-of-place path
    full, mins, maxs = _full(x, x.min().float(), x.max().float())
    with torch.no_grad():
        part = S.survivor_errors(x, mins, maxs, UINT8, [10, 11])
        single = S.survivor_errors(x, mins, maxs, UINT8, [10])
    assert torch.equal(part[10:12], full[10:12]) and int(torch.isfinite(part).sum()) == 2
    assert (
        torch.equal(single[8:16], full[8:16]) and int(torch.isfinite(single).sum()) == 8
    )  # its own chunk


def test_wide_bit_types_fall_back_to_the_full_search():
    x = _data("normal", 20_000, seed=3).reshape(1, -1)
    uint12 = get_bit_type("uint12")
    errors, _, _ = _full(x, x.min(), x.max(), uint12)
    choice = _search(x, x.min(), x.max(), uint12, min_numel=0)
    assert choice.index == int(torch.argmin(errors)) and bool(choice.survivors.all())


# ------------------------------------------------------------------------------------------------
# the pieces the proof rests on


def _check_element(x: float, lo_: float, hi_: float) -> None:
    """The binning invariant of one element, in exact rational arithmetic."""
    from fractions import Fraction

    stats = S.bin_statistics(torch.tensor([x], dtype=torch.float32), lo_, hi_, max_bin_bits=16)
    (b,) = stats.count.nonzero().reshape(-1).tolist()
    assert int(stats.count[b]) == 1
    f, F = int(stats.frac[b]), stats.frac_bits
    rho = Fraction(float(np.float32(x))) / Fraction(2) ** stats.exponent - stats.first - b
    eta = Fraction(S.ETA)
    assert Fraction(f, 2**F) - eta <= rho <= Fraction(f + 1, 2**F) + eta, (x, b, f, float(rho))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e7, 1e-30])
def test_binning_invariant_on_adversarial_values(scale):
    base = (torch.randn(10_000, generator=_gen(7)) * scale).float()
    lo_, hi_ = float(base.min()), float(base.max())
    w = 2.0 ** S.bin_statistics(base[:1], lo_, hi_, max_bin_bits=16).exponent
    k = torch.arange(-8, 8, dtype=torch.float64)
    grid = torch.clamp(k * w + float(base.median()), lo_, hi_).float()
    values = torch.cat(
        [
            grid,
            torch.nextafter(grid, torch.full_like(grid, -math.inf)),
            torch.nextafter(grid, torch.full_like(grid, math.inf)),
            torch.tensor([lo_, hi_, 0.0, -0.0, -1e-45, -1e-40, -1e-38, -1e-30, 1e-45, 1e-40]),
        ]
    ).clamp(lo_, hi_)
    for v in values.tolist():
        _check_element(v, lo_, hi_)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e7, 1e-30])
def test_binning_counts_and_fractions(scale):
    x = (torch.randn(100_000, generator=_gen(8)) * scale).float()
    lo_, hi_ = float(x.min()), float(x.max())
    stats = S.bin_statistics(x, lo_, hi_, block=1000)  # several blocks
    t = x.numpy().astype(np.float64) * 2.0**-stats.exponent  # exact
    j = np.floor(t).astype(np.int64) - stats.first
    assert np.array_equal(stats.count.numpy(), np.bincount(j, minlength=stats.count.numel()))
    F = stats.frac_bits
    exact = np.bincount(j, weights=(t - np.floor(t)) * 2.0**F, minlength=stats.count.numel())
    got = stats.frac.numpy().astype(np.float64)
    counts = stats.count.numpy()
    assert (got <= exact + 1e-6 * exact + 1e-3).all() and (
        got >= exact - counts * (1 + 1e-6) - 1e-3
    ).all()


@pytest.mark.parametrize("center", [0.0, 1.0, -3.0, 1000.0, -1e6])
def test_binning_far_from_zero(center):
    # Narrow data far from 0: first * 2**F reaches past 2**52 (the trunc path) or not (the magic-number path).
    x = (torch.randn(50_000, generator=_gen(12)) * 1e-3 + center).float()
    lo_, hi_ = float(x.min()), float(x.max())
    stats = S.bin_statistics(x, lo_, hi_, block=4096)
    t = x.numpy().astype(np.float64) * 2.0**-stats.exponent  # exact
    j = np.floor(t).astype(np.int64) - stats.first
    assert np.array_equal(stats.count.numpy(), np.bincount(j, minlength=stats.count.numel()))
    F = stats.frac_bits
    exact = np.bincount(j, weights=(t - np.floor(t)) * 2.0**F, minlength=stats.count.numel())
    got, counts = stats.frac.numpy().astype(np.float64), stats.count.numpy()
    assert (got <= exact + 1e-6 * exact + 1e-3).all() and (
        got >= exact - counts * (1 + 1e-6) - 1e-3
    ).all()
    for v in [lo_, hi_, float(x[0]), float(np.nextafter(np.float32(lo_), np.float32(np.inf)))]:
        _check_element(v, lo_, hi_)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e7, 1e-30])
def test_boundary_edges_enclose_their_bins(scale):
    # Every element x of bin b (exact floor(x / w) - first) has L(b) <= x <= U(b + 1); edges are monotone.
    x = (torch.randn(20_000, generator=_gen(11)) * scale + 0.3 * scale).float()
    lo_, hi_ = float(x.min()), float(x.max())
    stats = S.bin_statistics(x, lo_, hi_, max_bin_bits=12)
    bins = stats.count.numel()
    lo_edge, hi_edge = S._boundary_edges(stats, torch.arange(bins + 1))
    assert lo_edge.dtype == hi_edge.dtype == torch.float32
    assert (lo_edge[1:] >= lo_edge[:-1]).all() and (hi_edge[1:] >= hi_edge[:-1]).all()
    t = x.numpy().astype(np.float64) * 2.0**-stats.exponent  # exact
    j = torch.from_numpy(np.floor(t).astype(np.int64) - stats.first)
    assert (lo_edge[j] <= x).all() and (x <= hi_edge[j + 1]).all()
    # and they are close: within a float32 ulp or two of the bin boundaries
    w = 2.0**stats.exponent
    assert torch.allclose(
        lo_edge.double(),
        (torch.arange(bins + 1) + stats.first).double() * w,
        rtol=2**-21,
        atol=w * 2**-20,
    )


def test_magic_rounding_is_torch_round():
    # Every half-integer and its float32 neighbours in the range the codes use, plus far values.
    k = torch.arange(-(2**13), 2**13, dtype=torch.float32) / 2
    v = torch.cat(
        [
            k,
            torch.nextafter(k, torch.full_like(k, math.inf)),
            torch.nextafter(k, torch.full_like(k, -math.inf)),
            torch.tensor(
                [2.0**22, -(2.0**22), 2.0**22 + 1, 1e30, -1e30, math.inf, -math.inf, -0.0, 0.0]
            ),
        ]
    )
    v = torch.cat([v, torch.randn(100_000, generator=_gen(1)) * 300])
    for bt in (UINT8, UINT4, get_bit_type("uint16")):
        got = S._round_half_even(v.clone()).clamp_(bt.lower, bt.upper)
        assert torch.equal(got, torch.round(v).clamp(bt.lower, bt.upper))


def test_codes_match_the_full_search():
    x = _data("cubed", 10_000, seed=9)
    scales, zps = Fq.asymmetric_qparams(*Fq.omse_candidates(x.min(), x.max()), UINT8)
    points = x.reshape(1, -1).expand(90, -1).contiguous()
    codes = S._codes(points, scales[:, None], zps[:, None], UINT8)
    expected = torch.clamp(torch.round(x.reshape(1, -1) / scales[:, None] + zps[:, None]), 0, 255)
    assert torch.equal(codes, expected)
    g = S._dequantize(codes, scales[:, None], zps[:, None])
    ref = Fq.fake_quantize(x.reshape(1, -1), scales[:, None], zps[:, None], UINT8)
    assert torch.equal(g, ref)


# ------------------------------------------------------------------------------------------------
# the observer


@pytest.mark.parametrize("shape", [(70_000,), (300, 96), (4, 77, 64), (2, 24, 20, 20)])
def test_observer_matches_the_full_search(shape):
    g = _gen(len(shape))
    first = torch.randn(shape, generator=g) * 3
    last = torch.randn(shape, generator=g) ** 3
    obs = OmseObserver(UINT8, shape[1] if len(shape) == 4 else shape[-1], False)
    obs.update(first)
    obs.update(last)
    scale, zp = obs.compute_qparams(last)
    channels = obs._layout(last).float()
    errors, mins, maxs = _full(channels, obs.min_val, obs.max_val)
    best = torch.argmin(errors)
    s_ref, z_ref = Fq.range_to_qparams(mins[best], maxs[best], UINT8)
    assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)


# ------------------------------------------------------------------------------------------------
# several processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shards(world: int) -> list:
    x = _data("cubed", 6 * 20_000, seed=21).reshape(6, -1)
    x[0, :5] = torch.tensor([30.0, -9.0, 12.0, 0.0, -0.0])
    return [x[r * (6 // world) : (r + 1) * (6 // world)].reshape(1, -1) for r in range(world)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reducer = DistributedReducer()
        shard = _shards(world)[rank]
        lo, hi = torch.tensor(-10.0), torch.tensor(31.0)
        results = {}
        for name, min_numel in (("pruned", 0), ("small", 10**9)):
            results[name] = _search(
                shard, lo, hi, UINT8, reducer=reducer, min_numel=min_numel
            ).index
        errors, _, _ = _full(shard, lo, hi)
        results["full"] = int(torch.argmin(reducer.reduce(errors, "sum")))
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_processes_choose_what_the_distributed_full_search_chooses(world, tmp_path):
    mp.start_processes(
        _worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    for result in got:
        assert result["pruned"] == result["full"] == result["small"] == got[0]["full"]
