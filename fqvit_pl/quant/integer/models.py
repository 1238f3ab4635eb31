"""The integer ViT/DeiT and Swin: the §6 networks on codes, built from a JSON-able description.

``build_integer_model(config)`` creates an empty model (zero weights, unit scales) from its
``integer_config`` alone — no float weights, no timm download; ``load_state_dict`` then fills it.
:func:`fqvit_pl.quant.integer.to_integer` builds one and fills it from a calibrated model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from timm.models.swin_transformer import window_partition, window_reverse
from torch import Tensor, nn

from .. import kernels as float_kernels
from ..config import QuantConfig
from . import kernels, native_ln
from .layers import IntegerAttention, IntegerLayerNorm, IntegerLinear, IntegerMlp, IntPoint

__all__ = ["IntegerViT", "IntegerSwin", "build_integer_model", "quant_config_from_dict"]


def quant_config_from_dict(quant: Mapping[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` of an ``integer_config["quant"]`` entry."""
    return QuantConfig(
        quant["method"], quant["ptf"], quant["lis"], overrides=quant.get("overrides", {})
    )


class _Bits:
    """The bit types and granularities a model's points use."""

    def __init__(self, qconfig: QuantConfig) -> None:
        self.act = qconfig.point("activation").bit_type
        ln = qconfig.point("ln_input")
        self.ln = ln.bit_type
        self.ln_per_channel = ln.granularity == "channel"
        self.softmax = qconfig.point("softmax").bit_type
        self.ptf, self.lis = qconfig.ptf, qconfig.lis

    def ln_point(self, channels: int) -> IntPoint:
        return IntPoint(self.ln, channels if self.ln_per_channel else None)


class _IntegerModel(nn.Module):
    """Shared parts: the description, refreshing derived state after loads, the GEMM backend."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.integer_config: dict[str, Any] = dict(config)
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    def refresh(self) -> None:
        """Rebuild derived state (Python copies of scalars, packed weights, LIS tables) from the buffers."""
        for module in self.modules():
            if isinstance(module, (IntPoint, IntegerLinear)):
                module.refresh()
        for module in self.modules():
            if isinstance(module, IntegerAttention):
                module.refresh_tables()

    def set_backend(self, backend: str) -> nn.Module:
        """``"onednn"`` (fused int8 GEMM + requantization, CPU) or ``"int_mm"`` (``torch._int_mm``)."""
        if backend not in ("onednn", "int_mm"):
            raise ValueError(f"unknown GEMM backend {backend!r}; choose 'onednn' or 'int_mm'")
        if backend == "onednn" and not kernels.onednn_available():
            raise RuntimeError("oneDNN's quantized linear is not available in this PyTorch build")
        for module in self.modules():
            if isinstance(module, IntegerLinear):
                module.backend = backend
        return self


def _residual(
    x: Tensor, x_point: IntPoint, branch: Tensor, branch_point: IntPoint, out: IntPoint
) -> Tensor:
    """``LNQ(x + branch)`` on codes: the addition in float on the dequantized values, as simulated.

    The codes come back as integer-valued float32: their readers (the next LayerNorm, the next
    residual, patch merging) take them as numbers, so a uint8 round trip would cost two casts.
    On the CPU the fused kernel of :mod:`.native_ln` computes the same codes in one pass.
    """
    if native_ln.residual_native(x, branch):
        return native_ln.residual_codes_native(
            x, x_point.scale, x_point.zero_point, branch, branch_point.scale,
            branch_point.zero_point, out.scale, out.zero_point, out.bit_type,
        )  # fmt: skip
    return kernels.quantize_float(
        x_point.dequantize(x).add_(branch_point.dequantize(branch)),
        out.scale, out.zero_point, out.bit_type,
    )  # fmt: skip


class IntegerViTBlock(nn.Module):
    """``h = Q(norm1(x))``; ``x = LNQ(x + attn(h))``; ``h = Q(norm2(x))``; ``x = LNQ(x + mlp(h))`` on codes."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        qkv_bias: bool,
        eps: float,
        bits: _Bits,
        tokens: int,
    ) -> None:
        super().__init__()
        self.norm1 = IntegerLayerNorm(dim, eps, bits.ptf)
        self.norm1_point = IntPoint(bits.act)
        self.attn = IntegerAttention(
            dim, heads, qkv_bias, bits.act, bits.softmax, bits.lis, tokens=tokens
        )
        self.res1_point = bits.ln_point(dim)
        self.norm2 = IntegerLayerNorm(dim, eps, bits.ptf)
        self.norm2_point = IntPoint(bits.act)
        self.mlp = IntegerMlp(dim, hidden, bits.act)
        self.res2_point = bits.ln_point(dim)

    def forward(self, x: Tensor, in_point: IntPoint) -> Tensor:
        h = self.norm1(x, in_point, self.norm1_point)
        a = self.attn(h, self.norm1_point)
        x = _residual(x, in_point, a, self.attn.proj_point, self.res1_point)
        h = self.norm2(x, self.res1_point, self.norm2_point)
        m = self.mlp(h, self.norm2_point)
        return _residual(x, self.res1_point, m, self.mlp.fc2_point, self.res2_point)


class IntegerViT(_IntegerModel):
    """Integer ViT/DeiT: ``[B, C, H, W]`` float images → ``[B, classes]`` logits (the head's point values)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        arch = config["arch"]
        bits = _Bits(quant_config_from_dict(config["quant"]))
        dim, (ph, pw) = arch["embed_dim"], arch["patch_size"]
        self.img_size, self.patch_size = tuple(arch["img_size"]), (ph, pw)
        self.in_chans = arch["in_chans"]
        tokens = (self.img_size[0] // ph) * (self.img_size[1] // pw)
        self.input_point = IntPoint(bits.act) if arch["input_quant"] else None
        self.patch_proj = IntegerLinear(self.in_chans * ph * pw, dim)
        self.proj_point = IntPoint(bits.act)
        self.register_buffer("cls_token", torch.zeros(1, 1, dim))
        self.cls_point = IntPoint(bits.act)
        self.register_buffer("pos_codes", torch.zeros(1, tokens + 1, dim, dtype=torch.uint8))
        self.pos_point = IntPoint(bits.act)
        self.embed_point = bits.ln_point(dim)
        self.blocks = nn.ModuleList(
            IntegerViTBlock(
                dim, arch["num_heads"], arch["mlp_hidden"], arch["qkv_bias"], arch["eps"], bits,
                tokens + 1,
            )
            for _ in range(arch["depth"])
        )  # fmt: skip
        self.norm = IntegerLayerNorm(dim, arch["eps"], bits.ptf)
        self.pre_head_point = IntPoint(bits.act)
        self.head = IntegerLinear(dim, config["num_classes"])
        self.logits_point = IntPoint(bits.act)

    def float_patch_conv(self, images: Tensor) -> Tensor:
        """ViT's patch embedding on float pixels: ``[B, C, H, W]`` → float32 ``[B, tokens, dim]``.

        A float operation (there are no input codes), so it is the simulation's own: the same
        convolution kernel on the same fake-quantized weight (``code * scale``, bit for bit the
        simulation's). A GEMM on the unfolded patches sums in another order and moves a value
        across a rounding boundary of the next point now and then (measured: 1 code in 32,768,
        5% of the quantization error of a reduced vit_base's logits).
        """
        proj = self.patch_proj
        weight = proj.weight.to(torch.float32) * proj.weight_scale[:, None]
        weight = weight.view(-1, self.in_chans, *self.patch_size)
        value = float_kernels.conv2d(images, weight, proj.bias, self.patch_size, (0, 0), (1, 1), 1)
        return value.flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        """Images ``[B, in_chans, H, W]`` → logits ``[B, num_classes]``."""
        if self.input_point is not None:
            codes = kernels.patches(self.input_point.quantize(images), self.patch_size)
            tokens = self.patch_proj.codes_out(codes, self.input_point, self.proj_point)
        else:  # ViT has no input point: the patch conv sees float pixels (int8 weight, float conv)
            tokens = self.proj_point.quantize(self.float_patch_conv(images))
        x = self.proj_point.dequantize(tokens)
        x = self.cls_point.fake_quantize(
            torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        )
        x = self.embed_point.quantize(x + self.pos_point.dequantize(self.pos_codes))
        point = self.embed_point
        for block in self.blocks:
            x = block(x, point)
            point = block.res2_point
        cls = self.norm(x[:, :1], point, self.pre_head_point)[:, 0]  # LayerNorm is per token
        return self.logits_point.fake_quantize(self.head(cls, self.pre_head_point))


class IntegerSwinBlock(nn.Module):
    """Swin block on codes: (shifted) window attention and Mlp with their residual points (§6.2)."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        heads: int,
        window: tuple[int, int],
        shift: bool,
        hidden: int,
        qkv_bias: bool,
        eps: float,
        bits: _Bits,
    ) -> None:
        super().__init__()
        from ...models.swin import shifted_window_mask  # (models import this package's parent)

        self.resolution = resolution
        self.window_size = tuple(min(r, w) for r, w in zip(resolution, window))
        self.shift_size = tuple(
            w // 2 if shift and r > w else 0 for r, w in zip(resolution, window)
        )
        self.norm1 = IntegerLayerNorm(dim, eps, bits.ptf)
        self.norm1_point = IntPoint(bits.act)
        self.attn = IntegerAttention(
            dim, heads, qkv_bias, bits.act, bits.softmax, bits.lis, window_size=self.window_size
        )
        self.res1_point = bits.ln_point(dim)
        self.norm2 = IntegerLayerNorm(dim, eps, bits.ptf)
        self.norm2_point = IntPoint(bits.act)
        self.mlp = IntegerMlp(dim, hidden, bits.act)
        self.res2_point = bits.ln_point(dim)
        padded = tuple(math.ceil(r / w) * w for r, w in zip(resolution, self.window_size))
        mask = shifted_window_mask(padded, self.window_size, self.shift_size)
        self.register_buffer("attn_mask", mask, persistent=False)

    def windows(self, h: Tensor) -> Tensor:
        """Codes ``[B, H*W, C]`` → shifted, zero-padded windows ``[B * windows, N, C]`` (timm's order)."""
        batch, _, dim = h.shape
        height, width = self.resolution
        x = h.view(batch, height, width, dim)
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h, pad_w = -height % self.window_size[0], -width % self.window_size[1]
        x = kernels.pad_codes(x, (0, 0, 0, pad_w, 0, pad_h), self.norm1_point.py_zero_point)
        return window_partition(x, self.window_size).reshape(-1, self.attn.window_area, dim)

    def unwindows(self, windows: Tensor, batch: int) -> Tensor:
        """The inverse of :meth:`windows`: ``[B * windows, N, C]`` → ``[B, H*W, C]``."""
        height, width = self.resolution
        dim = windows.shape[-1]
        pad_h, pad_w = -height % self.window_size[0], -width % self.window_size[1]
        x = window_reverse(
            windows.view(-1, *self.window_size, dim),
            self.window_size,
            height + pad_h,
            width + pad_w,
        )
        x = x[:, :height, :width, :]
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x.reshape(batch, height * width, dim)

    def _window_attention(self, h: Tensor) -> Tensor:
        windows = self.attn(self.windows(h), self.norm1_point, self.attn_mask)
        return self.unwindows(windows, h.shape[0])

    def forward(self, x: Tensor, in_point: IntPoint) -> Tensor:
        h = self.norm1(x, in_point, self.norm1_point)
        x = _residual(x, in_point, self._window_attention(h), self.attn.proj_point, self.res1_point)
        h = self.norm2(x, self.res1_point, self.norm2_point)
        return _residual(
            x, self.res1_point, self.mlp(h, self.norm2_point), self.mlp.fc2_point, self.res2_point
        )


class IntegerPatchMerging(nn.Module):
    """2x2 neighbourhoods → ``4 * dim`` channels (timm's order), norm, point, ``reduction``, LN-input point."""

    def __init__(
        self, dim: int, out_dim: int, resolution: tuple[int, int], eps: float, bits: _Bits
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.output_resolution = tuple(math.ceil(r / 2) for r in resolution)
        self.norm = IntegerLayerNorm(4 * dim, eps, bits.ptf)
        self.norm_point = IntPoint(bits.act)
        self.reduction = IntegerLinear(4 * dim, out_dim, bias=False)
        self.reduction_point = bits.ln_point(out_dim)

    def forward(self, x: Tensor, in_point: IntPoint) -> Tensor:
        batch, _, dim = x.shape
        height, width = self.resolution
        x = kernels.pad_codes(
            x.view(batch, height, width, dim),
            (0, 0, 0, width % 2, 0, height % 2),
            in_point.py_zero_point,
        )
        rows, cols = self.output_resolution
        x = (
            x.reshape(batch, rows, 2, cols, 2, dim)
            .permute(0, 1, 3, 4, 2, 5)
            .reshape(batch, rows * cols, 4 * dim)
        )
        x = self.norm(x, in_point, self.norm_point)
        return self.reduction_point.quantize(self.reduction(x, self.norm_point))


class IntegerSwinStage(nn.Module):
    """Optional patch merging, then the blocks (regular and shifted windows alternating)."""

    def __init__(
        self, downsample: IntegerPatchMerging | None, blocks: list[IntegerSwinBlock]
    ) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, point: IntPoint) -> tuple[Tensor, IntPoint]:
        if self.downsample is not None:
            x = self.downsample(x, point)
            point = self.downsample.reduction_point
        for block in self.blocks:
            x = block(x, point)
            point = block.res2_point
        return x, point


class IntegerSwin(_IntegerModel):
    """Integer Swin: ``[B, C, H, W]`` float images → ``[B, classes]`` logits (the head's point values)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        arch = config["arch"]
        bits = _Bits(quant_config_from_dict(config["quant"]))
        ph, pw = arch["patch_size"]
        self.img_size, self.patch_size, self.in_chans = (
            tuple(arch["img_size"]),
            (ph, pw),
            arch["in_chans"],
        )
        depths, heads, windows = arch["depths"], arch["num_heads"], arch["window_sizes"]
        dims = [int(arch["embed_dim"] * 2**i) for i in range(len(depths))]
        eps = arch["eps"]
        self.input_point = IntPoint(bits.act)
        self.patch_proj = IntegerLinear(self.in_chans * ph * pw, dims[0])
        self.proj_point = IntPoint(bits.act)
        self.patch_norm = IntegerLayerNorm(dims[0], eps, bits.ptf)
        self.patch_norm_point = IntPoint(bits.act)
        resolution = (self.img_size[0] // ph, self.img_size[1] // pw)
        stages = []
        for i, depth in enumerate(depths):
            downsample = None
            if i > 0:
                downsample = IntegerPatchMerging(dims[i - 1], dims[i], resolution, eps, bits)
                resolution = downsample.output_resolution
            blocks = [
                IntegerSwinBlock(
                    dims[i],
                    resolution,
                    heads[i],
                    tuple(windows[i]),
                    j % 2 == 1,
                    int(dims[i] * arch["mlp_ratio"]),
                    arch["qkv_bias"],
                    eps,
                    bits,
                )  # fmt: skip
                for j in range(depth)
            ]
            stages.append(IntegerSwinStage(downsample, blocks))
        self.layers = nn.ModuleList(stages)
        self.norm = IntegerLayerNorm(dims[-1], eps, bits.ptf)
        self.norm_point = IntPoint(bits.act)
        self.pool_point = IntPoint(bits.act)
        self.head = IntegerLinear(dims[-1], config["num_classes"])
        self.logits_point = IntPoint(bits.act)

    def forward(self, images: Tensor) -> Tensor:
        """Images ``[B, in_chans, H, W]`` → logits ``[B, num_classes]``."""
        codes = kernels.patches(self.input_point.quantize(images), self.patch_size)
        x = self.patch_proj.codes_out(codes, self.input_point, self.proj_point)
        x = self.patch_norm(x, self.proj_point, self.patch_norm_point)
        point = self.patch_norm_point
        for stage in self.layers:
            x, point = stage(x, point)
        x = self.norm_point.dequantize(self.norm(x, point, self.norm_point))
        pooled = self.pool_point.quantize(float_kernels.mean(x, dim=1))
        return self.logits_point.fake_quantize(self.head(pooled, self.pool_point))


def build_integer_model(config: Mapping[str, Any]) -> _IntegerModel:
    """An empty integer model from its ``integer_config`` (then ``load_state_dict`` fills it)."""
    family = config.get("family")
    if family == "vit":
        model: _IntegerModel = IntegerViT(config)
    elif family == "swin":
        model = IntegerSwin(config)
    else:
        raise ValueError(f"integer_config: unknown family {family!r}; expected 'vit' or 'swin'")
    model.refresh()
    return model.eval()
