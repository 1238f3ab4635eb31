"""§10 evaluation preprocessing: table values and the transform's resize/crop/normalize."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fqvit_pl.models.preprocess import create_eval_transform, resolve_data_config

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# (name, mean, std, crop_pct) straight from the §10 table, for short names, timm
# architecture names and timm name.tag forms (§11).
TABLE = [
    ("deit_tiny", *IMAGENET, 0.875),
    ("deit_small", *IMAGENET, 0.875),
    ("deit_base", *IMAGENET, 0.875),
    ("deit_small_patch16_224", *IMAGENET, 0.875),
    ("deit_base_patch16_224.fb_in1k", *IMAGENET, 0.875),
    ("vit_base", *HALF, 0.9),
    ("vit_large", *HALF, 0.9),
    ("vit_base_patch16_224.augreg_in21k_ft_in1k", *HALF, 0.9),
    ("vit_large_patch16_224", *HALF, 0.9),
    ("swin_tiny", *IMAGENET, 0.9),
    ("swin_small", *IMAGENET, 0.9),
    ("swin_base", *IMAGENET, 0.9),
    ("swin_tiny_patch4_window7_224.ms_in1k", *IMAGENET, 0.9),
]


@pytest.mark.parametrize("name,mean,std,crop_pct", TABLE)
def test_resolve_data_config_matches_table(name, mean, std, crop_pct):
    config = resolve_data_config(name)
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic"
    assert tuple(config["mean"]) == mean
    assert tuple(config["std"]) == std
    assert config["crop_pct"] == crop_pct


def test_resolve_data_config_img_size():
    assert resolve_data_config("deit_tiny", img_size=32)["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("name", ["resnet50", "deit3_small_patch16_224", "", "DeiT_small"])
def test_unknown_name_lists_known_names(name):
    with pytest.raises(ValueError) as info:
        resolve_data_config(name)
    message = str(info.value)
    assert repr(name) in message
    for known in ("deit_small", "vit_base", "swin_tiny", "swin_base_patch4_window7_224"):
        assert known in message


@pytest.mark.parametrize("img_size", [0, -3, 2.5])
def test_bad_img_size(img_size):
    with pytest.raises(ValueError, match="img_size"):
        resolve_data_config("deit_small", img_size=img_size)


def _step(transform, kind):
    found = [t for t in transform.transforms if isinstance(t, kind)]
    assert len(found) == 1, transform
    return found[0]


@pytest.mark.parametrize(
    "name,crop_pct", [("deit_small", 0.875), ("vit_base", 0.9), ("swin_tiny", 0.9)]
)
def test_eval_transform_resize_and_crop(name, crop_pct):
    transform = create_eval_transform(name)
    resize = _step(transform, transforms.Resize)
    # Shorter side only (an int size), floor(224 / crop_pct): 256 for 0.875, 248 for 0.9.
    assert resize.size in (int(math.floor(224 / crop_pct)), [int(math.floor(224 / crop_pct))])
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(_step(transform, transforms.CenterCrop).size) == (224, 224)
    names = [type(t).__name__ for t in transform.transforms]
    assert names.index("Resize") < names.index("CenterCrop") < names.index("Normalize")


def test_eval_transform_equals_reference_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(
        rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    )  # 300 wide, 200 high
    mean, std = IMAGENET
    reference = transforms.Compose(
        [
            transforms.Resize(
                int(math.floor(224 / 0.875)), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    out = create_eval_transform("deit_tiny_patch16_224.fb_in1k")(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,stats", [("vit_base", HALF), ("swin_small", IMAGENET)])
def test_eval_transform_normalizes_constant_image(name, stats):
    color = (255, 0, 128)
    out = create_eval_transform(name, img_size=32)(Image.new("RGB", (50, 40), color))
    assert out.shape == (3, 32, 32)
    mean, std = stats
    for c in range(3):
        expected = (color[c] / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[c], torch.full((32, 32), expected), rtol=0, atol=1e-5)


def test_eval_transform_from_config_with_img_size_override():
    config = resolve_data_config("deit_small")
    transform = create_eval_transform(config, img_size=64)
    assert _step(transform, transforms.Resize).size in (
        int(math.floor(64 / 0.875)),
        [int(math.floor(64 / 0.875))],
    )
    assert tuple(_step(transform, transforms.CenterCrop).size) == (64, 64)
    out = transform(Image.new("RGB", (100, 80)))
    assert out.shape == (3, 64, 64)


def test_eval_transform_rejects_incomplete_config():
    with pytest.raises(ValueError, match="crop_pct"):
        create_eval_transform(
            {
                "input_size": (3, 224, 224),
                "interpolation": "bicubic",
                "mean": HALF[0],
                "std": HALF[1],
            }
        )
