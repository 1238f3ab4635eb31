"""The OMSE search of §5, pruned exactly: the full search's choice at a fraction of its cost.

The full search (:func:`~fqvit_pl.quant.functional.omse_candidate_errors`) fake-quantizes the last
batch with each of the 90 candidates and sums the squared errors in float64: 90 passes over the
tensor. Here one cheap pass gives every candidate a rigorous interval ``lo_i <= E_i <= hi_i`` around
the very float64 number ``E_i`` the full search computes (reduced over processes as it is); a
candidate with ``lo_i > min_j hi_j`` cannot be a minimizer. Usually one candidate survives and no
exact error is computed at all; otherwise the survivors' errors are computed by the full search's
own code (``select``), bit for bit its numbers, and the first minimum among them is its choice.

Proof (details at each function):

1. Binning (:func:`bin_statistics`). Bins have a power-of-two width ``w = 2**e``. For float32 ``x``,
   ``V = (x / w - first) 2**F`` is formed in float64 with one rounding (``x 2**(F - e)`` is exact,
   ``first 2**F`` is exact, ``0 <= V < 2**(19 + F)``: error ``<= 2**(F - 34)``); ``U = trunc(V) >= 0``,
   or (faster, no float-to-integer conversion) ``U = round(fl(V - 1/2)) >= 0`` read off the bits of
   ``fl(V - 1/2) + 1.5 * 2**52`` (``|U - (V - 1/2)| <= 1/2 + 2**(F - 34)``: the same ``U <= V <= U + 1``
   up to the rounding), gives the bin ``U >> F`` and the fraction field ``U & (2**F - 1)``. So every
   element counted in bin ``b`` has ``x = w (first + b + rho)`` with ``rho`` within
   ``[f 2**-F - ETA, (f + 1) 2**-F + ETA]`` (``ETA = 2**-34``). Counts and fraction fields are summed in int64: exact, in any order.
2. One candidate (:func:`error_bounds`), scale ``s`` and zero point ``z``. Its code
   ``q(x) = clamp(round(x / s + z))`` in float32 is non-decreasing in ``x`` (each IEEE step is), and so
   is ``g(q) = (q - z) * s``. Evaluated with the full search's float32 operations at float32 edges
   ``L <= x <= U`` of a run of bins (``ETA``-widened, rounded outwards), it bounds the codes there:
   ``q(L) <= q(x) <= q(U)``. Around each of the ``levels`` rounding thresholds ``(k + 1/2 - z) s`` a
   small "block" of bins is set apart; each run of bins between blocks (a "segment") is checked to
   have ``q(L) == q(U)``: one code, one ``g``. A segment's ``sum (g - x)**2`` is a quadratic in the
   bin moments (count, sum of ``b``, sum of ``b**2``: exact integers from int64 prefix sums) and in
   ``sum rho``, ``sum b rho`` and ``sum rho**2`` (intervals from the fraction sums); it is evaluated in
   float64 with a generous bound on its rounding (some 30 roundings, each within ``2**-53`` of a
   magnitude at most about ``sum (|h| + beta + 1)**2``; the margin is ``2**-46`` of that). In a block,
   each element's error lies between the smallest and the largest ``(g_k - x)**2`` over the codes
   ``k`` in ``[q(L), q(U)]`` and ``x`` in ``[L, U]``. An empty piece has all moments (and block
   count) 0, so its terms are exactly 0 without any masking, unless they overflow to ``inf``/``nan``.
   A candidate whose blocks overlap, whose segment check fails, or whose bounds come out
   ``inf``/``nan`` gets ``[0, inf]``.
3. From real sums to the full search's numbers: its ``d = fl32(g - x)`` is ``(g - x)(1 + delta)`` with
   ``|delta| <= 2**-24`` (or an absolute ``2**-150`` below float32's normal range); ``d**2`` is exact
   in float64, and its float64 sum of the ``n`` non-negative squares (any summation tree) is within
   ``(n - 1) 2**-53`` relative of their real sum. The bounds are widened by these factors
   (generously): ``lo_i <= E_i <= hi_i`` for the float64 value itself.
4. Processes (:func:`omse_search`): each bounds its own batch; the all-reduced sums of ``lo`` and of
   ``hi`` are widened by ``2**-30`` relative (a float64 sum over up to ``2**20`` ranks rounds less, in
   any order), so they bound the all-reduced ``E_i``. Any minimizer ``m`` of ``E`` has
   ``lo_m <= E_m <= E_j <= hi_j`` for all ``j``: ``m`` is in ``S = {i: lo_i <= min_j hi_j}``; the ranks
   take the union of their ``S`` (a max-reduce, exact), so they agree on it whatever the rounding.
5. The survivors' errors come from ``omse_candidate_errors(select=S)``, bit for bit the full
   search's per-rank errors; all-reduced in the full-length vector (the other entries are ``+inf``)
   they are, element for element, the full search's all-reduced errors. Their first minimum, in
   index order, is the full search's ``argmin`` (every minimizer is in ``S``).

Cost: about one candidate's worth of passes for the binning (int64 ops and scatter-adds on
cache-sized blocks, on the calling thread), a few milliseconds for the bounds, and, for the few
points with several survivors, one ``[len(S), n]`` chunk of the full search.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .bit_type import BitType
from .functional import asymmetric_qparams, omse_candidate_errors
from .reduce import LocalReducer, StatReducer

__all__ = [
    "BinnedStats",
    "OmseChoice",
    "bin_statistics",
    "error_bounds",
    "candidate_qparams",
    "omse_search",
]

#: Elements per block of the binning pass: torch runs an op on fewer than 32768 elements on the
#: calling thread, so the blocks stay in cache and never wait on an OpenMP team (on a busy machine a
#: parallel op on a small tensor can wait a whole time slice).
_BLOCK = 32767
#: The packed int64 histogram is unpacked every 2**24 elements (the fields' widths depend on it).
_PACK_BITS = 24
#: The finest grid: 2**18 bins over the data's range.
_MAX_BIN_BITS = 18
#: Below this many elements (or past this many levels) the full search is cheaper than bounds.
_MIN_NUMEL = 16384
_MAX_LEVELS = 1023
#: 1.5 * 2**23: ``(v + M) - M`` rounds a float32 ``|v| <= 2**22`` to the nearest integer, ties to even.
_ROUND_MAGIC = 12582912.0
_U = 2.0**-53  # float64 unit roundoff
#: 1.5 * 2**52 and its bits: ``(v + _MAGIC)`` rounds a float64 ``-1/2 <= v < 2**51`` to an integer, ties to even.
_MAGIC = 6755399441055744.0
_MAGIC_BITS = 0x4338000000000000


@dataclass(frozen=True)
class BinnedStats:
    """Exact integer statistics of a float32 tensor on a grid of ``w = 2**exponent``-wide bins.

    Element ``x`` is counted in bin ``b`` (``0 <= b < count.numel()``) with a fraction field ``f`` in
    ``[0, 2**frac_bits)`` such that ``rho = x / w - first - b`` lies in
    ``[f 2**-F - ETA, (f + 1) 2**-F + ETA]`` (``F = frac_bits``; so ``-ETA <= rho <= 1 + ETA``).
    ``count[b]`` counts the elements of bin ``b`` and ``frac[b]`` sums their ``f``.
    """

    exponent: int
    first: int
    frac_bits: int
    count: Tensor  # [bins] int64
    frac: Tensor  # [bins] int64
    numel: int


#: Rounding margin of the binning, in bins (see :func:`bin_statistics`).
ETA = 2.0**-34


@dataclass(frozen=True)
class OmseChoice:
    """The result of :func:`omse_search`: the chosen candidate and what it took.

    ``index`` is the full search's ``argmin``; ``mins``/``maxs`` ``[K]`` are the candidate ranges
    (as the full search forms them); ``survivors`` ``[K]`` bool marks the candidates the bounds kept;
    ``lo``/``hi`` ``[K]`` float64 are the (reduced) bounds.
    """

    index: int
    mins: Tensor
    maxs: Tensor
    survivors: Tensor
    lo: Tensor
    hi: Tensor


_WORKSPACE = threading.local()


def _reused(
    name: str, numel: int, device: torch.device, make: Callable[[int], Tensor], least: int
) -> Tensor:
    """The first ``numel`` elements of a per-thread, per-device tensor ``make(k)`` (``k >= least``), kept."""
    cache = _WORKSPACE.__dict__.setdefault(name, {})
    tensor = cache.get(device)
    if tensor is None or tensor.numel() < numel:
        tensor = cache[device] = make(max(numel, least))
    return tensor[:numel]


def _workspace(numel: int, device: torch.device) -> Tensor:
    """A reused int64 scratch tensor of at least ``numel`` elements (fresh MB-sized tensors cost page faults)."""
    return _reused(
        "scratch",
        numel,
        device,
        lambda k: torch.empty(k, dtype=torch.int64, device=device),
        1 << 20,
    )


def _arange(numel: int, device: torch.device) -> Tensor:
    """``torch.arange(numel)`` (int64), cached: a reused, never written prefix of a longer one."""
    return _reused(
        "ramp", numel, device, lambda k: torch.arange(k, dtype=torch.int64, device=device), 1 << 18
    )


def _flat_any_order(x: Tensor) -> Tensor:
    """The elements of ``x`` as a 1-D tensor, in whatever order avoids a copy (binning ignores order)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 2 and x.t().is_contiguous():  # channel_layout's [C, n] view of a [n, C] tensor
        return x.t().view(-1)
    return x.reshape(-1)


def bin_statistics(
    flat: Tensor, lo: float, hi: float, *, max_bin_bits: int = _MAX_BIN_BITS, block: int = _BLOCK
) -> BinnedStats | None:
    """Bin the float32 values ``flat`` (all in ``[lo, hi]``) on about ``2**max_bin_bits`` bins.

    Per element: ``V = (x / w - first) 2**F`` is formed in float64 (``x 2**(F - e)`` exactly, then one
    rounding of the subtraction: ``|error| <= 2**(F - 34)`` as ``0 <= V < 2**(19 + F)``), ``U = trunc``
    of it (``U >= 0``), bin ``U >> F`` and fraction field ``U & (2**F - 1)``: hence the ``ETA = 2**-34``
    margin of :class:`BinnedStats`. Where ``first 2**F + 1/2`` is exact (``|first 2**F| < 2**52``, the
    usual case) the subtraction is of ``first 2**F + 1/2`` instead (real result in ``[-1/2, 2**(19 + F))``,
    the same rounding bound, and ``>= -1/2`` after rounding, -1/2 being a float64), and adding
    ``1.5 * 2**52`` rounds it to the integer ``U``, ties to even (spacing 1 in ``[2**52, 2**53)``):
    ``V - 1/2 - 2**(F - 34) - 1/2 <= U <= V - 1/2 + 2**(F - 34) + 1/2``, i.e. ``V`` within
    ``[U, U + 1]`` widened by ``2**(F - 34)``, as with ``trunc``; ``U >= 0`` (-1/2 rounds to the even 0).
    The double's bits are ``bits(1.5 * 2**52) + U``, whose low 48 bits are 0 and ``U < 2**48``, so bin
    and fraction field come off them by a shift (minus ``bits(1.5 * 2**52) >> F``) and a mask. Count
    and fraction field are packed in one int64 and summed with ``scatter_add_``: integer sums, exact
    in any order. Returns ``None`` when the tensor is too large
    for exact int64 moments.
    """
    n = flat.numel()
    size_bits = max(n.bit_length(), 1)  # n < 2**size_bits
    pack_bits = min(
        size_bits, _PACK_BITS
    )  # a packed partial histogram covers < 2**pack_bits elements
    # Moments must fit int64 (with one bit to spare): count*b**2 sums < n 2**(2 bin_bits);
    # frac*b sums < n 2**(frac_bits + bin_bits); the packed frac field < 2**pack_bits 2**frac_bits.
    bin_bits = min(max_bin_bits, max(size_bits + 1, 16), (60 - size_bits) // 2)
    frac_bits = min(24, 62 - 2 * pack_bits, 60 - size_bits - bin_bits)
    if bin_bits < 8 or frac_bits < 4:
        return None
    count_shift = (
        62 - pack_bits
    )  # count field above the frac field: < 2**pack_bits * 2**count_shift = 2**62
    span = hi - lo
    exponent = math.frexp(span)[1] - bin_bits if span > 0 else math.frexp(max(abs(lo), 1e-30))[1]
    first = math.floor(
        lo / 2.0**exponent
    )  # python floats: exact (power-of-two scaling, far from underflow)
    bins = math.floor(hi / 2.0**exponent) - first + 2  # one spare bin: V may round up to the end
    flush_every = (
        1 << (pack_bits - 1) if n >= 1 << _PACK_BITS else n
    )  # < 2**pack_bits per packed histogram
    args = (bins, block, exponent, first, frac_bits, bin_bits, count_shift, flush_every)
    count, frac = _bin_blocks(flat, *args)
    return BinnedStats(exponent, first, frac_bits, count.clone(), frac.clone(), n)


def _bin_blocks(
    flat: Tensor,
    bins: int,
    block: int,
    exponent: int,
    first: int,
    frac_bits: int,
    bin_bits: int,
    count_shift: int,
    flush_every: int,
) -> tuple[Tensor, Tensor]:
    """The count and fraction-sum histograms of ``flat`` (see :func:`bin_statistics`): views of this thread's workspace."""
    n = flat.numel()
    device = flat.device
    packed = _workspace(3 * bins, device)
    count, frac, packed = packed[:bins], packed[bins : 2 * bins], packed[2 * bins :]
    count.zero_()
    frac.zero_()
    packed.zero_()
    m0 = max(min(block, n), 1)
    v_buf = torch.empty(m0, dtype=torch.float64, device=device)
    u_buf = torch.empty(m0, dtype=torch.int64, device=device)
    i_buf = torch.empty(m0, dtype=torch.int64, device=device)
    scale = 2.0 ** (frac_bits - exponent)
    direct = (
        0 <= frac_bits - exponent <= 126
    )  # x * scale is exact in float32 (a power of two, no underflow)
    offset = float(first) * 2.0**frac_bits  # exact in float64
    # U = round(fl(V - 1/2)) by the float64 "magic number": V - 1/2 + 1.5 * 2**52 lands in [2**52, 2**53),
    # spacing 1, so its bits are bits(1.5 * 2**52) + U (the low 48 bits of the former are 0): no
    # float-to-int64 conversion. Needs offset + 1/2 exact (|offset| < 2**52); else U = trunc(V).
    magic = abs(offset) < 2.0**52 and frac_bits + bin_bits + 2 <= 48
    magic_bin = _MAGIC_BITS >> frac_bits
    mask, one_count = (1 << frac_bits) - 1, 1 << count_shift
    since_flush = 0
    for start in range(0, n, block):
        xs = flat[start : start + block]
        m = xs.numel()
        if since_flush + m > flush_every:
            count.add_(packed >> count_shift)
            frac.add_(packed & (one_count - 1))
            packed.zero_()
            since_flush = 0
        since_flush += m
        v = v_buf[:m]
        if direct:
            torch.mul(xs, scale, out=v)
        else:
            v.copy_(xs).mul_(scale)
        idx = i_buf[:m]
        if magic:
            u = v.sub_(offset + 0.5).add_(_MAGIC).view(torch.int64)
            torch.bitwise_right_shift(u, frac_bits, out=idx).sub_(magic_bin)
        else:
            u = u_buf[:m].copy_(v.sub_(offset))  # truncation of a value >= 0: floor
            torch.bitwise_right_shift(u, frac_bits, out=idx)
        packed.scatter_add_(0, idx, u.bitwise_and_(mask).bitwise_or_(one_count))
    count.add_(packed >> count_shift)
    frac.add_(packed & (one_count - 1))
    return count, frac


def _round_half_even(v: Tensor) -> Tensor:
    """``torch.round`` of float32 ``v`` in place, for ``|v| <= 2**22`` (larger values move by at most 2).

    Adding ``1.5 * 2**23`` lands in ``[2**23, 2**24)``, where float32's spacing is 1, so the sum is
    rounded to an integer, ties to even; subtracting it back is exact. (torch.round on more than 2048
    elements forks an OpenMP team; this does not.)
    """
    return v.add_(_ROUND_MAGIC).sub_(_ROUND_MAGIC)


def _codes(points: Tensor, scales: Tensor, zero_points: Tensor, bit_type: BitType) -> Tensor:
    """The full search's integer code of float32 ``points`` ``[K, M]`` under ``scales``/``zero_points`` ``[K, 1]``."""
    # Same float32 operations as the full search (x / s + z), then its round and clamp: beyond
    # 2**22 the clamp decides whatever the rounding.
    v = torch.div(points, scales).add_(zero_points)
    return _round_half_even(v).clamp_(bit_type.lower, bit_type.upper)


def _dequantize(codes: Tensor, scales: Tensor, zero_points: Tensor) -> Tensor:
    """``(q - z) * s`` in float32, as the full search computes it."""
    return torch.sub(codes, zero_points).mul_(scales)


def _boundary_edges(stats: BinnedStats, boundary: Tensor) -> tuple[Tensor, Tensor]:
    """float32 edges at bin boundaries ``p`` (int64): ``L(p) <= x`` for every element counted in a bin
    ``>= p``, and ``x <= U(p)`` for every element counted in a bin ``< p``.

    Such elements have ``x / w >= first + p - ETA``, resp. ``x / w <= first + p + ETA``; the float64
    edges are widened by ``2 ETA`` times their magnitude in bins (far above their rounding), then
    rounded outwards to float32.
    """
    w = 2.0**stats.exponent
    j = (boundary + stats.first).double()
    pad = (j.abs() + 1.0).mul_(2 * ETA)
    lo64 = torch.sub(j, pad).mul_(w)
    hi64 = j.add_(pad).mul_(w)
    lo32, hi32 = lo64.float(), hi64.float()
    lo32 = torch.where(
        lo32.double() > lo64, torch.nextafter(lo32, lo32.new_full((), -math.inf)), lo32
    )
    hi32 = torch.where(
        hi32.double() < hi64, torch.nextafter(hi32, hi32.new_full((), math.inf)), hi32
    )
    return lo32, hi32


def error_bounds(
    stats: BinnedStats, scales: Tensor, zero_points: Tensor, bit_type: BitType
) -> tuple[Tensor, Tensor]:
    """Bounds ``lo <= E <= hi`` (``[K]`` float64 each) of the full search's float64 error sums ``E``.

    ``scales``/``zero_points`` ``[K]`` float32 are the candidates (as the full search forms them);
    ``stats`` bins the tensor the full search runs on. A candidate that cannot be bounded gets
    ``[0, inf]``. See the module docstring for the proof; the pieces are marked below.
    """
    device = stats.count.device
    K, n, bins, e, F = (
        scales.numel(),
        stats.numel,
        stats.count.numel(),
        stats.exponent,
        stats.frac_bits,
    )
    w = 2.0**e
    # Exclusive prefix sums (int64, exact) of count, count*b, count*b**2, frac, frac*b: P[:, k] = sum over bins < k.
    # No elementwise op here runs on more than _BLOCK elements (bins in blocks, boundaries by halves):
    # larger ones would fork an OpenMP team, which on a busy machine can wait a whole time slice.
    scratch = _workspace(6 * bins + 5, device)
    b, term, prefix = _arange(bins, device), scratch[:bins], scratch[bins:].view(5, bins + 1)
    blocks = [slice(start, min(start + _BLOCK, bins)) for start in range(0, bins, _BLOCK)]
    prefix[:, 0] = 0
    torch.cumsum(stats.count, 0, out=prefix[0, 1:])  # a 1-D scan runs on the calling thread
    for sl in blocks:
        torch.mul(stats.count[sl], b[sl], out=term[sl])
    torch.cumsum(term, 0, out=prefix[1, 1:])
    for sl in blocks:
        term[sl].mul_(b[sl])
    torch.cumsum(term, 0, out=prefix[2, 1:])
    torch.cumsum(stats.frac, 0, out=prefix[3, 1:])
    for sl in blocks:
        torch.mul(stats.frac[sl], b[sl], out=term[sl])
    torch.cumsum(term, 0, out=prefix[4, 1:])

    s32, z32 = scales.reshape(K, 1).float(), zero_points.reshape(K, 1).float()
    s64, z64 = s32.double(), z32.double()
    # Blocks: the bins within a margin of each real rounding threshold (k + 1/2 - z) s; the float32
    # threshold lies well inside the margin, and the checks below make that irrelevant for correctness.
    k = torch.arange(bit_type.lower, bit_type.upper, dtype=torch.float64, device=device)
    tau = (k + 0.5 - z64).mul_(s64)  # [K, T]
    margin = tau.abs().mul_(2.0**-20).add_(s64, alpha=2.0**-10)
    limit = float(bins + 2)

    def bin_of(v: Tensor) -> Tensor:
        # floor(v / w) - first, clamped into [-1, bins]; div_floor is exact here and runs without threads.
        scaled = torch.div(v.mul_(1.0 / w).sub_(stats.first), 1.0, rounding_mode="floor")
        return scaled.clamp_(-2.0, limit).to(torch.int64).clamp_(-1, bins)

    T = tau.shape[1]
    # Pieces: segment 0, block 0, segment 1, ..., block T-1, segment T, as bin ranges. bound[0] holds
    # the segments' starts, bound[1] their ends; block j is [bound[1][:, j], bound[0][:, j + 1]).
    bound = torch.empty(2, K, T + 1, dtype=torch.int64, device=device)
    starts, ends = bound[0], bound[1]
    starts[:, 0], ends[:, -1] = 0, bins
    ends[:, :-1] = bin_of(tau - margin).clamp_(
        0, bins
    )  # an empty block below the data is (0, -1) ...
    starts[:, 1:] = (
        bin_of(tau.add_(margin)).clamp_(-1, bins - 1).add_(1)
    )  # ... and above it (bins, bins - 1)
    # Blocks must be disjoint and in order; else the candidate is not bounded (never seen: s >> w).
    ordered = (ends >= starts).all(dim=1) & (starts[:, 1:] >= ends[:, :-1]).all(dim=1)
    if not bool(ordered.all()):  # keep the pieces well formed (those candidates are dropped)
        pos = torch.cummax(bound.permute(1, 2, 0).reshape(K, 2 * T + 2), dim=1).values
        bound.copy_(pos.view(K, T + 1, 2).permute(2, 0, 1))
    at = torch.empty(5, 2, K, T + 1, dtype=torch.int64, device=device)
    edges, codes = [], []
    for half in range(2):
        idx = (
            bound[half].reshape(-1).to(torch.int32)
        )  # index_select is several times faster with int32 indices
        for r in range(5):
            torch.index_select(prefix[r], 0, idx, out=at[r, half].view(-1))
        lo_edge, hi_edge = _boundary_edges(stats, bound[half])
        edges.append((lo_edge, hi_edge))
        codes.append((_codes(lo_edge, s32, z32, bit_type), _codes(hi_edge, s32, z32, bit_type)))
    sums = (
        at[:, 1] - at[:, 0]
    )  # [5, K, T+1]: per segment sums of count, count*b, count*b**2, frac, frac*b
    blk_n = (at[0, 0, :, 1:] - at[0, 1, :, :-1]).double()  # [K, T]: count per block
    # q is monotone: every element of a piece [p, p') has a code in [q(L(p)), q(U(p'))]; a segment has one code.
    c0, c1, c2, r0, r1 = sums.unbind(0)
    ordered &= ((codes[0][0] == codes[1][1]) | (c0 == 0)).all(dim=1)

    # Segment sum of (g - x)**2 / w**2 = sum (h - beta - rho)**2 with beta = b - b0, h = g / w - first - b0:
    # A = h^2 M0 - 2 h M1 + M2 (exact integer moments), cross = h X - Y with X = sum rho, Y = sum beta rho,
    # and Z = sum rho**2 in [max(X, 0)**2 / M0, (1 + ETA) X + 2 ETA M0] (-ETA <= rho <= 1 + ETA).
    # An empty segment has all moments 0, so both its bounds are 0 (or nan/inf, which drops the candidate).
    b0 = starts
    m1 = c1 - b0 * c0
    m2 = c2 - b0 * (c1 + m1)  # c2 - 2 b0 c1 + b0**2 c0
    qr = r1 - b0 * r0
    m0f, m1f, m2f = c0.double(), m1.double(), m2.double()
    h = _dequantize(codes[0][0], s32, z32).double().mul_(1.0 / w).sub_((b0 + stats.first).double())
    step = 2.0**-F
    # X in [x_lo, x_lo + m0 (step + 2 ETA)], Y in [y_lo, y_lo + m1 (step + 2 ETA)] (f 2**-F - ETA <= rho <= (f + 1) 2**-F + ETA).
    x_lo = r0.double().mul_(step).sub_(m0f, alpha=ETA)
    x_w = m0f * (step + 2 * ETA)
    y_lo = qr.double().mul_(step).sub_(m1f, alpha=ETA)
    y_w = m1f * (step + 2 * ETA)
    # quad - 2 cross over the box: quad - 2 h (x_lo + x_w / 2) + 2 y_lo -/+ |h| x_w, + [0, 2 y_w].
    base = (h * m0f).sub_(m1f, alpha=2.0).mul_(h).add_(m2f)  # quad
    base.sub_(torch.add(x_lo, x_w, alpha=0.5).mul_(h), alpha=2.0).add_(y_lo, alpha=2.0)
    spread_x = h.abs().mul_(x_w)
    # float64 rounding of all the above: far below 2**-46 of sum (|h| + beta + 1)**2, the size below.
    h1 = h.abs_().add_(1.0)
    size = (h1 * m0f).add_(m1f, alpha=2.0).mul_(h1).add_(m2f).mul_(2.0**-46)
    sq_lo = x_lo.clamp(min=0.0).square_().div_(m0f.clamp(min=1.0))
    seg_lo = (base - spread_x).add_(sq_lo).sub_(size).clamp_(min=0.0)
    seg_hi = base.add_(spread_x).add_(
        y_w, alpha=2.0
    )  # + Z's upper bound (1 + ETA) (x_lo + x_w) + 2 ETA M0
    seg_hi.add_(x_lo, alpha=1 + ETA).add_(x_w, alpha=1 + ETA).add_(m0f, alpha=2 * ETA).add_(size)

    # Blocks: each element's error lies between the extremes of (g_k - x)**2, k in [q(L), q(U)], x in [L, U].
    # An empty block contributes 0 (or nan/inf, which drops the candidate).
    ql, qu = codes[1][0][:, :-1], codes[0][1][:, 1:]
    lo_x, hi_x = edges[1][0][:, :-1].double(), edges[0][1][:, 1:].double()
    g_lo, g_hi = _dequantize(ql, s32, z32).double(), _dequantize(qu, s32, z32).double()
    near = torch.minimum(
        torch.maximum(lo_x - g_lo, g_lo - hi_x).clamp_(min=0.0),
        torch.maximum(lo_x - g_hi, g_hi - hi_x).clamp_(min=0.0),
    )
    near.mul_(qu - ql < 2)  # some g_k in between: 0
    far = torch.maximum((hi_x - g_lo).abs_(), (g_hi - lo_x).abs_())
    blk_lo = near.square_().mul_(blk_n).sum(dim=1) * (1 - 2.0**-48)
    blk_hi = far.square_().mul_(blk_n).sum(dim=1) * (1 + 2.0**-48)

    total_lo = seg_lo.sum(dim=1).mul_(w * w).add_(blk_lo)
    total_hi = seg_hi.sum(dim=1).mul_(w * w).add_(blk_hi)
    # From the real sum of (g - x)**2 to the full search's float64 sum of fl32(g - x)**2: float32
    # rounding of the difference (2**-24 relative, squared; 2**-150 absolute when subnormal) and the
    # float64 sum of n non-negative terms (at most (n - 1) u relative), plus this function's own sums.
    rel = 2.0**-22 + 1.01 * n * _U + 2.0**-36
    tiny = n * 2.0**-270
    lo = (total_lo * (1 - rel) - tiny).clamp_(min=0.0)
    hi = total_hi * (1 + rel) + tiny
    valid = ordered & torch.isfinite(hi) & ~torch.isnan(lo)
    lo = torch.where(valid, lo, torch.zeros_like(lo))
    hi = torch.where(valid, hi, torch.full_like(hi, math.inf))
    return lo, hi


def candidate_qparams(
    x: Tensor, min_val: Tensor, max_val: Tensor, bit_type: BitType, num_candidates: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mins, maxs, scales, zero_points)`` ``[K]`` of the candidates for data like ``x``, formed by the full search itself."""
    _, mins, maxs = omse_candidate_errors(
        x.new_empty(1, 0), min_val, max_val, bit_type, num_candidates, select=()
    )
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    return mins, maxs, scales, zero_points


def _local_bounds(
    x: Tensor, scales: Tensor, zero_points: Tensor, bit_type: BitType, min_numel: int
) -> tuple[Tensor, Tensor]:
    """This process's bounds, or ``[0, inf]`` everywhere where bounding does not pay or does not apply."""
    K = scales.numel()
    trivial = (
        torch.zeros(K, dtype=torch.float64, device=x.device),
        torch.full((K,), math.inf, dtype=torch.float64, device=x.device),
    )
    if x.numel() < max(min_numel, 1) or x.dtype != torch.float32 or bit_type.levels > _MAX_LEVELS:
        return trivial
    flat = _flat_any_order(x)
    lo_t, hi_t = torch.aminmax(flat)  # one pass
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return trivial
    stats = bin_statistics(flat, lo, hi)
    if stats is None:
        return trivial
    return error_bounds(stats, scales, zero_points, bit_type)


def omse_search(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    bit_type: BitType,
    num_candidates: int = 90,
    chunk: int = 8,
    reducer: StatReducer | None = None,
    *,
    min_numel: int = _MIN_NUMEL,
) -> OmseChoice:
    """The candidate the full search picks (first minimum of its reduced float64 errors), exactly.

    ``x`` is the last batch laid out ``[C, n]`` (float32) as for :func:`omse_candidate_errors`;
    ``reducer`` merges over processes as the full search's ``reduce(errors, "sum")`` does. Every
    process makes the same collective calls: the ``[2K]`` bounds (sum); under a process group, the
    survivor mask (max: the union, so that all ranks agree on it whatever the all-reduce's rounding);
    and the ``[K]`` errors (sum) when more than one candidate survives. Tensors below ``min_numel``
    elements skip the bounds (every candidate survives: the full search).
    """
    reducer = reducer if reducer is not None else LocalReducer()
    mins, maxs, scales, zero_points = candidate_qparams(
        x, min_val, max_val, bit_type, num_candidates
    )
    with torch.no_grad():
        lo, hi = _local_bounds(x.detach(), scales, zero_points, bit_type, min_numel)
    bounds = reducer.reduce(torch.cat([lo, hi]), "sum")
    # The all-reduce rounds each sum (at most (ranks - 1) u relative); 2**-30 covers 2**20 ranks.
    lo, hi = bounds[:num_candidates] * (1 - 2.0**-30), bounds[num_candidates:] * (1 + 2.0**-30)
    survivors = lo <= hi.min()
    if reducer.distributed:
        survivors = reducer.reduce(survivors.double(), "max") > 0
    if not bool(survivors.any()):  # impossible with valid bounds; the full search then
        survivors = torch.ones_like(survivors)
    chosen = survivors.nonzero().reshape(-1)
    if chosen.numel() == 1:
        index = int(chosen[0])
    else:
        errors, _, _ = omse_candidate_errors(
            x, min_val, max_val, bit_type, num_candidates, chunk, select=chosen.tolist()
        )
        errors = reducer.reduce(errors, "sum")
        if not bool(survivors.all()):
            errors = torch.where(survivors, errors, torch.full_like(errors, math.inf))
        index = int(torch.argmin(errors))  # the first minimum, as the full search
    return OmseChoice(index, mins, maxs, survivors, lo, hi)
