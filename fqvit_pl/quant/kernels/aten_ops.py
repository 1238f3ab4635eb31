"""Float operations that a compiled model runs with eager's ATen kernels, so that it keeps eager's bits.

torch.compile (inductor) generates its own code for GELU, softmax, LayerNorm and mean reductions
and picks its own memory layout and algorithm for convolutions. Their results can differ from
ATen's in the last bit, and the quantization point that follows turns such a difference into a
whole level now and then, which then spreads through the network. Each operation here is registered
as a custom op (``torch.ops.fqvit.*``) around the ATen call, which inductor leaves opaque and hands
its inputs in eager's strides (``needs_fixed_stride_order``: a convolution's algorithm depends on
its input's layout). The fake versions run the same calls on fake tensors: eager's output shapes
and strides. Elementwise arithmetic and matmuls need nothing: both compute them as eager does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gelu", "softmax", "layer_norm", "mean", "conv2d"]


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, elementwise."""
    return F.gelu(x)


def softmax(x: Tensor, dim: int) -> Tensor:
    """Float softmax along ``dim``."""
    return x.softmax(dim=dim)


def layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Float LayerNorm over the trailing ``normalized_shape`` dims, as ``F.layer_norm``."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def mean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` (removed)."""
    return x.mean(dim=dim)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """``F.conv2d`` with integer paddings: ``[B, C_in, H, W]`` → ``[B, C_out, H', W']``."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


for _name, _fn in (
    ("gelu", gelu),
    ("softmax", softmax),
    ("layer_norm", layer_norm),
    ("mean", mean),
    ("conv2d", conv2d),
):
    torch.library.custom_op(
        f"fqvit::{_name}", _fn, mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
    ).register_fake(_fn)
