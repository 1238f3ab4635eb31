"""Float operations that a compiled model runs with eager's ATen kernels, so that it keeps eager's bits.

torch.compile (inductor) generates its own code for GELU, softmax, LayerNorm and mean reductions
and picks its own memory layout and algorithm for convolutions. Their results can differ from
ATen's in the last bit, and the quantization point that follows turns such a difference into a
whole level now and then: before these wrappers, 45% of a compiled deit_tiny's logits differed
from the eager model's. Each function below calls the ATen operation directly in eager mode and,
while torch.compile traces, a custom op (``torch.ops.fqvit.*``) around the same call, which
inductor leaves opaque. Elementwise arithmetic (``+ - * /``, round, clamp ...) is correctly
rounded in both and matmuls are ATen's in both, so they need nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gelu", "softmax", "layer_norm", "mean", "conv2d"]


# The ATen calls themselves: run directly in eager mode, and inside the custom ops while compiling.


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def _softmax(x: Tensor, dim: int) -> Tensor:
    return x.softmax(dim=dim)


def _layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _mean(x: Tensor, dim: int) -> Tensor:
    return x.mean(dim=dim)


def _conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# The custom ops, opaque to inductor, which hands them their inputs in eager's strides
# (``needs_fixed_stride_order``: a convolution's algorithm depends on its input's layout). Their
# fake versions run the same calls on fake tensors: eager's output shapes and strides.
for _name, _fn in (
    ("gelu", _gelu),
    ("softmax", _softmax),
    ("layer_norm", _layer_norm),
    ("mean", _mean),
    ("conv2d", _conv2d),
):
    torch.library.custom_op(
        f"fqvit::{_name}", _fn, mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,)
    ).register_fake(_fn)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, elementwise."""
    return torch.ops.fqvit.gelu(x) if torch.compiler.is_compiling() else _gelu(x)


def softmax(x: Tensor, dim: int) -> Tensor:
    """Float softmax along ``dim``."""
    return torch.ops.fqvit.softmax(x, dim) if torch.compiler.is_compiling() else _softmax(x, dim)


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Float LayerNorm over the trailing ``normalized_shape`` dims, as ``F.layer_norm``."""
    shape = list(normalized_shape)
    return (
        torch.ops.fqvit.layer_norm(x, shape, weight, bias, eps)
        if torch.compiler.is_compiling()
        else _layer_norm(x, shape, weight, bias, eps)
    )


def mean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` (removed)."""
    return torch.ops.fqvit.mean(x, dim) if torch.compiler.is_compiling() else _mean(x, dim)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``F.conv2d`` with integer paddings: ``[B, C_in, H, W]`` → ``[B, C_out, H', W']``."""
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups)
    return torch.ops.fqvit.conv2d(*args) if torch.compiler.is_compiling() else _conv2d(*args)
