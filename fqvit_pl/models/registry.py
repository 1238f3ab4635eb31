"""The eight networks of the published table (§11): short name → timm architecture, weights and shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["ModelSpec", "MODELS", "list_models", "get_model_spec", "resolve_model_name"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered network.

    ``family`` is ``deit``, ``vit`` or ``swin`` (it selects the builder, the §10 preprocessing and
    timm's checkpoint filter); ``input_quant`` says whether the image passes through ``Q_input``
    (§6: DeiT and Swin yes, ViT no); ``kwargs`` are timm's architecture arguments of the model.
    """

    name: str
    architecture: str
    tag: str
    family: str
    input_quant: bool
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pretrained_name(self) -> str:
        """timm's ``architecture.tag`` of the §11 weights."""
        return f"{self.architecture}.{self.tag}"


def _spec(name: str, architecture: str, tag: str, family: str, **kwargs: Any) -> ModelSpec:
    return ModelSpec(name, architecture, tag, family, family != "vit", MappingProxyType(kwargs))


_SPECS = (
    _spec(
        "deit_tiny",
        "deit_tiny_patch16_224",
        "fb_in1k",
        "deit",
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
    ),
    _spec(
        "deit_small",
        "deit_small_patch16_224",
        "fb_in1k",
        "deit",
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
    ),
    _spec(
        "deit_base",
        "deit_base_patch16_224",
        "fb_in1k",
        "deit",
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
    ),
    _spec(
        "vit_base",
        "vit_base_patch16_224",
        "augreg_in21k_ft_in1k",
        "vit",
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
    ),
    _spec(
        "vit_large",
        "vit_large_patch16_224",
        "augreg_in21k_ft_in1k",
        "vit",
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
    ),
    _spec(
        "swin_tiny",
        "swin_tiny_patch4_window7_224",
        "ms_in1k",
        "swin",
        patch_size=4,
        window_size=7,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
    ),
    _spec(
        "swin_small",
        "swin_small_patch4_window7_224",
        "ms_in1k",
        "swin",
        patch_size=4,
        window_size=7,
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
    ),
    _spec(
        "swin_base",
        "swin_base_patch4_window7_224",
        "ms_in1k",
        "swin",
        patch_size=4,
        window_size=7,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
    ),
)

#: short name → spec, in the order of the published table.
MODELS: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
_BY_ARCHITECTURE = {spec.architecture: spec for spec in _SPECS}


def list_models(architectures: bool = False) -> list[str]:
    """The short names (``deit_tiny`` …), or timm's architecture names when ``architectures``."""
    return [spec.architecture if architectures else spec.name for spec in _SPECS]


def _available() -> str:
    return ", ".join(f"{spec.name} ({spec.architecture})" for spec in _SPECS)


def resolve_model_name(name: str) -> tuple[ModelSpec, str]:
    """``(spec, tag)`` of a short name, a timm architecture name, or either with a ``.tag``.

    Without a tag the §11 tag is returned. Raises ``ValueError`` listing the available names.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}; available: {_available()}")
    base, _, tag = name.strip().partition(".")
    spec = MODELS.get(base) or _BY_ARCHITECTURE.get(base)
    if spec is None:
        raise ValueError(
            f"unknown model {name!r}; available: {_available()} (a timm '.tag' suffix is accepted)"
        )
    return spec, tag or spec.tag


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of any name :func:`resolve_model_name` accepts (the tag is ignored)."""
    return resolve_model_name(name)[0]
