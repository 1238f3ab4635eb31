"""Fake (meta) implementations of the attention matmul operators of ``csrc/attnmm.cpp``, so
``torch.compile`` traces them (inductor calls them as extern kernels)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.register_fake("fqvit_native::attention_scores")
def _attention_scores(qkv: Tensor, heads: int, zero_point: int) -> Tensor:
    batch, tokens, _ = qkv.shape
    return qkv.new_empty((batch, heads, tokens, tokens), dtype=torch.float32)


@torch.library.register_fake("fqvit_native::attention_context")
def _attention_context(probs: Tensor, qkv: Tensor, heads: int, zero_point: int) -> Tensor:
    batch, tokens, width = qkv.shape
    return qkv.new_empty((batch, tokens, width // 3), dtype=torch.float32)
