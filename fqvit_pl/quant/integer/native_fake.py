"""Fake (meta) implementations of the ``fqvit_native`` operators, so ``torch.compile`` traces them
(inductor calls them as extern kernels): output shapes and dtypes only.

Imported by :func:`fqvit_pl.quant.integer.native.native_ops` after the library is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

# csrc/attnmm.cpp: the attention matmuls


@torch.library.register_fake("fqvit_native::attention_scores")
def _attention_scores(qkv: Tensor, heads: int, zero_point: int) -> Tensor:
    batch, tokens, _ = qkv.shape
    return qkv.new_empty((batch, heads, tokens, tokens), dtype=torch.float32)


@torch.library.register_fake("fqvit_native::attention_context")
def _attention_context(probs: Tensor, qkv: Tensor, heads: int, zero_point: int) -> Tensor:
    batch, tokens, width = qkv.shape
    return qkv.new_empty((batch, tokens, width // 3), dtype=torch.float32)


# csrc/lis.cpp: score codes and Log-Int-Softmax, probabilities of acc's shape (float32 or dtype)
@torch.library.register_fake("fqvit_native::lis_softmax")
def _lis_softmax(
    acc: Tensor,
    step: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    lower: int,
    upper: int,
    bias: Tensor | None,
    bias_scale: Tensor | None,
    bias_zero_point: Tensor | None,
    bias_lower: int,
    bias_upper: int,
    mask: Tensor | None,
    exp_table: Tensor,
    bits: int,
    exact_float64: bool,
    dtype: torch.dtype | None = None,
) -> Tensor:
    return acc.new_empty(acc.shape, dtype=dtype or torch.float32)


# csrc/ln.cpp: the integer LayerNorm and the residual before it
@torch.library.register_fake("fqvit_native::ln_stats")
def _ln_stats(codes: Tensor, zero_point: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    shape = (*codes.shape[:-1], 1)
    return codes.new_empty(shape, dtype=torch.float32), codes.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("fqvit_native::ln_apply")
def _ln_apply(codes: Tensor, *args: object) -> Tensor:
    return codes.new_empty(codes.shape, dtype=torch.uint8)


@torch.library.register_fake("fqvit_native::residual_codes")
def _residual_codes(x: Tensor, *args: object) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)
