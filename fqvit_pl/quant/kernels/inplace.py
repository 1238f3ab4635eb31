"""Eager fast paths: the formulas of :mod:`fqvit_pl.quant.functional` computed in place.

Each function here performs the IEEE operations of its plain formula in the same order on the same
operands, but writes every intermediate into a tensor it owns (its fresh result, or a pooled
temporary of :mod:`.buffers`) instead of allocating one per operation. The results are therefore
the plain formula's bits. Two substitutions are used, each exact:

- ``torch.pow(2.0, k)`` for integer-valued ``k`` → ``torch.exp2(k)``: both return the exact power
  of two (0 / inf / nan for the same ``k``), and exp2 is several times faster.
- The log rounding of Log-Int-Softmax → a 512-entry table indexed by the exponent and first
  mantissa bit of ``y`` (:func:`.tables.lis_table`, proof there).

Only valid without autograd (the dispatcher checks) and for float32 where stated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bit_type import BitType
from ..functional import IBERT_B, IBERT_C, INT_EXP_N, LN2
from .buffers import reused_tensor
from .tables import lis_table

__all__ = [
    "fake_quantize",
    "ptf_channel_errors",
    "omse_chunk_errors",
    "extreme_values",
    "int_exp",
    "log_int_softmax",
    "int_layernorm",
]


def _temporary(name: str, like: Tensor) -> Tensor:
    """A scratch tensor of ``like``'s shape, dtype and device: pooled on CPU, fresh elsewhere
    (CUDA's caching allocator already reuses memory)."""
    if like.device.type != "cpu":
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return reused_tensor(name, like.shape, like.dtype, like.device)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.fake_quantize`, in place on the fresh quotient ``x / scale``
    (``scale`` and ``zero_point`` broadcast to ``x``'s shape and dtype: see :func:`fits_in_place`)."""
    q = x / scale
    return (
        q.add_(zero_point)
        .round_()
        .clamp_(bit_type.lower, bit_type.upper)
        .sub_(zero_point)
        .mul_(scale)
    )


def fits_in_place(out: Tensor, other: Tensor) -> bool:
    """Whether ``out.op_(other)`` gives the shape and dtype of ``out op other`` (pure Python, so that
    torch.compile does not break its graph here)."""
    if other.dtype != out.dtype or other.dim() > out.dim():
        return False
    return all(o == 1 or o == t for o, t in zip(reversed(other.shape), reversed(out.shape)))


def ptf_channel_errors(
    x_channels: Tensor, scales: Tensor, zero_point: Tensor, bit_type: BitType
) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.ptf_channel_errors` with the difference and its float64
    square formed in place (a float32 difference squared is exact in float64: ``d * d == d.pow(2)``)."""
    x = x_channels.unsqueeze(0)
    diff = fake_quantize(x, scales.reshape(-1, 1, 1), zero_point, bit_type)
    squares = diff.sub_(x).double()
    return squares.mul_(squares).sum(dim=2).t()


def omse_chunk_errors(
    flat: Tensor, scales: Tensor, zero_points: Tensor, bit_type: BitType, chunks: list[list[int]]
) -> list[Tensor]:
    """The float64 error sums of the OMSE candidates in each chunk of candidate indices.

    ``flat`` is ``[1, n]`` float32; each chunk is one ``[len(chunk), n]`` row sum, as in
    :func:`~fqvit_pl.quant.functional.omse_candidate_errors`, computed in two reused buffers.
    """
    rows = max((len(c) for c in chunks), default=0)
    quotient = reused_tensor("omse.quotient", (rows, flat.shape[1]), flat.dtype, flat.device)
    squares = reused_tensor("omse.squares", (rows, flat.shape[1]), torch.float64, flat.device)
    errors = []
    for chunk in chunks:
        contiguous = chunk[-1] - chunk[0] + 1 == len(chunk)
        index = slice(chunk[0], chunk[-1] + 1) if contiguous else chunk
        s, z = scales[index][:, None], zero_points[index][:, None]
        q = torch.div(flat, s, out=quotient[: len(chunk)])
        q.add_(z).round_().clamp_(bit_type.lower, bit_type.upper).sub_(z).mul_(s).sub_(flat)
        d = squares[: len(chunk)]
        d.copy_(q)
        errors.append(d.mul_(d).sum(dim=1))
    return errors


def extreme_values(
    values: Tensor, upper_k: int, lower_k: int, *, rows: int = 4096
) -> tuple[Tensor, Tensor]:
    """The multisets of :func:`~fqvit_pl.quant.functional.extreme_values` at about the cost of an
    ``amax`` and an ``amin`` pass.

    The data is cut into ``rows`` slices. If ``M`` is the k-th largest slice maximum, ``k`` slices
    hold an entry ``>= M``, so the k-th largest entry is ``>= M`` and every one of the ``k`` largest
    lies in a slice whose maximum is ``>= M`` (``>=`` keeps every slice that could hold a tied
    copy). ``topk`` then runs on those few slices only. With a NaN the plain ``topk`` runs (NaN
    sorts above everything there).
    """
    values = values.reshape(-1)
    per_row = values.numel() // rows
    if per_row < 2 or max(upper_k, lower_k) * 4 > rows:
        return _topk_both(values, upper_k, lower_k)
    head, rest = values[: per_row * rows].view(rows, per_row), values[per_row * rows :]
    # amax and amin separately: torch.aminmax(dim=1) is several times slower on CPU.
    row_max, row_min = head.amax(dim=1), head.amin(dim=1)
    if bool(torch.isnan(row_max).any()):
        return _topk_both(values, upper_k, lower_k)

    def tail(row_extreme: Tensor, k: int, largest: bool) -> Tensor:
        if k == 0:
            return values[:0]
        bound = torch.topk(row_extreme, k, largest=largest, sorted=False).values
        keep = row_extreme >= bound.min() if largest else row_extreme <= bound.max()
        candidates = torch.cat([head[keep].reshape(-1), rest])
        return torch.topk(candidates, k, largest=largest, sorted=False).values

    return tail(row_max, upper_k, True), tail(row_min, lower_k, False)


def _topk_both(values: Tensor, upper_k: int, lower_k: int) -> tuple[Tensor, Tensor]:
    return (
        torch.topk(values, upper_k, largest=True, sorted=False).values,
        torch.topk(values, lower_k, largest=False, sorted=False).values,
    )


def int_exp(x: Tensor, scale: Tensor, n: int = INT_EXP_N) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.int_exp` (float32) into a fresh tensor."""
    x0 = torch.floor(-LN2 / scale)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _int_exp_into(torch.maximum(x, n * x0), x0, scale, n, out)


def _int_exp_into(x: Tensor, x0: Tensor, scale: Tensor, n: int, out: Tensor) -> Tensor:
    """The integer exponential of ``x = maximum(x, n * x0)``, which it overwrites, into ``out``
    (contiguous, ``x``'s shape)."""
    q = torch.div(x, x0, out=_temporary("int_exp.q", x)).floor_()  # an integer in 0..n
    z = torch.mul(q, x0, out=out)
    r = x.sub_(z)  # r = x - x0 * q
    z = torch.add(r, torch.floor(IBERT_B / scale), out=z)
    z.mul_(r).add_(torch.floor(IBERT_C / scale**2))  # z = r * (r + floor(B / s)) + floor(C / s**2)
    # 2**(n - q): -q + n is n - q exactly, and exp2 of an integer is pow(2.0, .)'s exact power.
    return z.mul_(q.neg_().add_(n).exp2_()).floor_().clamp_(min=0)


def inverse_probabilities(e: Tensor, out: Tensor | None = None) -> Tensor:
    """§8 step 3: ``y = round(sum_row(e) / e)`` over the last dim (1 / probability; inf where ``e == 0``)."""
    return torch.div(e.sum(dim=-1, keepdim=True), e, out=out).round_()


def log_int_softmax(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.log_int_softmax` (float32) with one fresh tensor.

    ``amax(x / s) == amax(x) / s`` for ``s > 0`` (division by a positive number is monotone, and
    every scale is ``>= EPS``), so the maximum is taken before the division. ``out`` carries ``e``,
    then ``y``, then the result; the shifted scores (then the table keys) are a pooled temporary.
    """
    out = torch.empty(x.shape, device=x.device)
    shifted = torch.div(x, scale, out=_temporary("softmax.shifted", x))
    shifted.sub_(x.amax(dim=-1, keepdim=True) / scale)
    n, x0 = INT_EXP_N, torch.floor(-LN2 / scale)
    shifted = torch.maximum(shifted, n * x0, out=shifted)
    e = _int_exp_into(shifted, x0, scale, n, out)
    y = inverse_probabilities(e, out=e)
    keys = torch.bitwise_right_shift(y.view(torch.int32), 22, out=shifted.view(torch.int32))
    keys.bitwise_and_(511)
    table = lis_table(bits, y.device)
    return torch.index_select(table, 0, keys.view(-1), out=out.view(-1)).view(x.shape)


def layernorm_row_stats(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    """§7 step 2 on ``x_q`` ``[..., C]`` (``squares = x_q * x_q``): ``(mean, std)``, each ``[..., 1]``."""
    channels = x_q.shape[-1]
    mean = x_q.mean(dim=-1, keepdim=True) * s_min
    std = (s_min / channels) * torch.sqrt(
        channels * squares.sum(dim=-1, keepdim=True) - x_q.sum(dim=-1, keepdim=True) ** 2
    )
    return mean, std


def int_layernorm(
    x: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    bits: int,
    eps: float = 0.0,
) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.int_layernorm` (float32; ``in_scale`` already tiled to
    ``[C]`` or ``[1]``) on pooled ``[..., C]`` temporaries; ``sign`` becomes the result, and
    ``2**N`` is computed once."""
    x_q = torch.div(x, in_scale, out=_temporary("layernorm.x_q", x)).round_()
    s_min = in_scale.min()
    x_q.mul_(torch.round(in_scale / s_min))
    # x_q.pow(2): integers below 2**12, exact either way.
    work = torch.mul(x_q, x_q, out=_temporary("layernorm.work", x))
    mean, std = layernorm_row_stats(x_q, work, s_min)
    if eps:
        std = torch.sqrt(std * std + eps)
    a = torch.mul(s_min / std, weight, out=work).div_(out_scale)
    sign = torch.sign(a)
    a.abs_()
    power = torch.log2(a, out=_temporary("layernorm.power", x))
    power.floor_().neg_().add_(bits).clamp_(0, 31).exp2_()  # 2**N
    m = a.mul_(power).floor_().clamp_(0, 2 ** (bits + 1) - 1)
    b = torch.mul(mean / std, weight, out=_temporary("layernorm.offset", x))
    b = torch.sub(bias, b, out=b).div_(out_scale).mul_(power).round_()
    y_q = sign.mul_(m).mul_(x_q).add_(b).div_(power).round_()
    return y_q.mul_(out_scale)
