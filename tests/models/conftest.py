"""Shared helpers of the model tests: reduced architectures and random timm references (no downloads)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

#: Reduced shapes with the structure of the real networks (same modules, fewer/smaller of them).
VIT_SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
SWIN_SMALL = dict(
    img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)
)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float parameter non-trivial random values with unit-gain Linear layers.

    timm's init (weights std .02, LayerNorms at (1, 0), class token ~1e-6) makes a network whose
    output barely depends on its input; these values make every parameter matter.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator) * std + mean)

    for module in model.modules():
        if isinstance(module, nn.Linear):
            normal(module.weight, 0.0, module.in_features**-0.5)
            if module.bias is not None:
                normal(module.bias, 0.0, 0.1)
        elif isinstance(module, nn.LayerNorm):
            normal(module.weight, 1.0, 0.2)
            normal(module.bias, 0.0, 0.1)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            normal(module.weight, 0.0, fan_in**-0.5)
            normal(module.bias, 0.0, 0.1)
    for name, param in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.endswith("relative_position_bias_table"):
            normal(param, 0.0, 0.5)
    return model


def make_timm(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """A randomized timm model in eval mode (``pretrained=False``: nothing is downloaded)."""
    torch.manual_seed(seed)
    return randomize(timm.create_model(arch, pretrained=False, **kwargs), seed).eval()


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture
def timm_model():
    """``timm_model(arch, seed=0, **architecture_kwargs)`` → a randomized timm reference model."""
    return make_timm


@pytest.fixture
def randomized():
    """``randomized(model, seed=0)`` → the model with non-trivial random float parameters."""
    return randomize


@pytest.fixture
def vit_small() -> dict:
    return dict(VIT_SMALL)


@pytest.fixture
def swin_small() -> dict:
    return dict(SWIN_SMALL)
