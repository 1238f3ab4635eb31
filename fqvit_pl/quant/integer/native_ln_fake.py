"""Fake (meta) implementations of the fused LayerNorm/residual operators (``csrc/ln.cpp``), for
``torch.compile``; imported by :mod:`.native_fake` once the library is loaded."""

from __future__ import annotations

import torch
from torch import Tensor


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
