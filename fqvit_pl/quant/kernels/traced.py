"""Compiled paths: the integer LayerNorm and Log-Int-Softmax written for torch.compile to fuse.

The same IEEE operations on the same operands as the plain formulas (so the same bits), out of
place so that inductor can fuse the elementwise chains, except where the compiled code could
round differently from eager:

- The float32 row sums whose rounding depends on the summation order (the LayerNorm's sum of
  squares and the softmax's sum of the integer exponentials both exceed 2**24) run as opaque
  custom ops (``torch.ops.fqvit.*``) that call the ATen code eager runs, on the same tensors. The
  LayerNorm's per-token std goes with them: ATen's CPU ``sqrt`` comes from a vector math library
  whose last bit is not always that of inductor's correctly rounded one.
- No ``log2`` or ``exp2`` per element, whose last bit could depend on the implementation:
  ``floor(log2)`` and powers of two come from exponent bits and the tables of :mod:`.tables`.

Every other operation is elementwise IEEE arithmetic that inductor computes as ATen does (true
division, no contraction or unsafe math by default), a max, integer bit manipulation or a table
lookup.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import IBERT_B, IBERT_C, INT_EXP_N, LN2
from .inplace import inverse_probabilities, layernorm_row_stats
from .tables import (
    layernorm_power,
    lis_table,
    power_of_two,
    probabilities_from_keys,
)

__all__ = ["log_int_softmax", "int_layernorm", "lis_from_keys"]


@torch.library.custom_op(
    "fqvit::inverse_probabilities", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
)
def _inverse_probabilities_op(e: Tensor) -> Tensor:
    """:func:`.inplace.inverse_probabilities` by ATen (reading ``e`` once here is also cheaper than
    inductor's recomputing it for the division)."""
    return inverse_probabilities(e)


@_inverse_probabilities_op.register_fake
def _(e: Tensor) -> Tensor:
    return torch.empty_like(e)


@torch.library.custom_op(
    "fqvit::layernorm_row_stats", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
)
def _layernorm_row_stats_op(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`.inplace.layernorm_row_stats` run by ATen."""
    return layernorm_row_stats(x_q, squares, s_min)


@_layernorm_row_stats_op.register_fake
def _(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    return x_q.new_empty(x_q.shape[:-1] + (1,)), x_q.new_empty(x_q.shape[:-1] + (1,))


def log_int_softmax(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.log_int_softmax` (float32) for torch.compile."""
    x = x / scale - x.amax(dim=-1, keepdim=True) / scale
    # Eager evaluates ``number / tensor`` as ``tensor.reciprocal() * number``: spelled out, so that
    # the trace does not depend on how dynamo maps Python's ``/``.
    n, x0 = INT_EXP_N, torch.floor(torch.reciprocal(scale) * -LN2)
    x = torch.maximum(x, n * x0)
    q = torch.floor(x / x0)
    r = x - q * x0
    b = torch.floor(torch.reciprocal(scale) * IBERT_B)
    c = torch.floor(torch.reciprocal(scale**2) * IBERT_C)
    z = (r + b) * r + c
    e = torch.clamp(torch.floor(z * power_of_two(-q + n)), min=0)
    y = torch.ops.fqvit.inverse_probabilities(e)
    keys = torch.bitwise_and(torch.bitwise_right_shift(y.view(torch.int32), 22), 511)
    if 2**bits - 1 > 126:  # outputs below 2**-126: keep the table
        return lis_table(bits, y.device)[keys]
    return lis_from_keys(keys, bits)


def lis_from_keys(keys: Tensor, bits: int) -> Tensor:
    """The entries of :func:`.tables.lis_table` for int32 ``keys``, by the rule the table encodes
    (``r = E - 127 + h``) instead of a gather: faster in a fused compiled kernel. For
    ``2**bits - 1 <= 126`` (every output a normal float)."""
    out = probabilities_from_keys(keys, bits, exponent_bias=127)
    return torch.where(keys == 511, float("nan"), out)  # 510, inf (e == 0): 0 as r >= levels


def int_layernorm(
    x: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    bits: int,
    eps: float = 0.0,
) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.int_layernorm` (float32, ``in_scale`` tiled) for torch.compile."""
    s_min = in_scale.min()
    x_q = torch.round(x / in_scale) * torch.round(in_scale / s_min)
    mean, std = torch.ops.fqvit.layernorm_row_stats(x_q, x_q * x_q, s_min)
    if eps:
        std = torch.sqrt(std * std + eps)
    a = (s_min / std) * weight / out_scale
    sign = torch.sign(a)
    a = torch.abs(a)
    p = layernorm_power(a, bits)
    m = torch.clamp(torch.floor(a * p), 0, 2 ** (bits + 1) - 1)
    b = torch.round((bias - (mean / std) * weight) / out_scale * p)
    y_q = torch.round((sign * m * x_q + b) / p)
    return y_q * out_scale
