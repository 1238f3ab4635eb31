"""Pure tensor functions of the method: one definition of each formula of the contract.

Every function here is stateless; the modules in this package are thin wrappers around them.
Section numbers refer to ``shared/docs/fqvit-method.md``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .bit_type import BitType
from .scratch import scratch_like

__all__ = [
    "EPS",
    "channel_layout",
    "broadcast_channel",
    "asymmetric_qparams",
    "symmetric_qparams",
    "range_to_qparams",
    "fake_quantize",
    "exact_quantile",
    "quantile_tail_size",
    "extreme_values",
    "omse_candidate_errors",
    "ptf_scales",
    "ptf_channel_errors",
    "log2_fake_quantize",
    "int_exp",
    "log_int_softmax",
    "int_layernorm",
    "build_kernel_tables",
]

#: float32 machine epsilon, the smallest scale (§4).
EPS = float(torch.finfo(torch.float32).eps)

# Speed notes (bit-identical fast paths).
# Each formula below is written once. When no gradient has to flow (grad mode off, inference mode,
# or no input requires grad) the elementwise chains run in place on a tensor the function owns:
# the same IEEE operations in the same order on the same operands, so the results are bit for bit
# those of the out-of-place chain, with fewer allocations (on CPU every fresh multi-MB tensor costs
# page faults). ``torch.pow(2.0, k)`` for an integer-valued ``k`` is replaced by ``torch.exp2(k)``:
# both return the exact power of two (or 0 / inf / nan for the same k) on every integer of the
# range used here, checked exhaustively by tests/quant/test_speed_paths.py, and exp2 is ~8x faster.
# A division by an exact power of two ``p`` is kept as a division. With autograd needed, the plain
# out-of-place transcription runs (the gradients of these floor/round chains are zero anyway).
# Under torch.compile the integer LayerNorm and Log-Int-Softmax are traced for inductor to fuse,
# except their float32 row sums: the sum of squares and the row sum of the integer exponentials
# exceed 2**24, so their rounding depends on the summation order, and they run as opaque ops
# (``torch.ops.fqvit.*``) that call the same ATen code on the same tensors as eager (the
# LayerNorm's per-token std too: ATen's CPU ``sqrt`` comes from a vector math library whose last
# bit is not always that of inductor's correctly rounded one). Every other operation is
# elementwise IEEE arithmetic that inductor computes as ATen does (true division, no fp
# contraction or unsafe math by default), a max, integer bit manipulation or a table lookup: no
# ``log2`` or ``exp2`` whose last bit could depend on the implementation (see
# :func:`_layernorm_power`); tests/quant/test_compiled_kernels.py compares the bits. The fake
# quantization is left to inductor to fuse (exact: the same IEEE operations).


def _needs_autograd(*tensors: Tensor) -> bool:
    """Whether an in-place chain could break autograd: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in tensors if isinstance(t, Tensor)
    )


def _all_float32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors if isinstance(t, Tensor))


def _fits_in_place(out: Tensor, other: Tensor) -> bool:
    """Whether ``out.op_(other)`` gives the shape and dtype of ``out op other`` (pure Python: no graph break)."""
    if other.dtype != out.dtype or other.dim() > out.dim():
        return False
    return all(o == 1 or o == t for o, t in zip(reversed(other.shape), reversed(out.shape)))


def channel_layout(x: Tensor, *, weight: bool = False) -> Tensor:
    """Lay a tensor out as ``[C, -1]`` for statistics (§3).

    Weights ``[out, ...]`` → ``[out, prod(rest)]``. Activations: 4-D is taken as NCHW and moved to
    NHWC, then ``[-1, C]`` (C the last dim) is transposed to ``[C, -1]``. Raises ``ValueError`` for
    a rank that cannot be laid out (0-D, or more than 4-D activations).
    """
    if weight:
        if x.dim() < 2:
            raise ValueError(
                f"a weight needs at least 2 dims [out, in, ...], got shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], -1)
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    elif not 1 <= x.dim() <= 3:
        raise ValueError(
            f"cannot lay out an activation of rank {x.dim()} (shape {tuple(x.shape)}); expected 1-D to 4-D"
        )
    return x.reshape(-1, x.shape[-1]).t()


def broadcast_channel(param: Tensor, x: Tensor, *, weight: bool = False) -> Tensor:
    """Reshape a per-channel parameter ``[C]`` to broadcast on ``x``'s channel axis (§3).

    Weights: channel is dim 0. Activations: last dim for 1-D..3-D, dim 1 for 4-D (NCHW).
    A 0-D (per-tensor) parameter is returned as is.
    """
    if param.dim() == 0:
        return param
    if weight:
        return param.reshape((-1,) + (1,) * (x.dim() - 1))
    if x.dim() == 4:
        return param.reshape(1, -1, 1, 1)
    return param


def asymmetric_qparams(
    min_val: Tensor, max_val: Tensor, bit_type: BitType
) -> tuple[Tensor, Tensor]:
    """Unsigned range → ``(scale, zero_point)`` (§4): ``scale = max((max-min)/levels, eps)``."""
    scale = torch.clamp((max_val - min_val) / float(bit_type.levels), min=EPS)
    zero_point = torch.clamp(
        bit_type.lower - torch.round(min_val / scale), bit_type.lower, bit_type.upper
    )
    return scale, zero_point


def symmetric_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """Signed range → ``(scale, 0)`` (§4). The divisor is ``levels / 2`` (127.5 for int8, as published)."""
    magnitude = torch.maximum(-min_val, max_val)
    scale = torch.clamp(magnitude / (bit_type.levels / 2), min=EPS)
    return scale, torch.zeros_like(scale)


def range_to_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` for a range: symmetric for signed types, asymmetric for unsigned."""
    if bit_type.signed:
        return symmetric_qparams(min_val, max_val, bit_type)
    return asymmetric_qparams(min_val, max_val, bit_type)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """``(clamp(round(x/scale + zp), lower, upper) - zp) * scale`` (§4); scale/zp already broadcastable."""
    q = x / scale
    if (
        not _needs_autograd(x, scale, zero_point)
        and _fits_in_place(q, zero_point)
        and _fits_in_place(q, scale)
    ):
        # Same operations, same order, in place on the fresh quotient.
        return (
            q.add_(zero_point)
            .round_()
            .clamp_(bit_type.lower, bit_type.upper)
            .sub_(zero_point)
            .mul_(scale)
        )
    q = torch.clamp(torch.round(q + zero_point), bit_type.lower, bit_type.upper)
    return (q - zero_point) * scale


def _quantile_rank(numel: int, q: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """``(lower index, upper index, interpolation weight)`` of the ``q`` quantile of ``numel`` sorted values."""
    # torch.quantile rounds q to the data's dtype, then forms the rank q*(n-1) in double precision.
    position = float(torch.tensor(q, dtype=dtype)) * (numel - 1)
    lower = int(math.floor(position))
    return lower, min(lower + 1, numel - 1), position - lower


def quantile_tail_size(numel: int, q: float, dtype: torch.dtype = torch.float32) -> int:
    """How many extreme values, counted from the nearer end (the top for ``q >= 0.5``), decide the quantile."""
    lower, upper, _ = _quantile_rank(numel, q, dtype)
    return numel - lower if q >= 0.5 else upper + 1


def exact_quantile(values: Tensor, q: float, *, numel: int | None = None) -> Tensor:
    """The ``q`` quantile with linear interpolation, like ``torch.quantile``, for any tensor size.

    ``values`` may be the whole (flattened) data, or only its extreme tail of at least
    ``quantile_tail_size(numel, q)`` values from the nearer end (the upper tail for ``q >= 0.5``),
    with ``numel`` the size of the whole data. Only a top-k selection is done, never a full sort,
    so tensors above torch.quantile's 2**24-element limit work, without NumPy. Returns a 0-D tensor.
    """
    values = values.reshape(-1)
    n = values.numel() if numel is None else numel
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    lower, upper, weight = _quantile_rank(n, q, values.dtype)
    k = quantile_tail_size(n, q, values.dtype)
    if q >= 0.5:
        # The i-th smallest of n values is the (n-1-i)-th largest.
        tail = torch.topk(values, k, largest=True, sorted=True).values
        low, high = tail[n - 1 - lower], tail[n - 1 - upper]
    else:
        tail = torch.topk(values, k, largest=False, sorted=True).values
        low, high = tail[lower], tail[upper]
    return torch.lerp(low, high, torch.tensor(weight, dtype=values.dtype, device=values.device))


def extreme_values(
    values: Tensor, upper_k: int, lower_k: int, *, rows: int = 4096
) -> tuple[Tensor, Tensor]:
    """The ``upper_k`` largest and the ``lower_k`` smallest entries of ``values`` (flattened), unsorted.

    The same multisets as ``torch.topk(values, k, largest=...).values``, at about the cost of an
    ``amax`` and an ``amin`` pass: the data is cut into ``rows`` slices; if ``M`` is the k-th largest slice
    maximum, ``k`` slices hold an entry ``>= M``, so the k-th largest entry is ``>= M`` and every
    one of the ``k`` largest lies in a slice whose maximum is ``>= M`` (ties included, as ``>=``
    keeps every slice that could hold a copy). ``topk`` then runs on those few slices only. With a
    NaN the plain ``torch.topk`` runs (NaN sorts above everything there).
    """
    values = values.reshape(-1)
    n = values.numel()
    per_row = n // rows
    if per_row < 2 or max(upper_k, lower_k) * 4 > rows:
        return (
            torch.topk(values, upper_k, largest=True, sorted=False).values,
            torch.topk(values, lower_k, largest=False, sorted=False).values,
        )
    head, rest = values[: per_row * rows].view(rows, per_row), values[per_row * rows :]
    row_max, row_min = (
        head.amax(dim=1),
        head.amin(dim=1),
    )  # (torch.aminmax(dim=1) is ~10x slower on CPU)
    if bool(torch.isnan(row_max).any()):
        return (
            torch.topk(values, upper_k, largest=True, sorted=False).values,
            torch.topk(values, lower_k, largest=False, sorted=False).values,
        )

    def tail(row_ext: Tensor, k: int, largest: bool) -> Tensor:
        if k == 0:
            return values[:0]
        bound = torch.topk(row_ext, k, largest=largest, sorted=False).values
        keep = row_ext >= bound.min() if largest else row_ext <= bound.max()
        candidates = torch.cat([head[keep].reshape(-1), rest])
        return torch.topk(candidates, k, largest=largest, sorted=False).values

    return tail(row_max, upper_k, True), tail(row_min, lower_k, False)


def omse_candidate_errors(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    bit_type: BitType,
    num_candidates: int = 90,
    chunk: int = 8,
    select: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of squared errors of the OMSE clipping candidates on ``x`` (§5 omse).

    Candidate ``i`` uses range ``[min*(1-0.01i), max*(1-0.01i)]``. Returns ``(errors[num_candidates]``
    in float64, ``mins[num_candidates]``, ``maxs[num_candidates])``. Candidates are evaluated
    ``chunk`` at a time (vectorized, bounded memory), never element by element.
    With ``select`` (candidate indices), only those errors are computed, bit for bit as in the full
    search; the others are ``+inf``. A chunk is a ``[rows, n]`` float64 row sum; on CPU each row of
    it gets the same bits for any ``rows >= 2`` (a row is reduced whole by one thread; a single row
    is split across threads), so 2 to ``chunk`` selected candidates form one chunk of their own;
    otherwise (one candidate, or another device) the full search's chunks that hold them are run.
    """
    # (1 - 0.01 i) is formed in double precision, then the product is taken in x's dtype.
    factors = torch.tensor(
        [1.0 - 0.01 * i for i in range(num_candidates)], dtype=x.dtype, device=x.device
    )
    mins = min_val.to(x.device) * factors
    maxs = max_val.to(x.device) * factors
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    flat = x.reshape(1, -1)
    groups = [
        list(range(start, min(start + chunk, num_candidates)))
        for start in range(0, num_candidates, chunk)
    ]
    if select is not None:
        chosen = sorted({int(i) for i in select})
        if x.device.type == "cpu" and 2 <= len(chosen) <= chunk:
            groups = [chosen]
        else:
            groups = [g for g in groups if any(g[0] <= i <= g[-1] for i in chosen)]
    params = []
    for rows in groups:
        span = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows
        params.append((scales[span][:, None], zero_points[span][:, None]))
    errors = []
    if _needs_autograd(flat, scales) or flat.dtype != scales.dtype:
        for s, z in params:
            diff = fake_quantize(flat, s, z, bit_type) - flat
            errors.append(diff.double().pow(2).sum(dim=1))
    else:
        # The same chunks (a [rows, n] reduction per chunk, as above), computed in two reused buffers.
        # The squares of float32 differences are exact in float64, so ``d * d`` equals ``d.pow(2)``.
        rows_max = max((len(g) for g in groups), default=0)
        buffer = torch.empty(rows_max, flat.shape[1], dtype=flat.dtype, device=flat.device)
        squares = torch.empty(rows_max, flat.shape[1], dtype=torch.float64, device=flat.device)
        for s, z in params:
            q = torch.div(flat, s, out=buffer[: s.shape[0]])
            q.add_(z).round_().clamp_(bit_type.lower, bit_type.upper).sub_(z).mul_(s).sub_(flat)
            d = squares[: s.shape[0]]
            d.copy_(q)
            errors.append(d.mul_(d).sum(dim=1))
    if select is None:
        return torch.cat(errors), mins, maxs
    placed = torch.full((num_candidates,), math.inf, dtype=torch.float64, device=x.device)
    for rows, values in zip(groups, errors):
        placed[rows] = values
    return placed, mins, maxs


def ptf_scales(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """The four Power-of-Two candidates ``[s1, s2, s4, s8]`` and the shared zero point (§5 ptf).

    ``min_val``/``max_val`` are per-channel ``[C]``; returns ``(scales[4], zero_point[])``.
    """
    max_t, min_t = max_val.max(), min_val.min()
    s8 = torch.clamp((max_t - min_t) / float(bit_type.levels), min=EPS)
    zero_point = torch.clamp(
        bit_type.lower - torch.round(min_t / s8), bit_type.lower, bit_type.upper
    )
    return torch.stack([s8 / 8, s8 / 4, s8 / 2, s8]), zero_point


def ptf_channel_errors(
    x_channels: Tensor, scales: Tensor, zero_point: Tensor, bit_type: BitType
) -> Tensor:
    """Per-channel sum of squared errors of each PTF candidate scale: ``[C, n]`` → ``[C, 4]`` (float64)."""
    x = x_channels.unsqueeze(0)  # [1, C, n]
    diff = fake_quantize(x, scales.reshape(-1, 1, 1), zero_point, bit_type)
    if _needs_autograd(x, scales, zero_point) or diff.dtype != x.dtype:
        return (diff - x).double().pow(2).sum(dim=2).t()
    squares = diff.sub_(x).double()  # fresh tensors: in place; float32 squares are exact in float64
    return squares.mul_(squares).sum(dim=2).t()


def log2_fake_quantize(p: Tensor, bit_type: BitType) -> Tensor:
    """Log2 quantizer of probabilities: ``2**-clamp(round(-log2 p), 0, 2**b - 1)``, 0 where it overflows."""
    r = torch.round(-torch.log2(p))
    out = torch.pow(2.0, -torch.clamp(r, 0, 2**bit_type.bits - 1))
    return torch.where(r >= 2**bit_type.bits, torch.zeros_like(out), out)


def int_exp(x: Tensor, scale: Tensor, n: int = 30) -> Tensor:
    """I-BERT integer exponential (§8 step 2) of integer-valued ``x <= 0`` in units of ``scale``."""
    a = 0.35815147
    b = 0.96963238 / a
    c = 1.0 / a
    x0 = torch.floor(-0.6931 / scale)
    if _needs_autograd(x, scale) or not _all_float32(x, scale):
        x = torch.maximum(x, n * x0)
        q = torch.floor(x / x0)
        r = x - x0 * q
        z = r * (r + torch.floor(b / scale)) + torch.floor(c / scale**2)
        return torch.clamp(torch.floor(z * torch.pow(2.0, n - q)), min=0)
    return _int_exp_(
        torch.maximum(x, n * x0),
        x0,
        scale,
        n,
        b,
        c,
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _int_exp_(
    x: Tensor, x0: Tensor, scale: Tensor, n: int, b: float, c: float, out: Tensor
) -> Tensor:
    """The fast path of :func:`int_exp` on ``x = maximum(x, n * x0)``, which it overwrites (float32,
    no autograd); the result is written to ``out`` (contiguous, ``x``'s shape)."""
    q = torch.div(
        x, x0, out=scratch_like(1, x)
    ).floor_()  # q = floor(x / x0), an integer in 0..n; slot 0 is LIS's
    z = torch.mul(q, x0, out=out)
    r = x.sub_(z)  # r = x - x0 * q
    z = torch.add(r, torch.floor(b / scale), out=z)
    z.mul_(r).add_(torch.floor(c / scale**2))  # z = r * (r + floor(b / s)) + floor(c / s**2)
    # 2**(n - q): -q + n is n - q exactly; exp2 of an integer is the exact power of two, as pow(2.0, .).
    return z.mul_(q.neg_().add_(n).exp2_()).floor_().clamp_(min=0)


#: ``(bit width, device)`` -> the Log-Int-Softmax output indexed by the top 9 bits of float32 ``y``.
_LIS_TABLES: dict[tuple[int, torch.device], Tensor] = {}


def _lis_table(bits: int, device: torch.device) -> Tensor:
    """Output of the §8 log rounding for every ``key = (y.view(int32) >> 22) & 511``.

    The key is the biased exponent ``E`` of ``y`` (8 bits) and the first mantissa bit ``h``: for a
    finite ``y >= 1``, ``floor(log2 y) = E - 127``, and ``y - 2**f >= 2**(f-1)`` (``y >= 1.5 * 2**f``)
    holds exactly when ``h = 1`` — both sides are exact in float32 (Sterbenz), so the published
    rounding is ``r = E - 127 + h``. The reference computes ``f`` with ``torch.log2``, which may be off
    by one next to a power of two; it still yields the same ``r``: rounded up (``f = F + 1`` for ``y``
    just below ``2**(F+1)``, so ``y >= 1.5 * 2**F``): ``y - 2**(F+1) < 0 < 2**F`` gives ``r = F + 1``,
    which is ``F + h`` as ``h = 1``; rounded down (``f = F - 1`` for ``y`` at or just above ``2**F``,
    so ``h = 0``): ``y - 2**(F-1) >= 2**(F-1) > 2**(F-2)`` gives ``r = F = F + h``. ``E = 255`` is
    inf (``e == 0``: output 0, as the reference's ``r = inf >= 2**bits``) or a quiet nan, ``h = 1``
    (``S == 0``: nan).
    ``y < 1`` (never produced: ``y = round(S / e) >= 1``) gives ``r <= 0``, output 1, as the reference.
    The values are made by the reference formula itself, so they are equal by construction.
    """
    key = (bits, device)
    table = _LIS_TABLES.get(key)
    if table is None:
        codes = torch.arange(512, dtype=torch.float64)
        exponent, high = torch.div(codes, 2, rounding_mode="floor"), torch.remainder(codes, 2)
        r = (exponent - 127 + high).to(torch.float32)
        levels = 2**bits
        out = torch.pow(2.0, -torch.clamp(r, 0, levels - 1))
        out = torch.where(r >= levels, torch.zeros_like(out), out)
        out[510] = 0.0  # inf: e == 0
        out[511] = float("nan")  # nan: a row of zeros
        table = _LIS_TABLES[key] = out.to(device)
    return table


def log_int_softmax(x: Tensor, scale: Tensor, bit_type: BitType) -> Tensor:
    """Log-Int-Softmax over the last dim (§8): outputs 0 or ``2**-k`` with ``0 <= k < 2**bits``.

    ``x`` is the fake-quantized score tensor, ``scale`` the (scalar) scale of its quantization point.
    """
    levels = 2**bit_type.bits
    if _needs_autograd(x, scale) or not _all_float32(x, scale):
        x = x / scale
        x = x - x.amax(dim=-1, keepdim=True)
        e = int_exp(x, scale)
        y = torch.round(e.sum(dim=-1, keepdim=True) / e)  # 1 / probability; inf where e == 0
        f = torch.floor(torch.log2(y))
        r = torch.where(y - torch.pow(2.0, f) >= torch.pow(2.0, f - 1), f + 1, f)
        out = torch.pow(2.0, -torch.clamp(r, 0, levels - 1))
        return torch.where(r >= levels, torch.zeros_like(out), out)
    if torch.compiler.is_compiling():
        return _log_int_softmax_traced(x, scale, bit_type.bits)
    return _log_int_softmax_fast(x, scale, bit_type.bits)


def _log_int_softmax_fast(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The no-autograd float32 path of :func:`log_int_softmax` (in place on its own tensors)."""
    # amax(x / s) == amax(x) / s for s > 0 (division by a positive number is monotone), and every
    # scale is >= eps.
    # ``out`` carries e, then y, then the result; the shifted scores (then the codes) are scratch.
    out = torch.empty(x.shape, device=x.device)
    shifted = torch.div(x, scale, out=scratch_like(0, x)).sub_(x.amax(dim=-1, keepdim=True) / scale)
    n, x0 = 30, torch.floor(-0.6931 / scale)
    shifted = torch.maximum(shifted, n * x0, out=shifted)
    e = _int_exp_(shifted, x0, scale, n, 0.96963238 / 0.35815147, 1.0 / 0.35815147, out)
    y = _inverse_probabilities(e, out=e)
    codes = torch.bitwise_right_shift(
        y.view(torch.int32), 22, out=shifted.view(torch.int32)
    ).bitwise_and_(511)
    return torch.index_select(_lis_table(bits, y.device), 0, codes.view(-1), out=out.view(-1)).view(
        x.shape
    )


def _log_int_softmax_traced(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """:func:`_log_int_softmax_fast` written out of place for torch.compile: the same operations on
    the same operands, with the order-dependent row sum taken by ATen (:func:`_inverse_probabilities_op`)."""
    x = x / scale - x.amax(dim=-1, keepdim=True) / scale
    # Eager evaluates ``number / tensor`` as ``tensor.reciprocal() * number``: spelled out, so that
    # the trace does not depend on how dynamo maps Python's ``/``.
    n, x0 = 30, torch.floor(torch.reciprocal(scale) * -0.6931)
    x = torch.maximum(x, n * x0)
    q = torch.floor(x / x0)
    r = x - q * x0
    b = torch.floor(torch.reciprocal(scale) * (0.96963238 / 0.35815147))
    c = torch.floor(torch.reciprocal(scale**2) * (1.0 / 0.35815147))
    z = (r + b) * r + c
    e = torch.clamp(torch.floor(z * _power_of_two(-q + n)), min=0)
    y = torch.ops.fqvit.inverse_probabilities(e)
    codes = torch.bitwise_and(torch.bitwise_right_shift(y.view(torch.int32), 22), 511)
    if 2**bits - 1 > 126:  # outputs below 2**-126: keep the table
        return _lis_table(bits, y.device)[codes]
    return _lis_from_codes(codes, bits)


def _lis_from_codes(codes: Tensor, bits: int) -> Tensor:
    """The entries of :func:`_lis_table` for int32 ``codes``, computed by the formula that builds the
    table (``r = E - 127 + h``) instead of a gather: faster in a fused compiled kernel. For
    ``2**bits - 1 <= 126`` (every output a normal float)."""
    levels = 2**bits
    r = torch.bitwise_right_shift(codes, 1) + torch.bitwise_and(codes, 1) - 127
    out = torch.where(r >= levels, 0.0, _power_of_two(-torch.clamp(r, 0, levels - 1)))
    return torch.where(codes == 511, float("nan"), out)  # 510, inf (e == 0): 0 as r >= levels


def _inverse_probabilities(e: Tensor, out: Tensor | None = None) -> Tensor:
    """§8 step 3: ``y = round(sum(e) / e)`` over the last dim (1 / probability; inf where ``e == 0``)."""
    return torch.div(e.sum(dim=-1, keepdim=True), e, out=out).round_()


@torch.library.custom_op(
    "fqvit::inverse_probabilities", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
)
def _inverse_probabilities_op(e: Tensor) -> Tensor:
    """:func:`_inverse_probabilities` by ATen for a compiled model: the float32 row sum exceeds
    2**24, so its rounding depends on the summation order (and reading ``e`` once here is cheaper
    than inductor's recomputing it for the division)."""
    return _inverse_probabilities(e)


@_inverse_probabilities_op.register_fake
def _(e: Tensor) -> Tensor:
    return torch.empty_like(e)


def _layernorm_row_stats(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    """§7 step 2 on ``x_q`` ``[..., C]`` (``squares = x_q * x_q``): ``(mean, std)``, each ``[..., 1]``."""
    channels = x_q.shape[-1]
    mean = x_q.mean(dim=-1, keepdim=True) * s_min
    std = (s_min / channels) * torch.sqrt(
        channels * squares.sum(dim=-1, keepdim=True) - x_q.sum(dim=-1, keepdim=True) ** 2
    )
    return mean, std


@torch.library.custom_op(
    "fqvit::layernorm_row_stats", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
)
def _layernorm_row_stats_op(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_layernorm_row_stats` run by ATen for a compiled model: its float32 sum of squares
    depends on the summation order, and ATen's CPU ``sqrt`` (vectorized math library) is not
    always inductor's correctly rounded one."""
    return _layernorm_row_stats(x_q, squares, s_min)


@_layernorm_row_stats_op.register_fake
def _(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    return x_q.new_empty(x_q.shape[:-1] + (1,)), x_q.new_empty(x_q.shape[:-1] + (1,))


def _power_of_two(k: Tensor) -> Tensor:
    """``2**k`` for integer-valued float32 ``k`` in ``[-126, 127]``, built from its bits (exact, as ``exp2``)."""
    return torch.bitwise_left_shift(k.to(torch.int32) + 127, 23).view(torch.float32)


#: device -> the ``[256]`` thresholds of :func:`_floor_log2_thresholds`.
_FLOOR_LOG2_THRESHOLDS: dict[torch.device, Tensor] = {}


def _floor_log2_thresholds(device: torch.device, window: int = 2048) -> Tensor | None:
    """Where ``floor(torch.log2(a))`` exceeds the exponent of ``a``, per biased exponent ``E``.

    Returns ``[256]`` float32: for ``E`` in 1..254, the smallest float of the binade
    ``[2**(E-127), 2**(E-126))`` that ``torch.log2`` on ``device`` maps to ``E - 126`` or above,
    else ``inf`` (and ``inf`` for ``E`` 0 and 255). ``torch.log2`` is accurate to about one unit in
    the last place of its result, so it rounds a few floats just below a power of two ``2**k`` up to
    ``k`` (up to 44 floats below, for large ``|k|``, on CPU); ``floor(log2)`` can differ from the
    exponent only within ``window`` floats of a power of two (2048 floats below ``2**k`` are
    ``window * 2**-24 / ln 2`` below ``k``, over 5 units in the last place of any ``k`` in range).
    The table is read off ``torch.log2`` itself on the top and bottom ``window`` floats of every
    binade, so the lookup equals the reference formula by construction. It is checked: the
    rounded-up floats must be the top ones of their binade and no float at the bottom of a binade
    may fall below its exponent; otherwise ``None`` is returned and callers use ``torch.log2``.
    Built in eager mode only (a trace finds it cached or uses ``torch.log2``).
    """
    device = torch.device(device)
    if device in _FLOOR_LOG2_THRESHOLDS:
        return _FLOOR_LOG2_THRESHOLDS[device]
    if torch.compiler.is_compiling():
        return None
    with torch.no_grad():
        biased = torch.arange(1, 255, dtype=torch.int32, device=device)[:, None]
        steps = torch.arange(window, dtype=torch.int32, device=device)[None, :]
        tops = (((biased + 1) << 23) - 1 - steps).view(
            torch.float32
        )  # descending from the binade's top
        bottoms = ((biased << 23) + steps).view(torch.float32)
        above = (
            torch.floor(torch.log2(tops)) - (biased - 127).float()
        )  # 1: rounded up, 0: the exponent
        rounded_up = (above == 1).sum(dim=1)
        top_ones = (above == 1) == (steps < rounded_up[:, None])
        ok = bool(
            ((above == 0) | (above == 1)).all() and top_ones.all() and (rounded_up < window).all()
        )
        ok = ok and bool((torch.floor(torch.log2(bottoms)) == (biased - 127).float()).all())
        if not ok:
            return None
        first_up = tops.gather(1, (rounded_up - 1).clamp(min=0)[:, None].long())[:, 0]
        table = torch.full((256,), float("inf"), device=device)
        table[1:255] = torch.where(
            rounded_up > 0, first_up, torch.full_like(first_up, float("inf"))
        )
    _FLOOR_LOG2_THRESHOLDS[device] = table
    return table


def _layernorm_power(a: Tensor, bits: int) -> Tensor:
    """``2**N`` with ``N = clamp(bits - floor(torch.log2(a)), 0, 31)`` for ``a = |A| >= 0`` (§7 step 3).

    ``floor(torch.log2(a))`` is read off the exponent bits of ``a`` and the thresholds of
    :func:`_floor_log2_thresholds` (no ``log2`` per element), and ``2**N`` is built from bits.
    The result equals the formula's for every ``a`` but NaN, where ``A`` is NaN and so is the
    output of the LayerNorm either way (``M`` is NaN). Used by the compiled kernel, where it fuses;
    eager runs the formula itself (an eager gather costs more than the ``log2``).
    """
    thresholds = _floor_log2_thresholds(a.device)
    if thresholds is None:
        return torch.exp2(torch.clamp(bits - torch.floor(torch.log2(a)), 0, 31))
    biased = torch.bitwise_right_shift(a.view(torch.int32), 23)  # a >= 0: no sign bit
    rounded_up = torch.ge(a, thresholds[biased])
    # N = bits - floor_log2 = bits - (biased + rounded_up - 127), in place on the fresh int tensor
    n = biased.add_(rounded_up).neg_().add_(bits + 127).clamp_(0, 31)
    return n.add_(127).bitwise_left_shift_(23).view(torch.float32)


def build_kernel_tables(device: torch.device | str, lis_bits: int | None = None) -> None:
    """Build the lookup tables of the integer LayerNorm (and of Log-Int-Softmax with ``lis_bits``) on
    ``device`` now, in eager mode. The kernels build them on first use anyway; a model traced by
    torch.compile before any eager run on that device would otherwise trace the LIS table's
    construction into its graph and use ``torch.log2`` in the LayerNorm (same values, slower)."""
    _floor_log2_thresholds(torch.device(device))
    if lis_bits is not None:
        _lis_table(lis_bits, torch.device(device))


build_kernel_tables("cpu")


def int_layernorm(
    x: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    bits: int = 7,
    eps: float = 0.0,
) -> Tensor:
    """Integer LayerNorm over the last dim with Power-of-Two Factor inputs (§7).

    ``x`` is ``[..., C]`` fake-quantized with per-channel ``in_scale`` (``[C]``, a divisor of ``C``
    channels tiled in channel order, or a scalar); ``out_scale`` is the scale of the following point.
    Returns ``y_q * out_scale``. By default there is no epsilon (as published): a constant token
    divides by 0 and gives NaN. ``eps > 0`` (opt-in) takes ``std = sqrt(std**2 + eps)``, as
    ``nn.LayerNorm`` adds its epsilon to the variance.
    """
    channels = x.shape[-1]
    in_scale = in_scale.reshape(-1)
    if in_scale.numel() not in (1, channels):
        if channels % in_scale.numel():
            raise ValueError(
                f"{in_scale.numel()} input scales cannot be tiled over {channels} channels"
            )
        in_scale = in_scale.repeat(channels // in_scale.numel())
    fast = not _needs_autograd(x, in_scale, out_scale, weight, bias) and _all_float32(
        x, in_scale, out_scale, weight, bias
    )
    if not fast:
        x_q = torch.round(x / in_scale)
        s_min = in_scale.min()
        x_q = x_q * torch.round(in_scale / s_min)
        mean = x_q.mean(dim=-1, keepdim=True) * s_min
        std = (s_min / channels) * torch.sqrt(
            channels * x_q.pow(2).sum(dim=-1, keepdim=True) - x_q.sum(dim=-1, keepdim=True) ** 2
        )
        if eps:
            std = torch.sqrt(std * std + eps)
        a = (s_min / std) * weight / out_scale
        sign = torch.sign(a)
        n = torch.clamp(bits - torch.floor(torch.log2(a.abs())), 0, 31)
        m = torch.clamp(torch.floor(a.abs() * torch.pow(2.0, n)), 0, 2 ** (bits + 1) - 1)
        b = torch.round((bias - (mean / std) * weight) / out_scale * torch.pow(2.0, n))
        y_q = torch.round((sign * m * x_q + b) / torch.pow(2.0, n))
        return y_q * out_scale
    if torch.compiler.is_compiling():
        return _int_layernorm_traced(x, in_scale, out_scale, weight, bias, bits, eps)
    return _int_layernorm_fast(x, in_scale, out_scale, weight, bias, bits, eps)


def _int_layernorm_fast(
    x: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    bits: int,
    eps: float = 0.0,
) -> Tensor:
    """The no-autograd float32 path of :func:`int_layernorm`; ``in_scale`` is already ``[C]`` or ``[1]``."""
    # The same operations in the same order, in place on its own [..., C] tensors (scratch, but
    # ``sign``, which becomes the result); 2**n computed once.
    x_q = torch.div(x, in_scale, out=scratch_like(0, x)).round_()
    s_min = in_scale.min()
    x_q.mul_(torch.round(in_scale / s_min))
    work = torch.mul(
        x_q, x_q, out=scratch_like(1, x)
    )  # x_q.pow(2): integers below 2**12, exact either way
    mean, std = _layernorm_row_stats(x_q, work, s_min)
    if eps:
        std = torch.sqrt(std * std + eps)
    a = torch.mul(s_min / std, weight, out=work).div_(out_scale)
    sign = torch.sign(a)
    a.abs_()
    # 2**n, n = clamp(bits - floor(log2|a|), 0, 31)
    p = torch.log2(a, out=scratch_like(2, x)).floor_().neg_().add_(bits).clamp_(0, 31).exp2_()
    m = a.mul_(p).floor_().clamp_(0, 2 ** (bits + 1) - 1)
    b = torch.mul(mean / std, weight, out=scratch_like(3, x))
    b = torch.sub(bias, b, out=b).div_(out_scale).mul_(p).round_()
    y_q = sign.mul_(m).mul_(x_q).add_(b).div_(p).round_()
    return y_q.mul_(out_scale)


def _int_layernorm_traced(
    x: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    bits: int,
    eps: float = 0.0,
) -> Tensor:
    """:func:`_int_layernorm_fast` written out of place for torch.compile: the same operations on the
    same operands, with the row statistics taken by ATen (:func:`_layernorm_row_stats_op`)."""
    s_min = in_scale.min()
    x_q = torch.round(x / in_scale) * torch.round(in_scale / s_min)
    mean, std = torch.ops.fqvit.layernorm_row_stats(x_q, x_q * x_q, s_min)
    if eps:
        std = torch.sqrt(std * std + eps)
    a = (s_min / std) * weight / out_scale
    sign = torch.sign(a)
    a = torch.abs(a)
    p = _layernorm_power(a, bits)
    m = torch.clamp(torch.floor(a * p), 0, 2 ** (bits + 1) - 1)
    b = torch.round((bias - (mean / std) * weight) / out_scale * p)
    y_q = torch.round((sign * m * x_q + b) / p)
    return y_q * out_scale
