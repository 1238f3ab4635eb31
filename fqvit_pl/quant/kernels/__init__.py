"""Fast kernels of fqvit_pl.quant, behind one switch: the only place where speed work lives.

The quantized layers call the functions below; each runs either a fast version or the plain
formula of :mod:`fqvit_pl.quant.functional`, with the same bits either way (the tests compare
them). The fast versions are:

==============================  ===============================================================
eager, no autograd              in-place chains and pooled temporaries (:mod:`.inplace`,
                                :mod:`.buffers`), table lookups (:mod:`.tables`)
under torch.compile             fusable out-of-place chains with order-dependent sums as opaque
                                ATen custom ops (:mod:`.traced`); float GELU, softmax, LayerNorm,
                                mean and conv2d as opaque ATen ops (:mod:`.aten_ops`)
OMSE search                     exact pruning from one binning pass (:mod:`.omse_pruning`)
percentile tails                ``topk`` on the few slices that can hold them (:mod:`.inplace`)
==============================  ===============================================================

``set_fast_kernels(False)`` (or ``with fast_kernels(False):``) runs the plain formulas everywhere,
as timm's ``set_fused_attn`` does for its attention. The fast paths need no autograd (grad mode
off, or no input requiring grad) and float32 data where stated; otherwise the plain formula runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import functional
from ..bit_type import BitType
from ..reduce import StatReducer
from . import aten_ops, inplace, omse_pruning, traced
from .buffers import release_buffers
from .tables import build_kernel_tables

__all__ = [
    "set_fast_kernels",
    "fast_kernels_enabled",
    "fast_kernels",
    "release_buffers",
    "build_kernel_tables",
    "fake_quantize",
    "ptf_channel_errors",
    "extreme_values",
    "omse_best_candidate",
    "log_int_softmax",
    "int_layernorm",
    "gelu",
    "softmax",
    "layer_norm",
    "mean",
    "conv2d",
    "GELU",
    "Mean",
]

_FAST_KERNELS = True


def set_fast_kernels(enabled: bool) -> None:
    """Switch the fast kernels on (the default) or off (the plain formulas everywhere)."""
    global _FAST_KERNELS
    _FAST_KERNELS = bool(enabled)


def fast_kernels_enabled() -> bool:
    """Whether the fast kernels are on."""
    return _FAST_KERNELS


@contextlib.contextmanager
def fast_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, the fast kernels are on (``enabled``) or off; the previous setting after."""
    previous = _FAST_KERNELS
    set_fast_kernels(enabled)
    try:
        yield
    finally:
        set_fast_kernels(previous)


def _without_autograd(*tensors: Tensor) -> bool:
    """Whether in-place chains are safe: grad mode off, or no input requires grad."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _float32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def _in_place_fits(x: Tensor, scale: Tensor, zero_point: Tensor) -> bool:
    """Whether ``x / scale`` has ``x``'s shape and dtype and ``zero_point`` fits it, so that the
    quotient can carry the whole chain in place (pure Python: no graph break under torch.compile)."""
    return x.dtype == scale.dtype == zero_point.dtype and all(
        inplace.fits_in_place(x, t) for t in (scale, zero_point)
    )


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.fake_quantize`."""
    if (
        _FAST_KERNELS
        and _without_autograd(x, scale, zero_point)
        and _in_place_fits(x, scale, zero_point)
    ):
        return inplace.fake_quantize(x, scale, zero_point, bit_type)
    return functional.fake_quantize(x, scale, zero_point, bit_type)


def ptf_channel_errors(
    x_channels: Tensor, scales: Tensor, zero_point: Tensor, bit_type: BitType
) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.ptf_channel_errors`."""
    if _FAST_KERNELS and _without_autograd(x_channels, scales, zero_point):
        if x_channels.dtype == scales.dtype == zero_point.dtype:
            return inplace.ptf_channel_errors(x_channels, scales, zero_point, bit_type)
    return functional.ptf_channel_errors(x_channels, scales, zero_point, bit_type)


def extreme_values(values: Tensor, upper_k: int, lower_k: int) -> tuple[Tensor, Tensor]:
    """:func:`~fqvit_pl.quant.functional.extreme_values` (the same multisets)."""
    if _FAST_KERNELS:
        return inplace.extreme_values(values, upper_k, lower_k)
    return functional.extreme_values(values, upper_k, lower_k)


def omse_best_candidate(
    x: Tensor, mins: Tensor, maxs: Tensor, bit_type: BitType, reducer: StatReducer
) -> int:
    """The OMSE candidate with the least error on ``x`` (§5 omse): the first minimum of
    :func:`~fqvit_pl.quant.functional.omse_candidate_errors` summed over processes by ``reducer``.

    ``x`` is the last batch laid out ``[C, n]``; ``mins``/``maxs`` ``[K]`` from
    :func:`~fqvit_pl.quant.functional.omse_candidates`. Every process must call this together.
    """
    if _FAST_KERNELS:
        return omse_pruning.omse_search(x, mins, maxs, bit_type, reducer).index
    errors = reducer.reduce(functional.omse_candidate_errors(x, mins, maxs, bit_type), "sum")
    return int(torch.argmin(errors))  # the first minimum: the earliest candidate wins a tie


def log_int_softmax(x: Tensor, scale: Tensor, bit_type: BitType) -> Tensor:
    """:func:`~fqvit_pl.quant.functional.log_int_softmax`."""
    if _FAST_KERNELS and _without_autograd(x, scale) and _float32(x, scale):
        if torch.compiler.is_compiling():
            return traced.log_int_softmax(x, scale, bit_type.bits)
        return inplace.log_int_softmax(x, scale, bit_type.bits)
    return functional.log_int_softmax(x, scale, bit_type)


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
    """:func:`~fqvit_pl.quant.functional.int_layernorm`."""
    tensors = (x, in_scale, out_scale, weight, bias)
    if _FAST_KERNELS and _without_autograd(*tensors) and _float32(*tensors):
        in_scale = functional.tile_channel_scales(in_scale, x.shape[-1])
        if torch.compiler.is_compiling():
            return traced.int_layernorm(x, in_scale, out_scale, weight, bias, bits, eps)
        return inplace.int_layernorm(x, in_scale, out_scale, weight, bias, bits, eps)
    return functional.int_layernorm(x, in_scale, out_scale, weight, bias, bits=bits, eps=eps)


def _aten_while_compiling() -> bool:
    return _FAST_KERNELS and torch.compiler.is_compiling()


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU; ATen's kernel also under torch.compile (:mod:`.aten_ops`)."""
    return torch.ops.fqvit.gelu(x) if _aten_while_compiling() else aten_ops.gelu(x)


def softmax(x: Tensor, dim: int) -> Tensor:
    """Float softmax along ``dim``; ATen's kernel also under torch.compile."""
    return torch.ops.fqvit.softmax(x, dim) if _aten_while_compiling() else aten_ops.softmax(x, dim)


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``F.layer_norm``; ATen's kernel also under torch.compile."""
    shape = list(normalized_shape)
    if _aten_while_compiling():
        return torch.ops.fqvit.layer_norm(x, shape, weight, bias, eps)
    return aten_ops.layer_norm(x, shape, weight, bias, eps)


def mean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` (removed); ATen's kernel also under torch.compile."""
    return torch.ops.fqvit.mean(x, dim) if _aten_while_compiling() else aten_ops.mean(x, dim)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``F.conv2d`` with integer paddings; ATen's kernel and layout also under torch.compile."""
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups)
    return torch.ops.fqvit.conv2d(*args) if _aten_while_compiling() else aten_ops.conv2d(*args)


class GELU(nn.GELU):
    """``nn.GELU`` (erf form) through :func:`gelu`: what a model's ``nn.GELU`` is swapped for
    (see :func:`fqvit_pl.models.use_fast_float_ops`)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


class Mean(nn.Module):
    """The mean over ``dim`` (removed) through :func:`mean`, as a module."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return mean(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
