"""``create_model``: a registered network, its quantization configuration and its weights in one call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..quant import ROLES, QuantConfig, kernels
from .checkpoint import load_checkpoint
from .layers import TokenAvgPool
from .preprocess import resolve_data_config
from .registry import ModelSpec, resolve_model_name
from .swin import QuantSwinTransformer
from .vit import QuantVisionTransformer

__all__ = ["create_model", "PretrainedWeightsError", "use_fast_float_ops"]

_BUILDERS: dict[str, type[nn.Module]] = {
    "deit": QuantVisionTransformer,
    "vit": QuantVisionTransformer,
    "swin": QuantSwinTransformer,
}


def use_fast_float_ops(model: nn.Module) -> nn.Module:
    """Swap the float GELU and token pooling of ``model`` for those of :mod:`fqvit_pl.quant.kernels`.

    They compute the same values, and under torch.compile they run ATen's kernels as eager does,
    so that a compiled quantized model keeps the eager model's bits (the quantized layers route
    their own float operations the same way). :func:`create_model` applies it; call it on a
    network built directly. Changes ``model`` in place and returns it.
    """
    replacements = {
        nn.GELU: lambda module: kernels.GELU() if module.approximate == "none" else module,
        TokenAvgPool: lambda module: kernels.Mean(dim=1),
    }
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replace = replacements.get(type(child))
            if replace is not None:
                setattr(parent, name, replace(child))
    return model


def _architecture_kwargs(spec: ModelSpec, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    builder = _BUILDERS[spec.family]
    model_kwargs = dict(model_kwargs or {})
    unknown = sorted(set(model_kwargs) - set(builder.architecture_args()))
    if unknown:
        raise ValueError(
            f"create_model({spec.name!r}): unknown model_kwargs {unknown}; a {spec.family} model accepts "
            f"{list(builder.architecture_args())}"
        )
    return {**spec.kwargs, **model_kwargs}


def _pretrained_state(
    spec: ModelSpec, tag: str, num_classes: int, model_kwargs: Mapping[str, Any]
) -> dict:
    """The §11 weights as timm builds them (timm downloads, caches and converts)."""
    import timm

    name = f"{spec.architecture}.{tag}"
    try:
        reference = timm.create_model(
            name, pretrained=True, num_classes=num_classes, **model_kwargs
        )
    except _download_errors() as err:
        raise PretrainedWeightsError(
            f"could not fetch the pretrained weights {name} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no message'}). "
            "Without network access: load a local file instead (--model.pretrained false "
            "--model.checkpoint_path FILE; create_model(name, checkpoint_path=FILE)), or fill the "
            "Hugging Face cache (HF_HOME) on a machine with network access, e.g. "
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\", and copy "
            "it here; --model.pretrained false builds the network with random weights (tests only)."
        ) from err
    return reference.state_dict()


class PretrainedWeightsError(RuntimeError):
    """The published weights could not be downloaded (no network, no cached copy)."""


def _download_errors() -> tuple[type[BaseException], ...]:
    """Errors of a failed download: OSError covers the hub's cache misses and ``requests``' errors."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def create_model(
    name: str,
    *,
    method: str = "minmax",
    ptf: bool = True,
    lis: bool = True,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    num_classes: int = 1000,
    model_kwargs: Mapping[str, Any] | None = None,
    ln_eps: float = 0.0,
    **overrides: Mapping[str, Any],
) -> nn.Module:
    """Build a quantized network of the published table, uncalibrated (it computes in float).

    Args:
        name: a short name (``deit_tiny`` …, see :func:`list_models`), timm's architecture name
            (``deit_tiny_patch16_224``), either with a timm ``.tag`` (used by ``pretrained``).
        method, ptf, lis: the three choices of the method (§2), see :class:`fqvit_pl.quant.QuantConfig`.
        pretrained: load the §11 weights through timm (``timm.create_model(arch.tag, pretrained=True)``).
        checkpoint_path: load a local checkpoint instead (see :func:`load_checkpoint`).
        num_classes: size of the classifier.
        model_kwargs: timm architecture arguments overriding the registered ones, for reduced models
            (ViT: ``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias``;
            Swin: ``img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
            qkv_bias``). With ``pretrained`` they also reach timm.
        ln_eps: epsilon of the integer LayerNorm (ptf); 0 as published, where a token whose
            channels are all equal gives NaN (see :class:`fqvit_pl.quant.QuantConfig`).
        **overrides: per-role changes of the quantization configuration, e.g.
            ``activation={"bit_type": "uint6"}``; roles are ``weight, activation, ln_input, softmax``.

    Returns:
        A :class:`QuantVisionTransformer` or :class:`QuantSwinTransformer` in eval mode, mapping
        ``[B, in_chans, H, W]`` images to ``[B, num_classes]`` logits. Its ``pretrained_cfg`` holds the
        §10 data config (mean, std, crop_pct, input_size) and the timm name of its weights.

    Raises:
        ValueError: unknown name (the message lists the available ones), unknown keyword argument or
            model_kwargs, both ``pretrained`` and ``checkpoint_path``.
        FileNotFoundError: ``checkpoint_path`` does not exist.
        CheckpointError: a checkpoint that cannot be read or does not fit.
        PretrainedWeightsError: ``pretrained`` weights that could not be downloaded (the message
            says how to proceed offline).
    """
    spec, tag = resolve_model_name(name)
    unknown = sorted(set(overrides) - set(ROLES))
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown keyword argument(s) {unknown}; quantization overrides are keyed by role "
            f"{list(ROLES)}, architecture arguments go in model_kwargs"
        )
    if pretrained and checkpoint_path is not None:
        raise ValueError(
            f"create_model({name!r}): give pretrained=True or checkpoint_path, not both"
        )
    if checkpoint_path is not None and not os.path.isfile(
        checkpoint_path
    ):  # before building a large network
        raise FileNotFoundError(f"checkpoint {os.fspath(checkpoint_path)!r} does not exist")
    qconfig = QuantConfig(method, ptf, lis, overrides=dict(overrides), ln_eps=ln_eps)
    arch_kwargs = _architecture_kwargs(spec, model_kwargs)
    builder = _BUILDERS[spec.family]
    extra = {"input_quant": spec.input_quant} if builder is QuantVisionTransformer else {}
    model = builder(qconfig, num_classes=num_classes, model_name=spec.name, **extra, **arch_kwargs)
    use_fast_float_ops(model)
    in_chans, height, width = model.pretrained_cfg["input_size"]
    data_config = resolve_data_config(spec.name, img_size=height)
    model.pretrained_cfg = {
        **data_config,
        "input_size": (in_chans, height, width),
        "architecture": spec.architecture,
        "tag": tag,
        "num_classes": num_classes,
    }
    if pretrained:
        state = _pretrained_state(spec, tag, num_classes, dict(model_kwargs or {}))
        load_checkpoint(model, state, source=f"timm pretrained weights {spec.architecture}.{tag}")
    elif checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model.eval()
