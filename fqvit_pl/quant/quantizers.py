"""Quantizers: modules that hold frozen quantization parameters and fake-quantize with them (§4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .bit_type import BitType
from .functional import broadcast_channel, log2_fake_quantize

__all__ = [
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "build_quantizer",
    "QUANTIZER_CLASSES",
]


class Quantizer(nn.Module):
    """Base quantizer: ``forward(x)`` returns the fake-quantized ``x`` (same shape)."""

    def __init__(self, bit_type: BitType) -> None:
        super().__init__()
        self.bit_type = bit_type

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Freeze the parameters computed by an observer."""

    def extra_repr(self) -> str:
        return self.bit_type.name


class UniformQuantizer(Quantizer):
    """Uniform affine fake quantization with ``scale``/``zero_point`` buffers (``[C]`` or ``[]``)."""

    def __init__(
        self, bit_type: BitType, num_channels: int, per_channel: bool, weight: bool = False
    ) -> None:
        super().__init__(bit_type)
        self.weight = weight
        shape = (num_channels,) if per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: Tensor) -> Tensor:
        scale = broadcast_channel(self.scale, x, weight=self.weight)
        zero_point = broadcast_channel(self.zero_point, x, weight=self.weight)
        return kernels.fake_quantize(x, scale, zero_point, self.bit_type)


class Log2Quantizer(Quantizer):
    """Log2 fake quantization of values in (0, 1]: ``2**-round(-log2 x)`` on a ``bits``-wide grid."""

    def forward(self, x: Tensor) -> Tensor:
        return log2_fake_quantize(x, self.bit_type)


#: Every quantizer by the name configurations use.
QUANTIZER_CLASSES: dict[str, type[Quantizer]] = {
    "uniform": UniformQuantizer,
    "log2": Log2Quantizer,
}


def build_quantizer(
    kind: str, bit_type: BitType, num_channels: int, per_channel: bool, weight: bool = False
) -> Quantizer:
    """Instantiate the quantizer named ``kind`` (uniform, log2)."""
    if kind == "uniform":
        return UniformQuantizer(bit_type, num_channels, per_channel, weight)
    if kind == "log2":
        return Log2Quantizer(bit_type)
    raise ValueError(f"unknown quantizer {kind!r}; choose one of {tuple(QUANTIZER_CLASSES)}")
