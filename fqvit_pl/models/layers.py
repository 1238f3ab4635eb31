"""Building blocks shared by the quantized ViT/DeiT and Swin: patch embedding, Mlp, pooling, input check, init.

Parameter names follow timm (``patch_embed.proj``, ``patch_embed.norm``, ``mlp.fc1``, ``mlp.fc2``) so
timm's state dicts load unchanged; the quantization points (``*_quant``) hold only buffers that timm
checkpoints do not have. Section numbers refer to ``docs/method.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import to_2tuple, trunc_normal_
from torch import Tensor, nn

from ..quant import QuantAct, QuantConfig, QuantConv2d, QuantLayerNorm, QuantLinear

__all__ = ["QuantPatchEmbed", "QuantMlp", "TokenAvgPool", "check_input_size", "init_weights"]


class QuantPatchEmbed(nn.Module):
    """Patch conv, flatten to tokens, ``Q(x)``; with ``norm``, then LayerNorm and a second ``Q(x)`` (§6).

    ``[B, in_chans, H, W]`` → ``[B, (H/p)*(W/p), embed_dim]``. The first point is an activation point
    (per tensor by default, also when ptf is on); the patch norm reads its scale as its input scale.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        in_chans: int,
        embed_dim: int,
        qconfig: QuantConfig,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.img_size: tuple[int, int] = tuple(to_2tuple(img_size))
        self.patch_size: tuple[int, int] = tuple(to_2tuple(patch_size))
        if any(s < p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"img_size {self.img_size} is smaller than patch_size {self.patch_size}"
            )
        self.grid_size: tuple[int, int] = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = QuantConv2d(
            in_chans,
            embed_dim,
            self.patch_size,
            stride=self.patch_size,
            config=qconfig.point("weight"),
        )
        self.proj_quant = QuantAct(embed_dim, qconfig.point("activation"))
        if norm_eps is None:
            self.norm = None
            self.norm_quant = None
        else:
            self.norm = QuantLayerNorm(
                embed_dim, eps=norm_eps, integer=qconfig.ptf, integer_eps=qconfig.ln_eps
            )
            self.norm_quant = QuantAct(embed_dim, qconfig.point("activation"))

    @property
    def out_point(self) -> QuantAct:
        """The point that produced this module's output (the next LayerNorm's input point)."""
        return self.proj_quant if self.norm_quant is None else self.norm_quant

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_quant(self.proj(x).flatten(2).transpose(1, 2))
        if self.norm is not None:
            x = self.norm_quant(self.norm(x, self.proj_quant, self.norm_quant))
        return x


class QuantMlp(nn.Module):
    """``Q(fc2(Q(GELU(fc1(x)))))`` (§6): the fc1 output is not quantized before the GELU.

    ``[..., dim]`` → ``[..., dim]``; timm's names ``fc1``, ``act``, ``fc2``.
    """

    def __init__(self, dim: int, hidden_dim: int, qconfig: QuantConfig) -> None:
        super().__init__()
        self.fc1 = QuantLinear(dim, hidden_dim, config=qconfig.point("weight"))
        self.act = nn.GELU()
        self.act_quant = QuantAct(hidden_dim, qconfig.point("activation"))
        self.fc2 = QuantLinear(hidden_dim, dim, config=qconfig.point("weight"))
        self.fc2_quant = QuantAct(dim, qconfig.point("activation"))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2_quant(self.fc2(self.act_quant(self.act(self.fc1(x)))))


class TokenAvgPool(nn.Module):
    """The average over the tokens: ``[B, L, C]`` → ``[B, C]`` (the global pool of a Swin head)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def check_input_size(x: Tensor, in_chans: int, img_size: tuple[int, int], model_name: str) -> None:
    """Raise ``ValueError`` naming the model unless ``x`` is ``[B, in_chans, H, W]`` with ``(H, W) == img_size``."""
    expected = (in_chans, *img_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{model_name}: expected an input image batch of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {list(x.shape)}"
        )


def init_weights(module: nn.Module) -> None:
    """timm's ViT/Swin initialization of a fresh model: Linear weights truncated normal (std .02), biases 0.

    The patch conv keeps PyTorch's default init and LayerNorms start at (1, 0), as in timm.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
