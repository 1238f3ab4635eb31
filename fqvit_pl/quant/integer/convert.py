"""``to_integer``: a calibrated model of ``fqvit_pl.models`` → its integer model (docs/method.md §12)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..calibrate import is_calibrated, quant_modules
from ..config import QuantConfig
from ..modules import QuantAct, QuantLayerNorm
from ..quantizers import UniformQuantizer
from . import kernels
from .layers import IntegerAttention, IntegerLayerNorm, IntegerLinear, IntPoint
from .models import IntegerSwin, IntegerViT, build_integer_model

__all__ = ["to_integer", "IntegerConversionError"]


class IntegerConversionError(ValueError):
    """A model (or one of its layers) that cannot run on integers; the message names it and says why."""


def _check_config(qconfig: QuantConfig, name: str) -> None:
    weight, act, ln, soft = (
        qconfig.point(r) for r in ("weight", "activation", "ln_input", "softmax")
    )
    problems = []
    if qconfig.ln_eps:
        problems.append(
            f"the integer LayerNorm runs without epsilon, as published (got ln_eps={qconfig.ln_eps:g}; "
            "calibrate a model built with ln_eps=0)"
        )
    if weight.quantizer != "uniform" or not weight.bit_type.signed or weight.bit_type.bits > 8:
        problems.append(
            f"weights must be uniform signed of at most 8 bits (got {weight.bit_type.name}, {weight.quantizer})"
        )
    for role, point in (("activation", act), ("ln_input", ln)):
        if point.quantizer != "uniform" or point.bit_type.signed or point.bit_type.bits > 8:
            problems.append(
                f"{role} points must be uniform unsigned of at most 8 bits (got {point.bit_type.name}, {point.quantizer})"
            )
    if act.granularity != "tensor":
        problems.append("activation points must be per tensor (codes share one scale in the GEMMs)")
    if qconfig.lis:
        if soft.quantizer != "log2" or soft.bit_type.bits > 4:
            problems.append(
                f"Log-Int-Softmax needs a log2 grid of at most 4 bits for an exact fp32 attn @ V (got {soft.bit_type.name})"
            )
    elif soft.quantizer != "uniform" or soft.bit_type.signed or soft.bit_type.bits > 8:
        problems.append(
            f"the softmax point must be uniform unsigned of at most 8 bits (got {soft.bit_type.name})"
        )
    if problems:
        raise IntegerConversionError(
            f"to_integer({name}): cannot run this configuration on integers: " + "; ".join(problems)
        )


def _describe(model: nn.Module) -> dict[str, Any]:
    """The JSON-able ``integer_config`` of a ``QuantVisionTransformer`` / ``QuantSwinTransformer``."""
    from ...models import QuantSwinTransformer, QuantVisionTransformer

    if not isinstance(model, (QuantVisionTransformer, QuantSwinTransformer)):
        raise IntegerConversionError(
            f"to_integer: {type(model).__name__} is not a model of fqvit_pl.models.create_model "
            "(QuantVisionTransformer or QuantSwinTransformer)"
        )
    q = model.qconfig
    quant = {
        "method": q.method,
        "ptf": q.ptf,
        "lis": q.lis,
        "overrides": {
            role: {k: (v.name if hasattr(v, "name") else v) for k, v in ch.items()}
            for role, ch in dict(q.overrides).items()
        },
    }
    common = {"model_name": model.model_name, "num_classes": model.num_classes, "quant": quant}
    if isinstance(model, QuantVisionTransformer):
        block = model.blocks[0]
        arch = {
            "img_size": list(model.img_size),
            "patch_size": list(model.patch_embed.patch_size),
            "in_chans": model.in_chans,
            "embed_dim": model.embed_dim,
            "depth": len(model.blocks),
            "num_heads": block.attn.num_heads,
            "mlp_hidden": block.mlp.fc1.out_features,
            "qkv_bias": block.attn.qkv.bias is not None,
            "eps": model.norm.eps,
            "input_quant": model.input_quant is not None,
        }
        return {"family": "vit", "arch": arch, **common}
    if isinstance(model, QuantSwinTransformer):
        stages = model.layers
        first = stages[0].blocks[0]
        arch = {
            "img_size": list(model.img_size),
            "patch_size": list(model.patch_embed.patch_size),
            "in_chans": model.in_chans,
            "embed_dim": model.patch_embed.proj.out_channels,
            "depths": [len(s.blocks) for s in stages],
            "num_heads": [s.blocks[0].attn.num_heads for s in stages],
            "window_sizes": [list(s.blocks[0].window_size) for s in stages],
            "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features,
            "qkv_bias": first.attn.qkv.bias is not None,
            "eps": model.norm.eps,
        }
        return {"family": "swin", "arch": arch, **common}
    raise IntegerConversionError(
        f"to_integer: {type(model).__name__} is not a model of fqvit_pl.models.create_model "
        "(QuantVisionTransformer or QuantSwinTransformer)"
    )


def _point(dst: IntPoint, src: QuantAct | None, name: str) -> None:
    if src is None or not isinstance(src.quantizer, UniformQuantizer):
        raise IntegerConversionError(f"to_integer: {name} is not a uniform quantization point")
    scale, zp = src.quantizer.scale, src.quantizer.zero_point
    if scale.shape != dst.scale.shape:
        raise IntegerConversionError(
            f"to_integer: {name} has scales of shape {tuple(scale.shape)}, the integer model expects {tuple(dst.scale.shape)}"
        )
    if zp.numel() > 1 and not bool((zp == zp.reshape(-1)[0]).all()):
        raise IntegerConversionError(
            f"to_integer: {name}: per-channel zero points differ (the integer LayerNorm needs one)"
        )
    dst.scale.copy_(scale)
    dst.zero_point.copy_(zp)


def _weight_codes(layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """int8 codes ``[out, in]`` of a Linear/Conv2d weight and its per-channel scales (§4, zero point 0)."""
    quantizer = layer.weight_quant.quantizer
    if not isinstance(quantizer, UniformQuantizer) or quantizer.scale.dim() != 1:
        raise IntegerConversionError(
            f"to_integer: {name}.weight is not quantized per output channel"
        )
    if bool((quantizer.zero_point != 0).any()):
        raise IntegerConversionError(f"to_integer: {name}.weight has a nonzero zero point")
    w = layer.weight.detach()
    scale = quantizer.scale.reshape((-1,) + (1,) * (w.dim() - 1))
    bt = quantizer.bit_type
    codes = torch.clamp(
        torch.round(w / scale + quantizer.zero_point.reshape(scale.shape)), bt.lower, bt.upper
    )
    return codes.reshape(w.shape[0], -1).to(torch.int8), quantizer.scale.detach().clone()


def _linear(dst: IntegerLinear, src: nn.Module, name: str) -> None:
    codes, scale = _weight_codes(src, name)
    if codes.shape != dst.weight.shape:
        raise IntegerConversionError(
            f"to_integer: {name}: weight {tuple(codes.shape)} != {tuple(dst.weight.shape)}"
        )
    dst.weight.copy_(codes)
    dst.weight_scale.copy_(scale)
    if dst.bias is not None:
        dst.bias.copy_(src.bias.detach())


def _norm(dst: IntegerLayerNorm, src: QuantLayerNorm) -> None:
    dst.weight.copy_(src.weight.detach())
    dst.bias.copy_(src.bias.detach())


def _attention(dst: IntegerAttention, src: nn.Module, name: str) -> None:
    _linear(dst.qkv, src.qkv, f"{name}.qkv")
    _point(dst.qkv_point, src.qkv_quant, f"{name}.qkv_quant")
    _point(dst.score_point, src.score_quant, f"{name}.score_quant")
    if dst.window_area is not None:
        _point(dst.bias_table_point, src.bias_table_quant, f"{name}.bias_table_quant")
        _point(dst.bias_point, src.bias_quant, f"{name}.bias_quant")
        dst.bias_table_codes.copy_(
            dst.bias_table_point.quantize(src.relative_position_bias_table.detach())
        )
    if not dst.lis:
        _point(dst.softmax_point, src.softmax.point, f"{name}.softmax.point")
    _point(dst.context_point, src.context_quant, f"{name}.context_quant")
    _linear(dst.proj, src.proj, f"{name}.proj")
    _point(dst.proj_point, src.proj_quant, f"{name}.proj_quant")


def _block(dst: nn.Module, src: nn.Module, name: str) -> None:
    _norm(dst.norm1, src.norm1)
    _point(dst.norm1_point, src.norm1_quant, f"{name}.norm1_quant")
    _attention(dst.attn, src.attn, f"{name}.attn")
    _point(dst.res1_point, src.res1_quant, f"{name}.res1_quant")
    _norm(dst.norm2, src.norm2)
    _point(dst.norm2_point, src.norm2_quant, f"{name}.norm2_quant")
    _linear(dst.mlp.fc1, src.mlp.fc1, f"{name}.mlp.fc1")
    _point(dst.mlp.act_point, src.mlp.act_quant, f"{name}.mlp.act_quant")
    _linear(dst.mlp.fc2, src.mlp.fc2, f"{name}.mlp.fc2")
    _point(dst.mlp.fc2_point, src.mlp.fc2_quant, f"{name}.mlp.fc2_quant")
    _point(dst.res2_point, src.res2_quant, f"{name}.res2_quant")


def _fill_vit(dst: IntegerViT, src: nn.Module) -> None:
    if dst.input_point is not None:
        _point(dst.input_point, src.input_quant, "input_quant")
    _linear(dst.patch_proj, src.patch_embed.proj, "patch_embed.proj")
    _point(dst.proj_point, src.patch_embed.proj_quant, "patch_embed.proj_quant")
    dst.cls_token.copy_(src.cls_token.detach())
    _point(dst.cls_point, src.cls_quant, "cls_quant")
    _point(dst.pos_point, src.pos_quant, "pos_quant")
    dst.pos_codes.copy_(dst.pos_point.quantize(src.pos_embed.detach()))
    _point(dst.embed_point, src.embed_quant, "embed_quant")
    for i, (d, s) in enumerate(zip(dst.blocks, src.blocks)):
        _block(d, s, f"blocks.{i}")
    _norm(dst.norm, src.norm)
    _point(dst.pre_head_point, src.pre_head_quant, "pre_head_quant")
    _linear(dst.head, src.head, "head")
    _point(dst.logits_point, src.logits_quant, "logits_quant")


def _fill_swin(dst: IntegerSwin, src: nn.Module) -> None:
    _point(dst.input_point, src.input_quant, "input_quant")
    _linear(dst.patch_proj, src.patch_embed.proj, "patch_embed.proj")
    _point(dst.proj_point, src.patch_embed.proj_quant, "patch_embed.proj_quant")
    _norm(dst.patch_norm, src.patch_embed.norm)
    _point(dst.patch_norm_point, src.patch_embed.norm_quant, "patch_embed.norm_quant")
    for i, (d, s) in enumerate(zip(dst.layers, src.layers)):
        if d.downsample is not None:
            name = f"layers.{i}.downsample"
            _norm(d.downsample.norm, s.downsample.norm)
            _point(d.downsample.norm_point, s.downsample.norm_quant, f"{name}.norm_quant")
            _linear(d.downsample.reduction, s.downsample.reduction, f"{name}.reduction")
            _point(
                d.downsample.reduction_point,
                s.downsample.reduction_quant,
                f"{name}.reduction_quant",
            )
        for j, (db, sb) in enumerate(zip(d.blocks, s.blocks)):
            _block(db, sb, f"layers.{i}.blocks.{j}")
    _norm(dst.norm, src.norm)
    _point(dst.norm_point, src.norm_quant, "norm_quant")
    _point(dst.pool_point, src.head.pool_quant, "head.pool_quant")
    _linear(dst.head, src.head.fc, "head.fc")
    _point(dst.logits_point, src.head.logits_quant, "head.logits_quant")


def _check_lis_defined(model: nn.Module) -> None:
    """Log-Int-Softmax needs a nonzero exponential at the row maximum: §8's ``int_exp(0)`` is
    ``floor(c / s**2) * 2**n`` (``c = 1 / 0.35815147``), 0 for a score scale ``s > 1.67``; then every
    row sums to 0 and ``S / e`` is undefined (the simulation gives NaN)."""
    for name, module in model.named_modules():
        if (
            isinstance(module, IntegerAttention)
            and module.lis
            and float(module.lis_exp_table[0]) == 0
        ):
            point = "bias_quant" if module.window_area is not None else "score_quant"
            scale = float(module.lis_point().scale)
            raise IntegerConversionError(
                f"to_integer: {name}.{point} has scale {scale:.3g} > 1.67, where Log-Int-Softmax's "
                "integer exponential is 0 even at the row maximum: every attention row sums to 0 "
                "(the simulation gives NaN there); the calibrated attention scores span too wide a range"
            )


def _check_swin_masks(model: IntegerSwin) -> None:
    """The shift mask (-100, added after the bias point) must saturate Log-Int-Softmax's exponential
    and never be a row maximum: true when the bias point's range ``255 * s`` stays below 99."""
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if attn.lis and block.attn_mask is not None:
                s = float(attn.bias_point.scale)
                if s * (attn.bias_point.bit_type.upper - attn.bias_point.bit_type.lower) >= 99.0:
                    raise IntegerConversionError(
                        f"to_integer: layers.{i}.blocks.{j}.attn.bias_quant spans {255 * s:.1f} >= 99: "
                        "the shift mask (-100) would not saturate Log-Int-Softmax on integers"
                    )


@torch.no_grad()
def to_integer(model: nn.Module) -> nn.Module:
    """The integer model of a calibrated ``fqvit_pl.models`` network (the input is left untouched).

    Returns an :class:`IntegerViT` or :class:`IntegerSwin` with ``forward(images) -> logits`` like
    ``model``'s: int8 weights with per-channel scales, integer GEMMs, ``q @ k^T``, Log-Int-Softmax
    and ``attn @ V`` on codes, the PTF LayerNorm on integer statistics; GELU, residual additions
    and the head's final value in float (docs/integer.md). Its state is plain tensors plus the
    JSON-able ``integer_config``: ``build_integer_model(cfg)`` and ``load_state_dict`` rebuild it.

    Raises:
        IntegerConversionError: ``model`` is not such a network, is not calibrated, or uses a
            quantization configuration (or a layer) that cannot run on integers.
    """
    config = _describe(model)
    name = config["model_name"]
    if not quant_modules(model) or not is_calibrated(model):
        raise IntegerConversionError(
            f"to_integer({name}): the model is not calibrated; run fqvit_pl.quant.calibrate(model, batches) first"
        )
    _check_config(model.qconfig, name)
    integer = build_integer_model(config)
    device = next(model.parameters()).device
    (_fill_vit if config["family"] == "vit" else _fill_swin)(integer, model)
    integer.refresh()
    if isinstance(integer, IntegerSwin):
        _check_swin_masks(integer)
    _check_lis_defined(integer)
    return integer.to(device).eval()


_ = kernels  # re-exported through the package
