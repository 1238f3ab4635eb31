"""The fused integer LayerNorm and residual kernels (``csrc/ln.cpp``; fake impls in
:mod:`.native_fake`): when they run, and their Python wrappers.

Same bits as the pure PyTorch kernels they replace (:func:`.kernels.int_layernorm_codes`, the
residual's ``quantize_float(dequantize(x) + dequantize(branch))``), in two passes over a token
instead of about twenty:

- ``ln_stats``: ``x_q = (c - zp) * k`` and the exact int64 sums of ``x_q`` and ``x_q**2``, rounded
  once to float32 (the pure kernel's exact float32/float64 sums give the same integers, so the
  same floats);
- the per-token float32 formula of §7 step 2 (mean, std) stays ATen's, shared with the pure
  kernel (:func:`.kernels.layernorm_statistics`), so its bits cannot drift;
- ``ln_apply``: steps 3-5 per (token, channel): the same float32 operations as the pure kernel
  for ``A``, ``M`` and ``B``, ``floor(log2 |A|)`` from the exponent bits and ATen's rounding-up
  thresholds (as the compiled pure kernel, :func:`~fqvit_pl.quant.kernels.tables.layernorm_power`:
  equal to ATen's ``log2`` for every non-NaN ``A``; a NaN ``A`` gives a NaN value either way, code
  0), step 5 in float64 as the pure kernel; a row whose values provably stay below 2**24 (the
  usual one) runs step 5 in float32 instead, with the same results (proof in ``apply_row_fast``).

Used when :func:`.native.native_ops` loaded the kernels, the codes are on the CPU and the PTF
steps are at most 16 (then ``|x_q| <= 255 * 16``: ``x_q**2 <= 2**24`` is exact in float32, as the
pure kernel squares it, and every sum is an exact integer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bit_type import BitType
from ..kernels.tables import floor_log2_thresholds
from . import kernels
from .native import native_ops

__all__ = [
    "layernorm_native",
    "residual_native",
    "int_layernorm_codes_native",
    "residual_codes_native",
]

#: The largest PTF step ``round(s / s_min)`` the fused LayerNorm takes (see the module docstring).
MAX_STEP = 16.0


@torch.compiler.assume_constant_result
def _loaded() -> bool:
    # run, not traced, by torch.compile (native_ops builds and loads a library once)
    return native_ops() is not None


def _ops():
    """``torch.ops.fqvit_native``, loading the library first in eager mode (a compiled graph only
    reaches the callers after :func:`_loaded` said yes)."""
    if not torch.compiler.is_compiling() and native_ops() is None:
        raise RuntimeError(
            "fqvit_pl: the fused kernels are not available (FQVIT_NATIVE=0 or a failed build); "
            "use fqvit_pl.quant.integer.kernels instead"
        )
    return torch.ops.fqvit_native


def _cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def layernorm_native(codes: Tensor, max_step: float) -> bool:
    """Whether the fused LayerNorm runs for these codes (CPU, steps ``<= 16``, kernels loaded)."""
    return (
        _cpu(codes)
        and max_step <= MAX_STEP
        and _loaded()
        and floor_log2_thresholds(torch.device("cpu")) is not None
    )


def residual_native(x: Tensor, branch: Tensor) -> bool:
    """Whether the fused residual runs (CPU, same shapes, kernels loaded)."""
    return _cpu(x, branch) and x.shape == branch.shape and _loaded()


def int_layernorm_codes_native(
    codes: Tensor,
    in_zero_point: Tensor,
    in_scale: Tensor,
    weight: Tensor,
    bias: Tensor,
    out_scale: Tensor,
    out_zero_point: Tensor,
    out_bit_type: BitType,
    *,
    bits: int = 7,
) -> Tensor:
    """:func:`.kernels.int_layernorm_codes` by the fused kernels: the same ``uint8`` codes ``[..., C]``.

    ``codes`` ``[..., C]`` uint8 or integer-valued float32 on the CPU; the PTF steps
    ``round(in_scale / min(in_scale))`` at most 16 (see :func:`layernorm_native`).
    """
    ops = _ops()
    channels = codes.shape[-1]
    s_min, k = kernels.layernorm_steps(in_scale, channels)
    total, squares = ops.ln_stats(codes, in_zero_point, k)
    mean, std = kernels.layernorm_statistics(total, squares, s_min, channels)
    return ops.ln_apply(
        codes, in_zero_point, k, s_min / std, mean / std, weight, bias, out_scale,
        out_zero_point, floor_log2_thresholds(torch.device("cpu")), bits,
        out_bit_type.lower, out_bit_type.upper,
    )  # fmt: skip


def residual_codes_native(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    branch: Tensor,
    branch_scale: Tensor,
    branch_zero_point: Tensor,
    out_scale: Tensor,
    out_zero_point: Tensor,
    out_bit_type: BitType,
) -> Tensor:
    """``quantize_float(dequantize(x) + dequantize(branch))`` in one pass: float32 codes ``[..., C]``.

    ``x`` and ``branch`` (same shape, uint8 or integer-valued float32) with their points' scales
    and zero points (``[]`` or ``[C]``); the same float32 operations in the same order as
    :func:`.kernels.dequantize` and :func:`.kernels.quantize_float`.
    """
    return _ops().residual_codes(
        x, x_scale, x_zero_point, branch, branch_scale, branch_zero_point, out_scale,
        out_zero_point, out_bit_type.lower, out_bit_type.upper,
    )  # fmt: skip
