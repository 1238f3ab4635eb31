"""Before calibration the quantized networks compute timm's float networks (issue: max |diff| <= 1e-4)."""

from __future__ import annotations

import math

import pytest
import torch

from fqvit_pl.models import create_model, load_checkpoint
from fqvit_pl.quant import quant_modules

TOLERANCE = 1e-4

CASES = [
    # (our name, timm architecture, reduced architecture arguments)
    (
        "deit_tiny",
        "deit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    ),
    (
        "vit_base",
        "vit_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    ),
    ("deit_tiny", "deit_tiny_patch16_224", dict(depth=1)),  # the real 224 geometry, one block
    (
        "swin_tiny",
        "swin_tiny_patch4_window7_224",
        dict(
            img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)
        ),
    ),
    # 12x12 grid, window 5: zero padding to whole windows; last stage 3x3 clips the window, no shift.
    (
        "swin_small",
        "swin_small_patch4_window7_224",
        dict(
            img_size=48,
            patch_size=4,
            window_size=5,
            embed_dim=32,
            depths=(2, 2, 2),
            num_heads=(2, 4, 8),
        ),
    ),
    # 14x14 grid, window 7 (shift 3); 7x7 stage unshifted; merging 7x7 pads to 8x8 (odd resolution)
    (
        "swin_base",
        "swin_base_patch4_window7_224",
        dict(
            img_size=56,
            patch_size=4,
            window_size=7,
            embed_dim=16,
            depths=(2, 2, 2),
            num_heads=(1, 2, 4),
        ),
    ),
    # the real 224 geometry of swin_tiny (56x56 grid, window 7, unshifted 7x7 last stage), narrower and shallower
    (
        "swin_tiny",
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 4)),
    ),
]


@pytest.mark.parametrize(
    "name,arch,kwargs",
    CASES,
    ids=["deit", "vit", "deit-224", "swin", "swin-padded", "swin-odd-merge", "swin-224"],
)
def test_float_logits_equal_timm(name, arch, kwargs, timm_model):
    reference = timm_model(arch, **kwargs)
    model = create_model(name, model_kwargs=kwargs)
    load_checkpoint(model, reference.state_dict())
    size = kwargs.get("img_size", 224)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images)
        actual = model(images)
    assert actual.shape == expected.shape == (2, 1000)
    assert expected.std() > 0.1  # the comparison is not between two near-constant outputs
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name,arch,kwargs", [CASES[0], CASES[3]], ids=["deit", "swin"])
def test_float_state_dict_keys_are_timms(name, arch, kwargs, timm_model):
    reference = timm_model(arch, **kwargs, num_classes=10)
    model = create_model(name, model_kwargs=kwargs, num_classes=10)
    quant_prefixes = tuple(m.qname + "." for m in quant_modules(model))
    parameters = {name for name, _ in model.named_parameters()}
    float_keys = {
        k for k in model.state_dict() if k in parameters or not k.startswith(quant_prefixes)
    }
    assert float_keys == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert model.state_dict()[key].shape == value.shape, key
    # derived buffers are recomputed, never stored (as in timm)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in model.state_dict())


def test_num_classes_reaches_both_heads(timm_model):
    kwargs = CASES[0][2]
    reference = timm_model("deit_tiny_patch16_224", **kwargs, num_classes=7)
    model = create_model("deit_tiny", model_kwargs=kwargs, num_classes=7)
    load_checkpoint(model, reference.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(images) - reference(images)).abs().max().item() <= TOLERANCE


def _original_relative_position_index(win: int) -> torch.Tensor:
    """Swin paper's index: (dy + win - 1) * (2 win - 1) + (dx + win - 1) between every pair of window cells."""
    rows, cols = torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :]
    dx = cols[:, None] - cols[None, :]
    return (dy + win - 1) * (2 * win - 1) + (dx + win - 1)


def _original_shift_mask(size: int, win: int, shift: int) -> torch.Tensor:
    """Swin paper's mask: label the 3x3 regions of the shifted map; -100 between different labels."""
    labels = torch.zeros(size, size)
    bounds = [(0, size - win), (size - win, size - shift), (size - shift, size)]
    for i, (r0, r1) in enumerate(bounds):
        for j, (c0, c1) in enumerate(bounds):
            labels[r0:r1, c0:c1] = 3 * i + j
    n = size // win
    windows = labels.reshape(n, win, n, win).permute(0, 2, 1, 3).reshape(n * n, win * win)
    return (windows[:, None, :] != windows[:, :, None]).float() * -100.0


def test_swin_derived_buffers_match_the_paper(swin_small):
    model = create_model("swin_tiny", model_kwargs=swin_small)
    win = swin_small["window_size"]
    resolution = swin_small["img_size"] // swin_small["patch_size"]
    for stage_index, stage in enumerate(model.layers):
        size = resolution // 2**stage_index
        for block_index, block in enumerate(stage.blocks):
            assert torch.equal(
                block.attn.relative_position_index, _original_relative_position_index(win)
            )
            if block_index % 2 and size > win:
                assert torch.equal(block.attn_mask, _original_shift_mask(size, win, win // 2))
                assert math.prod(block.attn_mask.shape) == (size // win) ** 2 * win**4
            else:
                assert block.attn_mask is None
