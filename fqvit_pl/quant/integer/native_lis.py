"""Fake implementation of ``torch.ops.fqvit_native.lis_softmax`` (``csrc/lis.cpp``, the fused
Log-Int-Softmax of the integer attention, called by ``IntegerAttention.native_probabilities``),
so ``torch.compile`` traces it: probabilities of ``acc``'s shape, float32 or ``dtype``."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.register_fake("fqvit_native::lis_softmax")
def _(
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
