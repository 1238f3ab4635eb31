"""Pure tensor functions of the method: one definition of each formula of the contract.

Every function here is stateless; the modules in this package are thin wrappers around them.
Section numbers refer to ``shared/docs/fqvit-method.md``.
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
    "omse_candidate_errors",
    "ptf_scales",
    "ptf_channel_errors",
    "log2_fake_quantize",
    "int_exp",
    "log_int_softmax",
    "int_layernorm",
]

#: float32 machine epsilon, the smallest scale (§4).
EPS = float(torch.finfo(torch.float32).eps)


def channel_layout(x: Tensor, *, weight: bool = False) -> Tensor:
    """Lay a tensor out as ``[C, -1]`` for statistics (§3).

    Weights ``[out, ...]`` → ``[out, prod(rest)]``. Activations: 4-D is taken as NCHW and moved to
    NHWC, then ``[-1, C]`` (C the last dim) is transposed to ``[C, -1]``. Raises ``ValueError`` for
    a rank that cannot be laid out (0-D, or more than 4-D activations).
    """
    if weight:
        if x.dim() < 2:
            raise ValueError(f"a weight needs at least 2 dims [out, in, ...], got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    elif not 1 <= x.dim() <= 3:
        raise ValueError(f"cannot lay out an activation of rank {x.dim()} (shape {tuple(x.shape)}); expected 1-D to 4-D")
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


def asymmetric_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """Unsigned range → ``(scale, zero_point)`` (§4): ``scale = max((max-min)/levels, eps)``."""
    scale = torch.clamp((max_val - min_val) / float(bit_type.levels), min=EPS)
    zero_point = torch.clamp(bit_type.lower - torch.round(min_val / scale), bit_type.lower, bit_type.upper)
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


def omse_candidate_errors(
    x: Tensor, min_val: Tensor, max_val: Tensor, bit_type: BitType, num_candidates: int = 90, chunk: int = 8
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of squared errors of the OMSE clipping candidates on ``x`` (§5 omse).

    Candidate ``i`` uses range ``[min*(1-0.01i), max*(1-0.01i)]``. Returns ``(errors[num_candidates]``
    in float64, ``mins[num_candidates]``, ``maxs[num_candidates])``. Candidates are evaluated
    ``chunk`` at a time (vectorized, bounded memory), never element by element.
    """
    # (1 - 0.01 i) is formed in double precision, then the product is taken in x's dtype.
    factors = torch.tensor([1.0 - 0.01 * i for i in range(num_candidates)], dtype=x.dtype, device=x.device)
    mins = min_val.to(x.device) * factors
    maxs = max_val.to(x.device) * factors
    scales, zero_points = asymmetric_qparams(mins, maxs, bit_type)
    flat = x.reshape(1, -1)
    errors = []
    for start in range(0, num_candidates, chunk):
        s = scales[start : start + chunk, None]
        z = zero_points[start : start + chunk, None]
        diff = fake_quantize(flat, s, z, bit_type) - flat
        errors.append(diff.double().pow(2).sum(dim=1))
    return torch.cat(errors), mins, maxs


def ptf_scales(min_val: Tensor, max_val: Tensor, bit_type: BitType) -> tuple[Tensor, Tensor]:
    """The four Power-of-Two candidates ``[s1, s2, s4, s8]`` and the shared zero point (§5 ptf).

    ``min_val``/``max_val`` are per-channel ``[C]``; returns ``(scales[4], zero_point[])``.
    """
    max_t, min_t = max_val.max(), min_val.min()
    s8 = torch.clamp((max_t - min_t) / float(bit_type.levels), min=EPS)
    zero_point = torch.clamp(bit_type.lower - torch.round(min_t / s8), bit_type.lower, bit_type.upper)
    return torch.stack([s8 / 8, s8 / 4, s8 / 2, s8]), zero_point


def ptf_channel_errors(x_channels: Tensor, scales: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """Per-channel sum of squared errors of each PTF candidate scale: ``[C, n]`` → ``[C, 4]`` (float64)."""
    x = x_channels.unsqueeze(0)  # [1, C, n]
    diff = fake_quantize(x, scales.reshape(-1, 1, 1), zero_point, bit_type) - x
    return diff.double().pow(2).sum(dim=2).t()


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
    x = torch.maximum(x, n * x0)
    q = torch.floor(x / x0)
    r = x - x0 * q
    z = r * (r + torch.floor(b / scale)) + torch.floor(c / scale**2)
    return torch.clamp(torch.floor(z * torch.pow(2.0, n - q)), min=0)


def log_int_softmax(x: Tensor, scale: Tensor, bit_type: BitType) -> Tensor:
    """Log-Int-Softmax over the last dim (§8): outputs 0 or ``2**-k`` with ``0 <= k < 2**bits``.

    ``x`` is the fake-quantized score tensor, ``scale`` the (scalar) scale of its quantization point.
    """
    x = x / scale
    x = x - x.amax(dim=-1, keepdim=True)
    e = int_exp(x, scale)
    y = torch.round(e.sum(dim=-1, keepdim=True) / e)  # 1 / probability; inf where e == 0
    f = torch.floor(torch.log2(y))
    r = torch.where(y - torch.pow(2.0, f) >= torch.pow(2.0, f - 1), f + 1, f)
    levels = 2**bit_type.bits
    out = torch.pow(2.0, -torch.clamp(r, 0, levels - 1))
    return torch.where(r >= levels, torch.zeros_like(out), out)


def int_layernorm(
    x: Tensor, in_scale: Tensor, out_scale: Tensor, weight: Tensor, bias: Tensor, *, bits: int = 7
) -> Tensor:
    """Integer LayerNorm over the last dim with Power-of-Two Factor inputs (§7).

    ``x`` is ``[..., C]`` fake-quantized with per-channel ``in_scale`` (``[C]``, a divisor of ``C``
    channels tiled in channel order, or a scalar); ``out_scale`` is the scale of the following point.
    Returns ``y_q * out_scale``. There is no epsilon (as published): a constant token divides by 0.
    """
    channels = x.shape[-1]
    in_scale = in_scale.reshape(-1)
    if in_scale.numel() not in (1, channels):
        if channels % in_scale.numel():
            raise ValueError(f"{in_scale.numel()} input scales cannot be tiled over {channels} channels")
        in_scale = in_scale.repeat(channels // in_scale.numel())
    x_q = torch.round(x / in_scale)
    s_min = in_scale.min()
    x_q = x_q * torch.round(in_scale / s_min)
    mean = x_q.mean(dim=-1, keepdim=True) * s_min
    std = (s_min / channels) * torch.sqrt(channels * x_q.pow(2).sum(dim=-1, keepdim=True) - x_q.sum(dim=-1, keepdim=True) ** 2)
    a = (s_min / std) * weight / out_scale
    sign = torch.sign(a)
    n = torch.clamp(bits - torch.floor(torch.log2(a.abs())), 0, 31)
    m = torch.clamp(torch.floor(a.abs() * torch.pow(2.0, n)), 0, 2 ** (bits + 1) - 1)
    b = torch.round((bias - (mean / std) * weight) / out_scale * torch.pow(2.0, n))
    y_q = torch.round((sign * m * x_q + b) / torch.pow(2.0, n))
    return y_q * out_scale
