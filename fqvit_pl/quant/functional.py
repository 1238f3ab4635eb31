"""The formulas of FQ-ViT, each written once, plainly, to be read next to ``docs/method.md``.

Every function here is stateless and out of place, with the formula it computes in its docstring
(the section of ``docs/method.md`` in brackets). The quantized layers call them through
:mod:`fqvit_pl.quant.kernels`, which runs faster versions of some of them that return the same
bits; ``fqvit_pl.quant.set_fast_kernels(False)`` makes every layer run the code below instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bit_type import BitType

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
    "omse_candidates",
    "omse_candidate_errors",
    "ptf_scales",
    "ptf_channel_errors",
    "log2_fake_quantize",
    "int_exp",
    "log_rounding",
    "log_int_softmax",
    "tile_channel_scales",
    "int_layernorm",
]

#: float32 machine epsilon, the smallest scale (§4).
EPS = float(torch.finfo(torch.float32).eps)

#: The I-BERT polynomial ``a (x + b)**2 + c`` approximating ``exp`` on ``(-ln 2, 0]`` (§8 step 2),
#: in the form ``r (r + B) + C`` with ``B = b / a`` and ``C = c / a`` (the polynomial divided by a).
IBERT_A = 0.35815147
IBERT_B = 0.96963238 / IBERT_A
IBERT_C = 1.0 / IBERT_A
#: ``ln 2`` as the published code writes it (§8 step 2).
LN2 = 0.6931
#: The range reduction of the integer exponential: ``x`` is clipped to ``n * x0`` (§8 step 2).
INT_EXP_N = 30


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
            f"cannot lay out an activation of rank {x.dim()} (shape {tuple(x.shape)}); "
            "expected 1-D to 4-D"
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
    """Unsigned range → ``(scale, zero_point)`` (§4).

    ``scale = max((max - min) / (upper - lower), EPS)``;
    ``zero_point = clamp(lower - round(min / scale), lower, upper)``.
    """
    scale = torch.clamp((max_val - min_val) / float(bit_type.levels), min=EPS)
    zero_point = torch.clamp(
        bit_type.lower - torch.round(min_val / scale), bit_type.lower, bit_type.upper
    )
    return scale, zero_point


def symmetric_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """Signed range → ``(scale, 0)`` (§4): ``scale = max(max(-min, max) / (levels / 2), EPS)``.

    The divisor is ``(upper - lower) / 2``: 127.5 for int8, as published.
    """
    magnitude = torch.maximum(-min_val, max_val)
    scale = torch.clamp(magnitude / (bit_type.levels / 2), min=EPS)
    return scale, torch.zeros_like(scale)


def range_to_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` for a range: symmetric for signed types, asymmetric for unsigned."""
    if bit_type.signed:
        return symmetric_qparams(min_val, max_val, bit_type)
    return asymmetric_qparams(min_val, max_val, bit_type)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """``(clamp(round(x / scale + zero_point), lower, upper) - zero_point) * scale`` (§4).

    ``round`` is half to even; ``scale``/``zero_point`` already broadcast on ``x``.
    """
    q = torch.clamp(torch.round(x / scale + zero_point), bit_type.lower, bit_type.upper)
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


def extreme_values(values: Tensor, upper_k: int, lower_k: int) -> tuple[Tensor, Tensor]:
    """The ``upper_k`` largest and the ``lower_k`` smallest entries of ``values`` (flattened), unsorted.

    The tails :func:`exact_quantile` needs (§5 percentile), by ``torch.topk``.
    """
    values = values.reshape(-1)
    return (
        torch.topk(values, upper_k, largest=True, sorted=False).values,
        torch.topk(values, lower_k, largest=False, sorted=False).values,
    )


def omse_candidates(
    min_val: Tensor, max_val: Tensor, num_candidates: int = 90
) -> tuple[Tensor, Tensor]:
    """The OMSE clipping ranges (§5 omse): ``mins[i] = min * (1 - 0.01 i)``, ``maxs[i] = max * (1 - 0.01 i)``.

    ``min_val``/``max_val`` are 0-D; returns ``(mins, maxs)``, each ``[num_candidates]`` in their
    dtype. The factor ``1 - 0.01 i`` is formed in double precision, then rounded to that dtype.
    """
    factors = torch.tensor(
        [1.0 - 0.01 * i for i in range(num_candidates)],
        dtype=min_val.dtype,
        device=min_val.device,
    )
    return min_val * factors, max_val * factors


def omse_candidate_errors(
    x: Tensor, mins: Tensor, maxs: Tensor, bit_type: BitType, chunk: int = 8
) -> Tensor:
    """Sum of squared errors ``E_i = sum (fake_quantize(x) - x)**2`` of each OMSE candidate (§5 omse).

    Candidate ``i`` quantizes with the asymmetric parameters of ``[mins[i], maxs[i]]``. Returns
    ``[K]`` float64 (the squares of float32 differences are exact in float64). The candidates are
    evaluated ``chunk`` at a time as one ``[chunk, numel]`` row sum: bounded memory, and the
    grouping is part of the result's definition (a float64 sum's last bit depends on its order).
    """
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    flat = x.reshape(1, -1)
    errors = []
    for start in range(0, scales.numel(), chunk):
        s = scales[start : start + chunk, None]
        z = zero_points[start : start + chunk, None]
        diff = fake_quantize(flat, s, z, bit_type) - flat
        errors.append(diff.double().pow(2).sum(dim=1))
    return torch.cat(errors)


def ptf_scales(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """The four Power-of-Two candidates ``[s1, s2, s4, s8]`` and the shared zero point (§5 ptf).

    ``s8 = max((max_c max - min_c min) / levels, EPS)``, ``s4 = s8 / 2``, ``s2 = s8 / 4``,
    ``s1 = s8 / 8``; ``zero_point = clamp(lower - round(min_c min / s8), lower, upper)``.
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
    """Per-channel sum of squared errors of each PTF candidate scale (§5 ptf).

    ``errors[c, j] = sum_n (fake_quantize(x[c, n], scales[j], zero_point) - x[c, n])**2`` in float64:
    ``[C, n]`` → ``[C, 4]``.
    """
    x = x_channels.unsqueeze(0)  # [1, C, n]
    diff = fake_quantize(x, scales.reshape(-1, 1, 1), zero_point, bit_type) - x
    return diff.double().pow(2).sum(dim=2).t()


def log2_fake_quantize(p: Tensor, bit_type: BitType) -> Tensor:
    """Log2 quantizer of probabilities: ``2**-clamp(round(-log2 p), 0, 2**b - 1)``, 0 where it overflows."""
    r = torch.round(-torch.log2(p))
    out = torch.pow(2.0, -torch.clamp(r, 0, 2**bit_type.bits - 1))
    return torch.where(r >= 2**bit_type.bits, torch.zeros_like(out), out)


def int_exp(x: Tensor, scale: Tensor, n: int = INT_EXP_N) -> Tensor:
    """I-BERT's integer exponential (§8 step 2) of integer-valued ``x <= 0`` in units of ``scale``.

    ``x0 = floor(-ln2 / s)``; ``x = maximum(x, n x0)``; ``q = floor(x / x0)``; ``r = x - x0 q``;
    ``z = r (r + floor(B / s)) + floor(C / s**2)``; ``e = max(floor(z 2**(n - q)), 0)``, so that
    ``e * a s**2 2**-n`` approximates ``exp(x s)``.
    """
    x0 = torch.floor(-LN2 / scale)
    x = torch.maximum(x, n * x0)
    q = torch.floor(x / x0)
    r = x - x0 * q
    z = r * (r + torch.floor(IBERT_B / scale)) + torch.floor(IBERT_C / scale**2)
    return torch.clamp(torch.floor(z * torch.pow(2.0, n - q)), min=0)


def log_rounding(y: Tensor, bits: int) -> Tensor:
    """§8 steps 4-5: ``2**-r`` for ``y >= 1``, with ``r`` the rounded ``log2 y``; 0 where ``r >= 2**bits``.

    ``f = floor(log2 y)``; ``r = f + 1`` where ``y - 2**f >= 2**(f - 1)``, else ``f``;
    output ``2**-clamp(r, 0, 2**bits - 1)``. ``y = inf`` (a zero exponential) gives 0.
    """
    levels = 2**bits
    f = torch.floor(torch.log2(y))
    r = torch.where(y - torch.pow(2.0, f) >= torch.pow(2.0, f - 1), f + 1, f)
    out = torch.pow(2.0, -torch.clamp(r, 0, levels - 1))
    return torch.where(r >= levels, torch.zeros_like(out), out)


def log_int_softmax(x: Tensor, scale: Tensor, bit_type: BitType) -> Tensor:
    """Log-Int-Softmax over the last dim (§8): outputs 0 or ``2**-k`` with ``0 <= k < 2**bits``.

    ``x`` is the fake-quantized score tensor, ``scale`` the (scalar) scale of its quantization
    point. ``x / s`` minus its row maximum; ``e = int_exp``; ``y = round(sum_row(e) / e)`` (one over
    the probability); then :func:`log_rounding`.
    """
    x = x / scale
    x = x - x.amax(dim=-1, keepdim=True)
    e = int_exp(x, scale)
    y = torch.round(e.sum(dim=-1, keepdim=True) / e)
    return log_rounding(y, bit_type.bits)


def tile_channel_scales(in_scale: Tensor, channels: int) -> Tensor:
    """The input scales of a LayerNorm over ``channels`` channels (§7): ``[channels]`` or ``[1]``.

    A point with ``C`` scales before a norm over ``k C`` channels (Swin's patch merging) has its
    scales tiled ``k`` times in channel order; a per-tensor scale stays one value.
    """
    in_scale = in_scale.reshape(-1)
    if in_scale.numel() not in (1, channels):
        if channels % in_scale.numel():
            raise ValueError(
                f"{in_scale.numel()} input scales cannot be tiled over {channels} channels"
            )
        in_scale = in_scale.repeat(channels // in_scale.numel())
    return in_scale


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

    1. ``x_q = round(x / s_in) * round(s_in / s_min)``: integers in units of ``s_min = min(s_in)``.
    2. ``mean = mean_c(x_q) s_min``; ``std = (s_min / C) sqrt(C sum_c x_q**2 - (sum_c x_q)**2)``.
    3. ``A = (s_min / std) gamma / s_out``; ``N = clamp(bits - floor(log2 |A|), 0, 31)``;
       ``M = clamp(floor(|A| 2**N), 0, 2**(bits + 1) - 1)``.
    4. ``B = round((beta - (mean / std) gamma) / s_out 2**N)``.
    5. ``y_q = round((sign(A) M x_q + B) / 2**N)``; returns ``y_q * s_out``.

    There is no epsilon by default (as published): a constant token divides by 0 and gives NaN.
    ``eps > 0`` (opt-in) takes ``std = sqrt(std**2 + eps)``, as ``nn.LayerNorm`` adds its
    epsilon to the variance.
    """
    channels = x.shape[-1]
    in_scale = tile_channel_scales(in_scale, channels)
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
