"""Evaluation preprocessing of the published FQ-ViT table (method doc §10).

This module is the single source of truth for mean / std / crop_pct per model family.
The values deliberately differ from timm's current ``pretrained_cfg`` for DeiT
(crop_pct 0.875 here, 0.9 in timm), because the published numbers used 0.875.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.data import create_transform
from torchvision import transforms

from ..checks import check_int
from .registry import get_model_spec

__all__ = ["FAMILY_CONFIGS", "resolve_data_config", "create_eval_transform"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

#: model family (:attr:`ModelSpec.family`) -> (mean, std, crop_pct), the §10 table.
FAMILY_CONFIGS: dict[str, tuple[tuple[float, ...], tuple[float, ...], float]] = {
    "deit": (_IMAGENET_MEAN, _IMAGENET_STD, 0.875),
    "vit": (_HALF, _HALF, 0.9),
    "swin": (_IMAGENET_MEAN, _IMAGENET_STD, 0.9),
}

_REQUIRED_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def resolve_data_config(name: str, img_size: int = 224) -> dict[str, Any]:
    """Return the §10 evaluation data config of a model.

    Args:
        name: a short name (``deit_small``), a timm architecture name
            (``deit_small_patch16_224``) or a timm ``name.tag``
            (``deit_small_patch16_224.fb_in1k``) of a registered model, whose
            :attr:`ModelSpec.family` selects the row of the table.
        img_size: side of the square network input; 224 for the published models,
            smaller for reduced test models.

    Returns:
        ``{"input_size": (3, img_size, img_size), "interpolation": "bicubic",
        "mean": (3 floats), "std": (3 floats), "crop_pct": float}``, the same keys as
        ``timm.data.resolve_data_config``.

    Raises:
        ValueError: an unknown model (the message lists the registered names) or a
            non-positive ``img_size``.
    """
    family = get_model_spec(name).family
    check_int("img_size", img_size)
    mean, std, crop_pct = FAMILY_CONFIGS[family]
    return {
        "input_size": (3, img_size, img_size),
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
    }


def create_eval_transform(
    name_or_config: str | Mapping[str, Any], img_size: int | None = None
) -> transforms.Compose:
    """Build the §10 evaluation transform: PIL image -> float tensor ``(3, img_size, img_size)``.

    Steps: resize the shorter side to ``floor(img_size / crop_pct)`` (bicubic), center
    crop ``img_size``, to tensor in [0, 1], normalize with the family's mean / std.
    Built with ``timm.data.create_transform(is_training=False)``, whose center-crop mode
    computes exactly ``math.floor(img_size / crop_pct)``.

    Args:
        name_or_config: a model name accepted by :func:`resolve_data_config`, or a config
            dict with the keys it returns.
        img_size: overrides the config's input size; ``None`` keeps it (224 for names).

    Returns:
        A ``torchvision.transforms.Compose``.
    """
    if isinstance(name_or_config, str):
        config = resolve_data_config(name_or_config, 224 if img_size is None else img_size)
    else:
        missing = [key for key in _REQUIRED_KEYS if key not in name_or_config]
        if missing:
            raise ValueError(f"data config lacks keys {missing}; expected {list(_REQUIRED_KEYS)}")
        config = dict(name_or_config)
        if img_size is not None:
            check_int("img_size", img_size)
            config["input_size"] = (3, img_size, img_size)
    return create_transform(
        input_size=tuple(config["input_size"]),
        is_training=False,
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_pct=config["crop_pct"],
        crop_mode="center",
    )
