"""Quantized ViT / DeiT with the quantization points of §6 and timm's parameter names.

Before calibration every point passes its input through, so the network computes timm's
``VisionTransformer`` (class token, learned position embedding, pre-norm blocks, token pooling).
The attention is computed explicitly (``q @ k^T``, softmax, ``@ v``) so that its scores and
probabilities can be quantized; timm's fused attention never materializes them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from ..quant import (
    QuantAct,
    QuantConfig,
    QuantLayerNorm,
    QuantLinear,
    QuantSoftmax,
    guard_calibration_config,
)
from .layers import QuantMlp, QuantPatchEmbed, check_input_size, init_weights

__all__ = ["QuantAttention", "QuantBlock", "QuantVisionTransformer"]


class QuantAttention(nn.Module):
    """Multi-head self-attention of §6 (ViT step 5) on ``[B, N, dim]`` tokens; names ``qkv``, ``proj`` as timm.

    ``t = Q(qkv(h))``; ``a = Q((q @ k^T) * head_dim**-0.5)``; ``p = Softmax_q(a)``;
    ``o = Q(merge_heads(p @ v))``; ``out = Q(proj(o))``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qconfig: QuantConfig) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        act = qconfig.point("activation")
        self.qkv = QuantLinear(dim, 3 * dim, bias=qkv_bias, config=qconfig.point("weight"))
        self.qkv_quant = QuantAct(3 * dim, act)
        self.score_quant = QuantAct(
            num_heads, act
        )  # [B, heads, N, N]: the channel axis is the head
        self.softmax = QuantSoftmax(qconfig.point("softmax"), lis=qconfig.lis)
        self.context_quant = QuantAct(dim, act)
        self.proj = QuantLinear(dim, dim, config=qconfig.point("weight"))
        self.proj_quant = QuantAct(dim, act)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv_quant(self.qkv(x))
        q, k, v = (
            qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        scores = self.score_quant((q @ k.transpose(-2, -1)) * self.scale)
        probs = self.softmax(scores, self.score_quant)
        context = self.context_quant((probs @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return self.proj_quant(self.proj(context))


class QuantBlock(nn.Module):
    """Pre-norm transformer block of §6 (ViT step 4) on ``[B, N, dim]``; names ``norm1``, ``attn``, ``norm2``, ``mlp``.

    ``h = Q(norm1(x))``; ``x = LNQ(x + attn(h))``; ``h = Q(norm2(x))``; ``x = LNQ(x + mlp(h))``.
    ``forward(x, in_point)`` takes the point that produced ``x`` (the integer ``norm1`` reads its scales).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        qconfig: QuantConfig,
    ) -> None:
        super().__init__()
        act, ln_input = qconfig.point("activation"), qconfig.point("ln_input")
        self.norm1 = QuantLayerNorm(dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps)
        self.norm1_quant = QuantAct(dim, act)
        self.attn = QuantAttention(dim, num_heads, qkv_bias, qconfig)
        self.res1_quant = QuantAct(dim, ln_input)
        self.norm2 = QuantLayerNorm(dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps)
        self.norm2_quant = QuantAct(dim, act)
        self.mlp = QuantMlp(dim, int(dim * mlp_ratio), qconfig)
        self.res2_quant = QuantAct(dim, ln_input)

    @property
    def out_point(self) -> QuantAct:
        """The LN-input point that produced the block's output."""
        return self.res2_quant

    def forward(self, x: Tensor, in_point: QuantAct) -> Tensor:
        h = self.norm1_quant(self.norm1(x, in_point, self.norm1_quant))
        x = self.res1_quant(x + self.attn(h))
        h = self.norm2_quant(self.norm2(x, self.res1_quant, self.norm2_quant))
        return self.res2_quant(x + self.mlp(h))


class QuantVisionTransformer(nn.Module):
    """Quantized ViT / DeiT: ``[B, in_chans, H, W]`` images → ``[B, num_classes]`` logits.

    The structure and parameter names are timm's ``VisionTransformer`` with a class token, a learned
    position embedding covering it, token pooling and a final norm (``patch_embed.proj``,
    ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm``, ``head``). ``input_quant`` adds the
    ``Q_input`` point on the image (DeiT: yes, ViT: no, §6). ``eps`` is the LayerNorm epsilon (1e-6).
    """

    def __init__(
        self,
        qconfig: QuantConfig,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        input_quant: bool = True,
        eps: float = 1e-6,
        model_name: str = "QuantVisionTransformer",
    ) -> None:
        super().__init__()
        if depth < 1 or num_classes < 1:
            raise ValueError(
                f"{model_name}: depth and num_classes must be positive, got {depth} and {num_classes}"
            )
        act, ln_input = qconfig.point("activation"), qconfig.point("ln_input")
        self.qconfig = qconfig
        self.model_name = model_name
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.input_quant = QuantAct(in_chans, act) if input_quant else None
        self.patch_embed = QuantPatchEmbed(img_size, patch_size, in_chans, embed_dim, qconfig)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_quant = QuantAct(embed_dim, act)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        # The same tensor on every process: under DDP its statistics are not merged as data.
        self.pos_quant = QuantAct(embed_dim, act, replicated_input=True)
        self.embed_quant = QuantAct(embed_dim, ln_input)
        self.blocks = nn.ModuleList(
            QuantBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, eps, qconfig)
            for _ in range(depth)
        )
        self.norm = QuantLayerNorm(
            embed_dim, eps=eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps
        )
        self.pre_head_quant = QuantAct(embed_dim, act)
        self.head = QuantLinear(embed_dim, num_classes, config=qconfig.point("weight"))
        self.logits_quant = QuantAct(num_classes, act)
        # timm's checkpoint filter reads the source resolution from here; ours is the resolution built.
        self.pretrained_cfg: dict = {"input_size": (in_chans, *self.patch_embed.img_size)}
        self.reset_parameters()
        guard_calibration_config(self)

    @property
    def img_size(self) -> tuple[int, int]:
        """The ``(H, W)`` input size the network accepts."""
        return self.patch_embed.img_size

    def reset_parameters(self) -> None:
        """timm's initialization: position embedding truncated normal (.02), class token normal (1e-6)."""
        init_weights(self)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def filter_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Convert a foreign ViT/DeiT state dict to timm's layout with timm's own ``checkpoint_filter_fn``."""
        return checkpoint_filter_fn(dict(state_dict), self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` → normalized tokens ``[B, 1 + N, embed_dim]`` (before the head's point)."""
        check_input_size(x, self.in_chans, self.img_size, self.model_name)
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = self.patch_embed(x)
        x = self.cls_quant(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        x = self.embed_quant(x + self.pos_quant(self.pos_embed))
        point = self.embed_quant
        for block in self.blocks:
            x = block(x, point)
            point = block.out_point
        return self.norm(x, point, self.pre_head_quant)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, in_chans, H, W]`` → logits ``[B, num_classes]``."""
        x = self.pre_head_quant(self.forward_features(x)[:, 0])
        return self.logits_quant(self.head(x))

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
            "depth",
            "num_heads",
            "mlp_ratio",
            "qkv_bias",
        )
