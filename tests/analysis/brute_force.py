"""The brute-force reference of the report's sensitivity tests: one full forward per switch setting."""

from typing import Callable

import torch
from torch import Tensor, nn

from fqvit_pl.quant import quant_modules


def logits_with(model: nn.Module, images: Tensor, quantized: Callable[[str], bool]) -> Tensor:
    """``model(images)`` with exactly the points whose name satisfies ``quantized`` switched on."""
    for module in quant_modules(model):
        module.set_quantization(quantized(module.qname))
    with torch.no_grad():
        return model(images)
