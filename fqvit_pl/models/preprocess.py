"""Evaluation preprocessing of the published FQ-ViT table (method doc §10).

This module is the single source of truth for mean / std / crop_pct per model family.
The values deliberately differ from timm's current ``pretrained_cfg`` for DeiT
(crop_pct 0.875 here, 0.9 in timm), because the published numbers used 0.875.
"""

from typing import Any, Dict, Mapping, Optional, Tuple, Union

from timm.data import create_transform
from torchvision import transforms

__all__ = ["FAMILY_CONFIGS", "SHORT_NAMES", "resolve_data_config", "create_eval_transform"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

#: family prefix -> (mean, std, crop_pct), the §10 table.
FAMILY_CONFIGS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...], float]] = {
    "deit": (_IMAGENET_MEAN, _IMAGENET_STD, 0.875),
    "vit": (_HALF, _HALF, 0.9),
    "swin": (_IMAGENET_MEAN, _IMAGENET_STD, 0.9),
}

#: short name -> timm architecture name, the §11 table.
SHORT_NAMES: Dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}

_REQUIRED_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def _known_names() -> str:
    names = list(SHORT_NAMES) + list(SHORT_NAMES.values())
    prefixes = ", ".join(f"{family}_*" for family in FAMILY_CONFIGS)
    return f"{', '.join(names)} (or any timm name matching {prefixes}, optionally with a .tag)"


def _family(name: str) -> str:
    arch = name.split(".", 1)[0]
    for family in FAMILY_CONFIGS:
        if arch.startswith(family + "_"):
            return family
    raise ValueError(
        f"unknown model name {name!r} for preprocessing; known names: {_known_names()}"
    )


def resolve_data_config(name: str, img_size: int = 224) -> Dict[str, Any]:
    """Return the §10 evaluation data config of a model.

    Args:
        name: a short name (``deit_small``), a timm architecture name
            (``deit_small_patch16_224``) or a timm ``name.tag``
            (``deit_small_patch16_224.fb_in1k``). The family is chosen by the prefix
            ``deit_``, ``vit_`` or ``swin_``.
        img_size: side of the square network input; 224 for the published models,
            smaller for reduced test models.

    Returns:
        ``{"input_size": (3, img_size, img_size), "interpolation": "bicubic",
        "mean": (3 floats), "std": (3 floats), "crop_pct": float}``, the same keys as
        ``timm.data.resolve_data_config``.

    Raises:
        ValueError: unknown family (the message lists the known names) or a
            non-positive ``img_size``.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"model name must be a string, got {name!r}; known names: {_known_names()}"
        )
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    mean, std, crop_pct = FAMILY_CONFIGS[_family(name)]
    return {
        "input_size": (3, img_size, img_size),
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
    }


def create_eval_transform(
    name_or_config: Union[str, Mapping[str, Any]], img_size: Optional[int] = None
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
            if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
                raise ValueError(f"img_size must be a positive int, got {img_size!r}")
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
