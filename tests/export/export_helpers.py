"""Small calibrated networks of the real architectures (random weights, calibrated on random images)."""

from __future__ import annotations

import torch
from torch import nn

from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, disable_quantization, enable_quantization

VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))
ARCHS = {"deit_tiny": VIT, "vit_base": VIT, "swin_tiny": SWIN}

_TORCH_SQRT = torch.sqrt


def ieee_sqrt(x, *args, **kwargs):
    """``torch.sqrt`` with float32 correctly rounded, as ONNX Runtime's (float64 sqrt rounded once
    more is exact for float32 inputs); ATen's vectorized float32 sqrt is one ulp off now and then.
    Put in place of ``torch.sqrt`` to compare the integer model with the ONNX graph bit for bit."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return _TORCH_SQRT(x.to(torch.float64), *args, **kwargs).to(torch.float32)
    return _TORCH_SQRT(x, *args, **kwargs)


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Unit-gain random weights, so every layer's output has a useful range."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * fan_in**-0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
        elif isinstance(module, nn.LayerNorm):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.2 + 1)
            module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    for name, param in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.endswith("relative_position_bias_table"):
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model


def images(count: int, size: int, seed: int) -> torch.Tensor:
    """Random ``[count, 3, size, size]`` images."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrated(name: str, method: str = "minmax", seed: int = 0, **kwargs) -> nn.Module:
    """A reduced ``name`` with random weights, calibrated on two batches of random images."""
    arch = ARCHS[name]
    model = randomize(
        create_model(name, method=method, num_classes=10, model_kwargs=arch, **kwargs), seed
    )
    calibrate(model, [images(8, arch["img_size"], s) for s in range(2)])
    return model


@torch.no_grad()
def simulated_and_float(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibrated ``model``'s logits and its float network's (quantization off, then on again):
    their distance is the quantization error the accuracy bars are stated against."""
    simulated = model(x)
    full = disable_quantization(model)(x)
    enable_quantization(model)
    return simulated, full
