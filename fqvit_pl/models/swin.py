"""Quantized Swin Transformer with the quantization points of §6 and timm's parameter names.

The float computation is timm 1.x's ``SwinTransformer`` (patch merging at the start of stages 1..,
``head.fc``, windows clipped to small resolutions, zero padding to whole windows, 0/-100 shift mask).
Tokens travel between modules as ``[B, H*W, C]`` so that every per-channel point sees its channel on
the last axis; they are viewed as ``[B, H, W, C]`` only to shift and partition windows.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import (
    checkpoint_filter_fn,
    get_relative_position_index,
    resolve_stage_window_sizes,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from ..quant import (
    QuantAct,
    QuantConfig,
    QuantLayerNorm,
    QuantLinear,
    QuantSoftmax,
    guard_calibration_config,
)
from .layers import QuantMlp, QuantPatchEmbed, TokenAvgPool, check_input_size, init_weights

__all__ = [
    "QuantWindowAttention",
    "QuantSwinBlock",
    "QuantPatchMerging",
    "QuantSwinStage",
    "QuantSwinHead",
    "QuantSwinTransformer",
    "shifted_window_mask",
]

#: Added to the scores of token pairs from different regions of a shifted window.
MASK_VALUE = -100.0


def _region_labels(size: int, window: int, shift: int) -> Tensor:
    """Label of each row (or column) after the cyclic shift: 0, 1, 2 for the three regions timm uses."""
    labels = torch.zeros(size)
    if shift:  # without a shift along this axis every row belongs to the same region
        labels[size - window : size - shift] = 1
        labels[size - shift :] = 2
    return labels


def shifted_window_mask(
    padded_resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> Tensor | None:
    """The shifted-window attention mask ``[num_windows, N, N]`` (0 within a region, -100 across), or None.

    ``padded_resolution`` is the token grid rounded up to whole windows; ``N = window[0] * window[1]``.
    """
    if not any(shift):
        return None
    rows = _region_labels(padded_resolution[0], window[0], shift[0])
    cols = _region_labels(padded_resolution[1], window[1], shift[1])
    regions = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]  # [1, Hp, Wp, 1]
    windows = window_partition(regions, window).reshape(-1, window[0] * window[1])
    same = windows[:, None, :] == windows[:, :, None]
    return torch.where(same, 0.0, MASK_VALUE)


class QuantWindowAttention(nn.Module):
    """Window attention with relative position bias (§6, Swin step 3) on ``[B*windows, N, dim]``.

    ``t = Q(qkv(h))``; ``q *= head_dim**-0.5``; ``a = Q(q @ k^T)``; ``a = Q(a + Q(table)[index])``;
    ``a += mask`` (unquantized); ``p = Softmax_q(a)``; ``o = Q(merge_heads(p @ v))``; ``Q(proj(o))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        qkv_bias: bool,
        qconfig: QuantConfig,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        act = qconfig.point("activation")
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads)
        )
        self.register_buffer(
            "relative_position_index", get_relative_position_index(*window_size), persistent=False
        )
        self.qkv = QuantLinear(dim, 3 * dim, bias=qkv_bias, config=qconfig.point("weight"))
        self.qkv_quant = QuantAct(3 * dim, act)
        self.score_quant = QuantAct(
            num_heads, act
        )  # [B, heads, N, N]: the channel axis is the head
        # A parameter, the same on every process: under DDP its statistics are not merged as data.
        self.bias_table_quant = QuantAct(num_heads, act, replicated_input=True)
        self.bias_quant = QuantAct(num_heads, act)
        self.softmax = QuantSoftmax(qconfig.point("softmax"), lis=qconfig.lis)
        self.context_quant = QuantAct(dim, act)
        self.proj = QuantLinear(dim, dim, config=qconfig.point("weight"))
        self.proj_quant = QuantAct(dim, act)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """The quantized table gathered to ``[1, heads, N, N]``."""
        table = self.bias_table_quant(self.relative_position_bias_table)
        bias = table[self.relative_position_index.reshape(-1)].reshape(
            self.window_area, self.window_area, -1
        )
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, tokens, dim = x.shape
        qkv = self.qkv_quant(self.qkv(x))
        q, k, v = (
            qkv.reshape(windows, tokens, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        scores = self.score_quant((q * self.scale) @ k.transpose(-2, -1))
        scores = self.bias_quant(scores + self.relative_position_bias())
        if mask is not None:
            num_windows = mask.shape[0]
            scores = (
                scores.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[None, :, None]
            )
            scores = scores.view(-1, self.num_heads, tokens, tokens)
        probs = self.softmax(scores, self.bias_quant)
        context = self.context_quant((probs @ v).transpose(1, 2).reshape(windows, tokens, dim))
        return self.proj_quant(self.proj(context))


class QuantSwinBlock(nn.Module):
    """Swin block of §6 (Swin step 2) on ``[B, H*W, dim]`` tokens; names ``norm1``, ``attn``, ``norm2``, ``mlp`` as timm.

    ``h = Q(norm1(x))``; (shifted) window attention; ``x = LNQ(x + h)``; ``h = Q(norm2(x))``;
    ``x = LNQ(x + mlp(h))``. As in timm, a window no smaller than the resolution is clipped to it and
    not shifted, and the grid is zero-padded to whole windows.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: tuple[int, int],
        shift: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        qconfig: QuantConfig,
    ) -> None:
        super().__init__()
        act, ln_input = qconfig.point("activation"), qconfig.point("ln_input")
        self.input_resolution = input_resolution
        self.window_size: tuple[int, int] = tuple(
            min(r, w) for r, w in zip(input_resolution, window_size)
        )
        self.shift_size: tuple[int, int] = tuple(
            w // 2 if shift and r > w else 0 for r, w in zip(input_resolution, window_size)
        )
        self.norm1 = QuantLayerNorm(dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps)
        self.norm1_quant = QuantAct(dim, act)
        self.attn = QuantWindowAttention(dim, num_heads, self.window_size, qkv_bias, qconfig)
        self.res1_quant = QuantAct(dim, ln_input)
        self.norm2 = QuantLayerNorm(dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps)
        self.norm2_quant = QuantAct(dim, act)
        self.mlp = QuantMlp(dim, int(dim * mlp_ratio), qconfig)
        self.res2_quant = QuantAct(dim, ln_input)
        padded = tuple(math.ceil(r / w) * w for r, w in zip(input_resolution, self.window_size))
        self.register_buffer(
            "attn_mask",
            shifted_window_mask(padded, self.window_size, self.shift_size),
            persistent=False,
        )

    @property
    def out_point(self) -> QuantAct:
        """The LN-input point that produced the block's output."""
        return self.res2_quant

    def _window_attention(self, h: Tensor) -> Tensor:
        batch, _, dim = h.shape
        height, width = self.input_resolution
        x = h.view(batch, height, width, dim)
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h = -height % self.window_size[0]
        pad_w = -width % self.window_size[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        windows = window_partition(x, self.window_size).view(-1, self.attn.window_area, dim)
        windows = self.attn(windows, self.attn_mask)
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

    def forward(self, x: Tensor, in_point: QuantAct) -> Tensor:
        h = self.norm1_quant(self.norm1(x, in_point, self.norm1_quant))
        x = self.res1_quant(x + self._window_attention(h))
        h = self.norm2_quant(self.norm2(x, self.res1_quant, self.norm2_quant))
        return self.res2_quant(x + self.mlp(h))


class QuantPatchMerging(nn.Module):
    """Patch merging of §6 (Swin step 4): ``[B, H*W, dim]`` → ``[B, ceil(H/2)*ceil(W/2), out_dim]``.

    Gathers each 2x2 neighbourhood into ``4*dim`` channels in timm's order (blocks of ``dim``:
    (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)), then ``norm``, ``Q(x)``, the
    bias-free ``reduction`` and ``LNQ(x)``. The integer ``norm`` tiles the ``dim`` input scales 4 times.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        eps: float,
        qconfig: QuantConfig,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_resolution = tuple(math.ceil(r / 2) for r in input_resolution)
        self.norm = QuantLayerNorm(
            4 * dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps
        )
        self.norm_quant = QuantAct(4 * dim, qconfig.point("activation"))
        self.reduction = QuantLinear(4 * dim, out_dim, bias=False, config=qconfig.point("weight"))
        self.reduction_quant = QuantAct(out_dim, qconfig.point("ln_input"))

    @property
    def out_point(self) -> QuantAct:
        """The LN-input point that produced the output."""
        return self.reduction_quant

    def forward(self, x: Tensor, in_point: QuantAct) -> Tensor:
        batch, _, dim = x.shape
        height, width = self.input_resolution
        x = F.pad(x.view(batch, height, width, dim), (0, 0, 0, width % 2, 0, height % 2))
        rows, cols = self.output_resolution
        # [B, rows, 2, cols, 2, C] → [B, rows, cols, col offset, row offset, C]: timm's channel order.
        x = (
            x.reshape(batch, rows, 2, cols, 2, dim)
            .permute(0, 1, 3, 4, 2, 5)
            .reshape(batch, rows * cols, 4 * dim)
        )
        x = self.norm_quant(self.norm(x, in_point, self.norm_quant))
        return self.reduction_quant(self.reduction(x))


class QuantSwinStage(nn.Module):
    """One stage: optional ``downsample`` (patch merging, stages 1.. as in timm 1.x), then ``blocks``.

    ``[B, H*W, dim]`` → ``[B, H'*W', out_dim]``; blocks alternate regular and shifted windows.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        downsample: bool,
        num_heads: int,
        window_size: tuple[int, int],
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        qconfig: QuantConfig,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample = QuantPatchMerging(dim, out_dim, input_resolution, eps, qconfig)
            resolution = self.downsample.output_resolution
        else:
            if dim != out_dim:
                raise ValueError(
                    f"a stage without patch merging keeps its dim, got {dim} → {out_dim}"
                )
            self.downsample = None
            resolution = input_resolution
        self.output_resolution: tuple[int, int] = tuple(resolution)
        self.blocks = nn.ModuleList(
            QuantSwinBlock(
                out_dim,
                self.output_resolution,
                num_heads,
                window_size,
                i % 2 == 1,
                mlp_ratio,
                qkv_bias,
                eps,
                qconfig,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, in_point: QuantAct) -> tuple[Tensor, QuantAct]:
        """Returns the output tokens and the point that produced them."""
        if self.downsample is not None:
            x = self.downsample(x, in_point)
            in_point = self.downsample.out_point
        for block in self.blocks:
            x = block(x, in_point)
            in_point = block.out_point
        return x, in_point


class QuantSwinHead(nn.Module):
    """Average pool over tokens, ``Q(x)``, ``fc``, ``Q(logits)`` (§6, Swin step 5): ``[B, L, C]`` → ``[B, classes]``.

    Named ``head`` with a ``fc`` Linear, like timm's ``ClassifierHead``.
    """

    def __init__(self, dim: int, num_classes: int, qconfig: QuantConfig) -> None:
        super().__init__()
        self.global_pool = TokenAvgPool()
        self.pool_quant = QuantAct(dim, qconfig.point("activation"))
        self.fc = QuantLinear(dim, num_classes, config=qconfig.point("weight"))
        self.logits_quant = QuantAct(num_classes, qconfig.point("activation"))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_quant(self.fc(self.pool_quant(self.global_pool(x))))


class QuantSwinTransformer(nn.Module):
    """Quantized Swin: ``[B, in_chans, H, W]`` images → ``[B, num_classes]`` logits.

    Structure and parameter names of timm 1.x's ``SwinTransformer`` (``patch_embed.proj``/``norm``,
    ``layers.N.downsample`` for N >= 1, ``layers.N.blocks.M.*``, ``norm``, ``head.fc``); the derived
    ``relative_position_index`` and ``attn_mask`` are non-persistent buffers, as in timm. ``depths`` and
    ``num_heads`` give one entry per stage; stage ``i`` has ``embed_dim * 2**i`` channels.
    ``window_size`` is an int or ``(h, w)`` for every stage, or one per stage. LayerNorm epsilon 1e-5.
    """

    def __init__(
        self,
        qconfig: QuantConfig,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] | Sequence[Sequence[int]] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        model_name: str = "QuantSwinTransformer",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths or min(depths) < 1 or num_classes < 1:
            raise ValueError(
                f"{model_name}: depths {depths} and num_heads {num_heads} need one positive entry per stage, "
                f"num_classes ({num_classes}) must be positive"
            )
        self.qconfig = qconfig
        self.model_name = model_name
        self.in_chans = in_chans
        self.num_classes = num_classes
        dims = [int(embed_dim * 2**i) for i in range(len(depths))]
        self.num_features = dims[-1]
        self.input_quant = QuantAct(in_chans, qconfig.point("activation"))
        self.patch_embed = QuantPatchEmbed(
            img_size, patch_size, in_chans, dims[0], qconfig, norm_eps=eps
        )
        windows = resolve_stage_window_sizes(window_size, len(depths))
        stages = []
        resolution = self.patch_embed.grid_size
        for i, depth in enumerate(depths):
            stage = QuantSwinStage(
                dims[max(i - 1, 0)],
                dims[i],
                resolution,
                depth,
                i > 0,
                num_heads[i],
                tuple(windows[i]),
                mlp_ratio,
                qkv_bias,
                eps,
                qconfig,
            )
            resolution = stage.output_resolution
            stages.append(stage)
        self.layers = nn.ModuleList(stages)
        self.norm = QuantLayerNorm(
            self.num_features, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps
        )
        self.norm_quant = QuantAct(self.num_features, qconfig.point("activation"))
        self.head = QuantSwinHead(self.num_features, num_classes, qconfig)
        self.pretrained_cfg: dict = {"input_size": (in_chans, *self.patch_embed.img_size)}
        init_weights(self)
        guard_calibration_config(self)

    @property
    def img_size(self) -> tuple[int, int]:
        """The ``(H, W)`` input size the network accepts."""
        return self.patch_embed.img_size

    def filter_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Convert an original-release Swin state dict to timm's layout with timm's ``checkpoint_filter_fn``.

        It drops the derived ``relative_position_index``/``attn_mask`` buffers, moves
        ``layers.N.downsample`` to ``layers.N+1`` and renames ``head`` to ``head.fc``.
        """
        return checkpoint_filter_fn(dict(state_dict), self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` → normalized tokens ``[B, H'*W', num_features]`` (before their point)."""
        check_input_size(x, self.in_chans, self.img_size, self.model_name)
        x = self.patch_embed(self.input_quant(x))
        point = self.patch_embed.out_point
        for stage in self.layers:
            x, point = stage(x, point)
        return self.norm(x, point, self.norm_quant)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, in_chans, H, W]`` → logits ``[B, num_classes]``."""
        return self.head(self.norm_quant(self.forward_features(x)))

    def extra_repr(self) -> str:
        return f"name={self.model_name}, img_size={self.img_size}, method={self.qconfig.method}, ptf={self.qconfig.ptf}, lis={self.qconfig.lis}"

    @classmethod
    def architecture_args(cls) -> tuple[str, ...]:
        """The architecture keyword arguments accepted through ``create_model(model_kwargs=...)``."""
        return (
            "img_size",
            "patch_size",
            "in_chans",
            "embed_dim",
            "depths",
            "num_heads",
            "window_size",
            "mlp_ratio",
            "qkv_bias",
        )
