"""The OMSE search of §5, pruned exactly: the full search's choice at a fraction of its cost.

The full search (:func:`~fqvit_pl.quant.functional.omse_candidate_errors`) fake-quantizes the last
batch with each of the 90 candidates and sums the squared errors in float64: 90 passes over the
tensor. Here one cheap pass gives every candidate a rigorous interval ``lo_i <= E_i <= hi_i`` around
the very float64 number ``E_i`` the full search computes (reduced over processes as it is); a
candidate with ``lo_i > min_j hi_j`` cannot be a minimizer. Usually one candidate survives and no
exact error is computed at all; otherwise the survivors' errors are computed by the full search's
own chunked row sums (:func:`survivor_errors`), bit for bit its numbers, and the first minimum
among them is its choice.

Proof (details at each function):

1. Binning (:func:`bin_statistics`). Bins have a power-of-two width ``w = 2**e``. For float32 ``x``,
   ``V = (x / w - first) 2**F`` is formed in float64 with one rounding (``x 2**(F - e)`` is exact,
   ``first 2**F`` is exact, ``0 <= V < 2**(19 + F)``: error ``<= 2**(F - 34)``); ``U = trunc(V) >= 0``,
   or (faster, no float-to-integer conversion) ``U = round(fl(V - 1/2)) >= 0`` read off the bits of
   ``fl(V - 1/2) + 1.5 * 2**52`` (``|U - (V - 1/2)| <= 1/2 + 2**(F - 34)``: the same ``U <= V <= U + 1``
   up to the rounding), gives the bin ``U >> F`` and the fraction field ``U & (2**F - 1)``. So every
   element counted in bin ``b`` has ``x = w (first + b + rho)`` with ``rho`` within
   ``[f 2**-F - ETA, (f + 1) 2**-F + ETA]`` (``ETA = 2**-34``). Counts and fraction fields are
   summed in int64: exact, in any order.
2. One candidate (:func:`error_bounds`, step by step in the functions it calls), scale ``s`` and
   zero point ``z``. Its code
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
5. The survivors' errors come from :func:`survivor_errors`, bit for bit the full
   search's per-rank errors; all-reduced in the full-length vector (the other entries are ``+inf``)
   they are, element for element, the full search's all-reduced errors. Their first minimum, in
   index order, is the full search's ``argmin`` (every minimizer is in ``S``).

Cost: about one candidate's worth of passes for the binning (int64 ops and scatter-adds on
cache-sized blocks, on the calling thread), a few milliseconds for the bounds, and, for the few
points with several survivors, one ``[len(S), n]`` chunk of the full search.

Elementwise ops here run on at most :data:`GRAIN` elements at a time: torch runs an op on fewer
elements than its intra-op grain size (32768) on the calling thread, so the blocks stay in cache
and never wait for an OpenMP team (on a busy machine a parallel op on a small tensor can wait a
whole time slice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..bit_type import BitType
from ..functional import asymmetric_qparams, omse_candidate_errors
from ..reduce import LocalReducer, StatReducer
from . import inplace
from .buffers import reused_tensor

__all__ = [
    "BinnedStats",
    "OmseChoice",
    "bin_statistics",
    "error_bounds",
    "survivor_errors",
    "omse_search",
]

#: Elements per elementwise op: below torch's intra-op grain size, so it runs on the calling thread.
GRAIN = 32767
#: The packed int64 histogram is unpacked every 2**24 elements (the fields' widths depend on it).
PACK_BITS = 24
#: The finest grid: 2**18 bins over the data's range.
MAX_BIN_BITS = 18
#: Below this many elements (or past this many levels) the full search is cheaper than bounds.
MIN_NUMEL = 16384
MAX_LEVELS = 1023
#: Rounding margin of the binning, in bins (see :func:`bin_statistics`).
ETA = 2.0**-34
#: float64 unit roundoff.
UNIT_ROUNDOFF = 2.0**-53
#: 1.5 * 2**23: ``(v + M) - M`` rounds a float32 ``|v| <= 2**22`` to the nearest integer, ties to even.
FLOAT32_ROUNDING_SHIFT = 12582912.0
#: 1.5 * 2**52 and its bits: ``v + M`` rounds a float64 ``-1/2 <= v < 2**51`` to an integer whose
#: value is the low bits of the sum's representation.
FLOAT64_INTEGER_SHIFT = 6755399441055744.0
FLOAT64_INTEGER_SHIFT_BITS = 0x4338000000000000


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

    @property
    def bin_width(self) -> float:
        return 2.0**self.exponent


@dataclass(frozen=True)
class OmseChoice:
    """The result of :func:`omse_search`: the chosen candidate and what it took.

    ``index`` is the full search's ``argmin``; ``survivors`` ``[K]`` bool marks the candidates the
    bounds kept; ``lo``/``hi`` ``[K]`` float64 are the (reduced) bounds.
    """

    index: int
    survivors: Tensor
    lo: Tensor
    hi: Tensor


def _workspace(numel: int, device: torch.device) -> Tensor:
    """A reused int64 scratch tensor of ``numel`` elements."""
    return reused_tensor("omse.workspace", (numel,), torch.int64, device, min_numel=1 << 20)


def _ramp(numel: int, device: torch.device) -> Tensor:
    """``torch.arange(numel)`` (int64): a prefix of a longer cached ramp, never written."""
    buffer = reused_tensor(
        "omse.ramp",
        (max(numel, 1 << 18),),
        torch.int64,
        device,
        initialize=lambda t: torch.arange(t.numel(), out=t),
    )
    return buffer[:numel]


def _flat_any_order(x: Tensor) -> Tensor:
    """The elements of ``x`` as a 1-D tensor, in whatever order avoids a copy (binning ignores order)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 2 and x.t().is_contiguous():  # channel_layout's [C, n] view of a [n, C] tensor
        return x.t().view(-1)
    return x.reshape(-1)


# ------------------------------------------------------------------------------------------------
# Step 1: binning


def bin_statistics(
    flat: Tensor, lo: float, hi: float, *, max_bin_bits: int = MAX_BIN_BITS, block: int = GRAIN
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
    in any order. Returns ``None`` when the tensor is too large for exact int64 moments.
    """
    numel = flat.numel()
    size_bits = max(numel.bit_length(), 1)  # numel < 2**size_bits
    pack_bits = min(
        size_bits, PACK_BITS
    )  # a packed partial histogram covers < 2**pack_bits elements
    # Moments must fit int64 (with one bit to spare): count*b**2 sums < n 2**(2 bin_bits);
    # frac*b sums < n 2**(frac_bits + bin_bits); the packed frac field < 2**pack_bits 2**frac_bits.
    bin_bits = min(max_bin_bits, max(size_bits + 1, 16), (60 - size_bits) // 2)
    frac_bits = min(24, 62 - 2 * pack_bits, 60 - size_bits - bin_bits)
    if bin_bits < 8 or frac_bits < 4:
        return None
    # The count field sits above the frac field: < 2**pack_bits * 2**count_shift = 2**62.
    count_shift = 62 - pack_bits
    span = hi - lo
    exponent = math.frexp(span)[1] - bin_bits if span > 0 else math.frexp(max(abs(lo), 1e-30))[1]
    # Python floats: exact (power-of-two scaling, far from underflow).
    first = math.floor(lo / 2.0**exponent)
    bins = math.floor(hi / 2.0**exponent) - first + 2  # one spare bin: V may round up to the end
    # Fewer than 2**pack_bits elements per packed histogram.
    flush_every = 1 << (pack_bits - 1) if numel >= 1 << PACK_BITS else numel
    grid = _BinGrid(bins, exponent, first, frac_bits, bin_bits, count_shift, flush_every)
    count, frac = _histograms(flat, grid, block)
    return BinnedStats(exponent, first, frac_bits, count.clone(), frac.clone(), numel)


@dataclass(frozen=True)
class _BinGrid:
    bins: int
    exponent: int
    first: int
    frac_bits: int
    bin_bits: int
    count_shift: int
    flush_every: int


def _histograms(flat: Tensor, grid: _BinGrid, block: int) -> tuple[Tensor, Tensor]:
    """The count and fraction-sum histograms of ``flat`` (see :func:`bin_statistics`): views of
    this thread's workspace."""
    numel, device, bins, frac_bits = flat.numel(), flat.device, grid.bins, grid.frac_bits
    workspace = _workspace(3 * bins, device)
    count, frac, packed = workspace[:bins], workspace[bins : 2 * bins], workspace[2 * bins :]
    workspace.zero_()
    rows = max(min(block, numel), 1)
    scaled_buffer = torch.empty(rows, dtype=torch.float64, device=device)
    fixed_point_buffer = torch.empty(rows, dtype=torch.int64, device=device)
    bin_buffer = torch.empty(rows, dtype=torch.int64, device=device)
    scale = 2.0 ** (frac_bits - grid.exponent)
    # x * scale is exact in float32 when scale is a normal power of two.
    exact_in_float32 = 0 <= frac_bits - grid.exponent <= 126
    offset = float(grid.first) * 2.0**frac_bits  # exact in float64
    # U = round(fl(V - 1/2)) by adding 1.5 * 2**52 (see bin_statistics): no float-to-int64
    # conversion. Needs offset + 1/2 exact (|offset| < 2**52); else U = trunc(V).
    by_float64_shift = abs(offset) < 2.0**52 and frac_bits + grid.bin_bits + 2 <= 48
    shifted_first_bin = FLOAT64_INTEGER_SHIFT_BITS >> frac_bits
    frac_mask, one_count = (1 << frac_bits) - 1, 1 << grid.count_shift
    since_flush = 0
    for start in range(0, numel, block):
        xs = flat[start : start + block]
        size = xs.numel()
        if since_flush + size > grid.flush_every:
            count.add_(packed >> grid.count_shift)
            frac.add_(packed & (one_count - 1))
            packed.zero_()
            since_flush = 0
        since_flush += size
        scaled = scaled_buffer[:size]
        if exact_in_float32:
            torch.mul(xs, scale, out=scaled)
        else:
            scaled.copy_(xs).mul_(scale)
        bin_index = bin_buffer[:size]
        if by_float64_shift:
            shifted = scaled.sub_(offset + 0.5).add_(FLOAT64_INTEGER_SHIFT)
            fixed_point = shifted.view(torch.int64)
            torch.bitwise_right_shift(fixed_point, frac_bits, out=bin_index)
            bin_index.sub_(shifted_first_bin)
        else:
            # Truncation of a value >= 0: its floor.
            fixed_point = fixed_point_buffer[:size].copy_(scaled.sub_(offset))
            torch.bitwise_right_shift(fixed_point, frac_bits, out=bin_index)
        packed.scatter_add_(
            0, bin_index, fixed_point.bitwise_and_(frac_mask).bitwise_or_(one_count)
        )
    count.add_(packed >> grid.count_shift)
    frac.add_(packed & (one_count - 1))
    return count, frac


# ------------------------------------------------------------------------------------------------
# Step 2: a candidate's codes at float32 edges


def _round_half_even(v: Tensor) -> Tensor:
    """``torch.round`` of float32 ``v`` in place, for ``|v| <= 2**22`` (larger values move by at most 2).

    Adding ``1.5 * 2**23`` lands in ``[2**23, 2**24)``, where float32's spacing is 1, so the sum is
    rounded to an integer, ties to even; subtracting it back is exact. (torch.round on more than
    2048 elements forks an OpenMP team; this does not.)
    """
    return v.add_(FLOAT32_ROUNDING_SHIFT).sub_(FLOAT32_ROUNDING_SHIFT)


def _codes(points: Tensor, scales: Tensor, zero_points: Tensor, bit_type: BitType) -> Tensor:
    """The full search's integer code of float32 ``points`` ``[K, M]`` under ``scales`` and
    ``zero_points`` ``[K, 1]``."""
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
    w = stats.bin_width
    position = (boundary + stats.first).double()
    pad = (position.abs() + 1.0).mul_(2 * ETA)
    lower64 = torch.sub(position, pad).mul_(w)
    upper64 = position.add_(pad).mul_(w)
    lower32, upper32 = lower64.float(), upper64.float()
    lower32 = torch.where(
        lower32.double() > lower64,
        torch.nextafter(lower32, lower32.new_full((), -math.inf)),
        lower32,
    )
    upper32 = torch.where(
        upper32.double() < upper64,
        torch.nextafter(upper32, upper32.new_full((), math.inf)),
        upper32,
    )
    return lower32, upper32


# ------------------------------------------------------------------------------------------------
# Step 2 (continued): the bounds of one candidate's error, piece by piece


def _prefix_moments(stats: BinnedStats) -> Tensor:
    """``[5, bins + 1]`` int64 exclusive prefix sums over bins of count, count*b, count*b**2, frac
    and frac*b: row ``r``, column ``k`` sums bins ``< k``. Integer sums: exact."""
    bins, device = stats.count.numel(), stats.count.device
    workspace = _workspace(6 * bins + 5, device)
    term, prefix = workspace[:bins], workspace[bins:].view(5, bins + 1)
    ramp = _ramp(bins, device)
    blocks = [slice(start, min(start + GRAIN, bins)) for start in range(0, bins, GRAIN)]
    prefix[:, 0] = 0
    # A 1-D scan runs on the calling thread; the products run in blocks (see GRAIN).
    torch.cumsum(stats.count, 0, out=prefix[0, 1:])
    for sl in blocks:
        torch.mul(stats.count[sl], ramp[sl], out=term[sl])
    torch.cumsum(term, 0, out=prefix[1, 1:])
    for sl in blocks:
        term[sl].mul_(ramp[sl])
    torch.cumsum(term, 0, out=prefix[2, 1:])
    torch.cumsum(stats.frac, 0, out=prefix[3, 1:])
    for sl in blocks:
        torch.mul(stats.frac[sl], ramp[sl], out=term[sl])
    torch.cumsum(term, 0, out=prefix[4, 1:])
    return prefix


def _piece_boundaries(
    stats: BinnedStats, scales64: Tensor, zero_points64: Tensor, bit_type: BitType
) -> tuple[Tensor, Tensor]:
    """Cut the bins of each candidate into segments and blocks; returns ``(bounds, ordered)``.

    Around each real rounding threshold ``(k + 1/2 - z) s`` a block of bins within a margin is set
    apart (the float32 threshold lies well inside the margin, and the checks of
    :func:`error_bounds` make that irrelevant for correctness). ``bounds`` is ``[2, K, T + 1]``
    int64: ``bounds[0]`` the segments' first bins, ``bounds[1]`` their ends; block ``j`` is
    ``[bounds[1][:, j], bounds[0][:, j + 1])``. ``ordered`` ``[K]`` is False where blocks overlap
    or come out of order (never seen: ``s >> w``); those candidates are not bounded.
    """
    bins, device = stats.count.numel(), stats.count.device
    num_candidates = scales64.shape[0]
    levels = torch.arange(bit_type.lower, bit_type.upper, dtype=torch.float64, device=device)
    thresholds = (levels + 0.5 - zero_points64).mul_(scales64)  # [K, T]
    margin = thresholds.abs().mul_(2.0**-20).add_(scales64, alpha=2.0**-10)
    limit = float(bins + 2)

    def bin_of(v: Tensor) -> Tensor:
        # floor(v / w) - first, clamped into [-1, bins]; div_floor is exact and runs without threads.
        scaled = torch.div(
            v.mul_(1.0 / stats.bin_width).sub_(stats.first), 1.0, rounding_mode="floor"
        )
        return scaled.clamp_(-2.0, limit).to(torch.int64).clamp_(-1, bins)

    num_thresholds = thresholds.shape[1]
    bounds = torch.empty(2, num_candidates, num_thresholds + 1, dtype=torch.int64, device=device)
    starts, ends = bounds[0], bounds[1]
    starts[:, 0], ends[:, -1] = 0, bins
    # An empty block below the data is (0, -1), above it (bins, bins - 1).
    ends[:, :-1] = bin_of(thresholds - margin).clamp_(0, bins)
    starts[:, 1:] = bin_of(thresholds.add_(margin)).clamp_(-1, bins - 1).add_(1)
    ordered = (ends >= starts).all(dim=1) & (starts[:, 1:] >= ends[:, :-1]).all(dim=1)
    if not bool(ordered.all()):  # keep the pieces well formed (those candidates are dropped)
        flat = bounds.permute(1, 2, 0).reshape(num_candidates, 2 * num_thresholds + 2)
        monotone = torch.cummax(flat, dim=1).values
        bounds.copy_(monotone.view(num_candidates, num_thresholds + 1, 2).permute(2, 0, 1))
    return bounds, ordered


@dataclass
class _Pieces:
    """What the bounds need of each candidate's pieces (``K`` candidates, ``T`` thresholds)."""

    moments: Tensor  # [5, K, T+1] int64: per segment count, sum b, sum b**2, sum f, sum f b
    segment_first_bin: Tensor  # [K, T+1] int64
    block_count: Tensor  # [K, T] float64
    segment_code: Tensor  # [K, T+1] float32: the code at each segment's lower edge
    one_code: Tensor  # [K] bool: every nonempty segment has a single code
    block_codes: tuple[Tensor, Tensor]  # [K, T] float32: lowest and highest code in each block
    block_edges: tuple[Tensor, Tensor]  # [K, T] float64: lowest and highest x in each block


def _pieces(
    stats: BinnedStats,
    prefix: Tensor,
    bounds: Tensor,
    scales32: Tensor,
    zero_points32: Tensor,
    bit_type: BitType,
) -> _Pieces:
    """Moments, counts, edges and codes of every segment and block (proof step 2)."""
    num_candidates, num_pieces = bounds.shape[1], bounds.shape[2]
    at_boundary = torch.empty(
        5, 2, num_candidates, num_pieces, dtype=torch.int64, device=bounds.device
    )
    edges, codes = [], []
    for side in range(2):  # 0: segment starts, 1: segment ends
        index = bounds[side].reshape(-1).to(torch.int32)  # int32 indices: index_select is faster
        for moment in range(5):
            torch.index_select(prefix[moment], 0, index, out=at_boundary[moment, side].view(-1))
        lower, upper = _boundary_edges(stats, bounds[side])
        edges.append((lower, upper))
        codes.append(
            (
                _codes(lower, scales32, zero_points32, bit_type),
                _codes(upper, scales32, zero_points32, bit_type),
            )
        )
    moments = at_boundary[:, 1] - at_boundary[:, 0]
    block_count = (at_boundary[0, 0, :, 1:] - at_boundary[0, 1, :, :-1]).double()
    # The code is monotone: a piece [p, p') has codes in [q(L(p)), q(U(p'))].
    start_code, end_code = codes[0][0], codes[1][1]
    one_code = ((start_code == end_code) | (moments[0] == 0)).all(dim=1)
    return _Pieces(
        moments=moments,
        segment_first_bin=bounds[0],
        block_count=block_count,
        segment_code=start_code,
        one_code=one_code,
        block_codes=(codes[1][0][:, :-1], codes[0][1][:, 1:]),
        block_edges=(edges[1][0][:, :-1].double(), edges[0][1][:, 1:].double()),
    )


def _segment_bounds(
    stats: BinnedStats, pieces: _Pieces, scales32: Tensor, zero_points32: Tensor
) -> tuple[Tensor, Tensor]:
    """Bounds ``[K, T+1]`` of each segment's ``sum (g - x)**2 / w**2`` (one code ``g`` per segment).

    With ``beta = b - b0`` (``b0`` the segment's first bin) and ``h = g / w - first - b0``, the sum
    is ``sum (h - beta - rho)**2 = A - 2 cross + Z``: ``A = h**2 M0 - 2 h M1 + M2`` from the exact
    integer moments, ``cross = h X - Y`` with ``X = sum rho``, ``Y = sum beta rho`` (intervals from the
    fraction sums), and ``Z = sum rho**2`` in ``[max(X, 0)**2 / M0, (1 + ETA) X + 2 ETA M0]``
    (``-ETA <= rho <= 1 + ETA``). An empty segment has all moments 0: both bounds are 0 (or
    nan/inf, which drops the candidate).
    """
    w, step = stats.bin_width, 2.0**-stats.frac_bits
    count, sum_b, sum_b2, sum_f, sum_fb = pieces.moments.unbind(0)
    b0 = pieces.segment_first_bin
    m1 = sum_b - b0 * count
    m2 = sum_b2 - b0 * (sum_b + m1)  # sum_b2 - 2 b0 sum_b + b0**2 count
    frac_beta = sum_fb - b0 * sum_f
    m0f, m1f, m2f = count.double(), m1.double(), m2.double()
    h = _dequantize(pieces.segment_code, scales32, zero_points32).double()
    h.mul_(1.0 / w).sub_((b0 + stats.first).double())
    # X in [x_lo, x_lo + x_width], Y in [y_lo, y_lo + y_width], as
    # f 2**-F - ETA <= rho <= (f + 1) 2**-F + ETA.
    x_lo = sum_f.double().mul_(step).sub_(m0f, alpha=ETA)
    x_width = m0f * (step + 2 * ETA)
    y_lo = frac_beta.double().mul_(step).sub_(m1f, alpha=ETA)
    y_width = m1f * (step + 2 * ETA)
    # A - 2 cross over the box: A - 2 h (x_lo + x_width / 2) + 2 y_lo -/+ |h| x_width, + [0, 2 y_width].
    base = (h * m0f).sub_(m1f, alpha=2.0).mul_(h).add_(m2f)
    base.sub_(torch.add(x_lo, x_width, alpha=0.5).mul_(h), alpha=2.0).add_(y_lo, alpha=2.0)
    spread_x = h.abs().mul_(x_width)
    # The float64 rounding of all the above: far below 2**-46 of sum (|h| + beta + 1)**2.
    h1 = h.abs_().add_(1.0)
    rounding = (h1 * m0f).add_(m1f, alpha=2.0).mul_(h1).add_(m2f).mul_(2.0**-46)
    z_lo = x_lo.clamp(min=0.0).square_().div_(m0f.clamp(min=1.0))
    lower = (base - spread_x).add_(z_lo).sub_(rounding).clamp_(min=0.0)
    upper = base.add_(spread_x).add_(y_width, alpha=2.0)
    # + Z's upper bound (1 + ETA) (x_lo + x_width) + 2 ETA M0
    upper.add_(x_lo, alpha=1 + ETA).add_(x_width, alpha=1 + ETA).add_(m0f, alpha=2 * ETA)
    return lower, upper.add_(rounding)


def _block_bounds(
    pieces: _Pieces, scales32: Tensor, zero_points32: Tensor
) -> tuple[Tensor, Tensor]:
    """Bounds ``[K]`` of the blocks' ``sum (g - x)**2``: each element's error lies between the
    extremes of ``(g_k - x)**2`` over codes ``k`` in ``[q(L), q(U)]`` and ``x`` in ``[L, U]``.
    An empty block contributes 0 (or nan/inf, which drops the candidate)."""
    code_lo, code_hi = pieces.block_codes
    x_lo, x_hi = pieces.block_edges
    g_lo = _dequantize(code_lo, scales32, zero_points32).double()
    g_hi = _dequantize(code_hi, scales32, zero_points32).double()
    nearest = torch.minimum(
        torch.maximum(x_lo - g_lo, g_lo - x_hi).clamp_(min=0.0),
        torch.maximum(x_lo - g_hi, g_hi - x_hi).clamp_(min=0.0),
    )
    nearest.mul_(code_hi - code_lo < 2)  # a level strictly in between: the error can be 0
    farthest = torch.maximum((x_hi - g_lo).abs_(), (g_hi - x_lo).abs_())
    lower = nearest.square_().mul_(pieces.block_count).sum(dim=1) * (1 - 2.0**-48)
    upper = farthest.square_().mul_(pieces.block_count).sum(dim=1) * (1 + 2.0**-48)
    return lower, upper


def error_bounds(
    stats: BinnedStats, scales: Tensor, zero_points: Tensor, bit_type: BitType
) -> tuple[Tensor, Tensor]:
    """Bounds ``lo <= E <= hi`` (``[K]`` float64 each) of the full search's float64 error sums ``E``.

    ``scales``/``zero_points`` ``[K]`` float32 are the candidates (as the full search forms them);
    ``stats`` bins the tensor the full search runs on. A candidate that cannot be bounded gets
    ``[0, inf]``. See the module docstring for the proof.
    """
    num_candidates = scales.numel()
    scales32 = scales.reshape(num_candidates, 1).float()
    zero_points32 = zero_points.reshape(num_candidates, 1).float()
    prefix = _prefix_moments(stats)
    bounds, ordered = _piece_boundaries(stats, scales32.double(), zero_points32.double(), bit_type)
    pieces = _pieces(stats, prefix, bounds, scales32, zero_points32, bit_type)
    segment_lo, segment_hi = _segment_bounds(stats, pieces, scales32, zero_points32)
    block_lo, block_hi = _block_bounds(pieces, scales32, zero_points32)
    w2 = stats.bin_width**2
    total_lo = segment_lo.sum(dim=1).mul_(w2).add_(block_lo)
    total_hi = segment_hi.sum(dim=1).mul_(w2).add_(block_hi)
    lo, hi = _to_float64_sums(total_lo, total_hi, stats.numel)
    valid = ordered & pieces.one_code & torch.isfinite(hi) & ~torch.isnan(lo)
    lo = torch.where(valid, lo, torch.zeros_like(lo))
    hi = torch.where(valid, hi, torch.full_like(hi, math.inf))
    return lo, hi


def _to_float64_sums(total_lo: Tensor, total_hi: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Step 3: from bounds of the real ``sum (g - x)**2`` to bounds of the full search's float64
    sum of ``fl32(g - x)**2``: the float32 rounding of the difference (``2**-24`` relative, squared;
    ``2**-150`` absolute when subnormal), the float64 sum of ``numel`` non-negative terms (at most
    ``(numel - 1) u`` relative), and this module's own sums."""
    relative = 2.0**-22 + 1.01 * numel * UNIT_ROUNDOFF + 2.0**-36
    absolute = numel * 2.0**-270
    lo = (total_lo * (1 - relative) - absolute).clamp_(min=0.0)
    hi = total_hi * (1 + relative) + absolute
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Steps 4-5: processes, survivors, and their exact errors


def _local_bounds(
    x: Tensor, scales: Tensor, zero_points: Tensor, bit_type: BitType, min_numel: int
) -> tuple[Tensor, Tensor]:
    """This process's bounds, or ``[0, inf]`` everywhere where bounding does not pay or does not apply."""
    num_candidates = scales.numel()
    unbounded = (
        torch.zeros(num_candidates, dtype=torch.float64, device=x.device),
        torch.full((num_candidates,), math.inf, dtype=torch.float64, device=x.device),
    )
    if x.numel() < max(min_numel, 1) or x.dtype != torch.float32 or bit_type.levels > MAX_LEVELS:
        return unbounded
    flat = _flat_any_order(x)
    lo_t, hi_t = torch.aminmax(flat)  # one pass
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return unbounded
    stats = bin_statistics(flat, lo, hi)
    if stats is None:
        return unbounded
    return error_bounds(stats, scales, zero_points, bit_type)


def survivor_errors(
    x: Tensor, mins: Tensor, maxs: Tensor, bit_type: BitType, survivors: list[int], chunk: int = 8
) -> Tensor:
    """The full search's errors (:func:`~fqvit_pl.quant.functional.omse_candidate_errors`) of the
    candidates ``survivors``, bit for bit; ``+inf`` for the others. ``[K]`` float64.

    The full search sums each chunk of candidates as one ``[rows, n]`` float64 row sum. On CPU each
    row of it gets the same bits for any ``rows >= 2`` (a row is reduced whole by one thread; a
    single row is split across threads), so 2 to ``chunk`` survivors form one chunk of their own;
    otherwise (one survivor, or another device) the full search's chunks that hold them are run.
    """
    num_candidates = mins.numel()
    chunks = [
        list(range(start, min(start + chunk, num_candidates)))
        for start in range(0, num_candidates, chunk)
    ]
    chosen = sorted({int(i) for i in survivors})
    if x.device.type == "cpu" and 2 <= len(chosen) <= chunk:
        chunks = [chosen]
    else:
        chunks = [c for c in chunks if any(c[0] <= i <= c[-1] for i in chosen)]
    flat = x.reshape(1, -1)
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    needs_autograd = torch.is_grad_enabled() and (flat.requires_grad or scales.requires_grad)
    if needs_autograd or flat.dtype != scales.dtype:
        errors = [
            omse_candidate_errors(x, mins[c], maxs[c], bit_type, chunk=len(c)) for c in chunks
        ]
    else:
        errors = inplace.omse_chunk_errors(flat, scales, zero_points, bit_type, chunks)
    placed = torch.full((num_candidates,), math.inf, dtype=torch.float64, device=x.device)
    for rows, values in zip(chunks, errors):
        placed[rows] = values
    return placed


def omse_search(
    x: Tensor,
    mins: Tensor,
    maxs: Tensor,
    bit_type: BitType,
    reducer: StatReducer | None = None,
    *,
    chunk: int = 8,
    min_numel: int = MIN_NUMEL,
) -> OmseChoice:
    """The candidate the full search picks (first minimum of its reduced float64 errors), exactly.

    ``x`` is the last batch laid out ``[C, n]`` (float32); ``mins``/``maxs`` ``[K]`` the candidate
    ranges (:func:`~fqvit_pl.quant.functional.omse_candidates`); ``reducer`` merges over processes
    as the full search's ``reduce(errors, "sum")`` does. Every process makes the same collective
    calls: the ``[2K]`` bounds (sum); under a process group, the survivor mask (max: the union, so
    that all ranks agree on it whatever the all-reduce's rounding); and the ``[K]`` errors (sum)
    when more than one candidate survives. Tensors below ``min_numel`` elements skip the bounds
    (every candidate survives: the full search).
    """
    reducer = reducer if reducer is not None else LocalReducer()
    num_candidates = mins.numel()
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    with torch.no_grad():
        lo, hi = _local_bounds(x.detach(), scales, zero_points, bit_type, min_numel)
    bounds = reducer.reduce(torch.cat([lo, hi]), "sum")
    # The all-reduce rounds each sum (at most (ranks - 1) u relative); 2**-30 covers 2**20 ranks.
    lo = bounds[:num_candidates] * (1 - 2.0**-30)
    hi = bounds[num_candidates:] * (1 + 2.0**-30)
    survivors = lo <= hi.min()
    if reducer.distributed:
        survivors = reducer.reduce(survivors.double(), "max") > 0
    if not bool(survivors.any()):  # impossible with valid bounds; the full search then
        survivors = torch.ones_like(survivors)
    chosen = survivors.nonzero().reshape(-1)
    if chosen.numel() == 1:
        return OmseChoice(int(chosen[0]), survivors, lo, hi)
    errors = survivor_errors(x, mins, maxs, bit_type, chosen.tolist(), chunk)
    errors = reducer.reduce(errors, "sum")
    if not bool(survivors.all()):
        errors = torch.where(survivors, errors, torch.full_like(errors, math.inf))
    return OmseChoice(
        int(torch.argmin(errors)), survivors, lo, hi
    )  # first minimum, as the full search
