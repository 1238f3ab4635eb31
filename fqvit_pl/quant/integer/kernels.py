"""The integer operations of the integer model (docs/method.md §12) as pure functions.

Codes travel between layers as ``uint8`` tensors (any unsigned grid of at most 8 bits); a point's
value is ``(code - zero_point) * scale`` (§4). Where a float tensor carries integers, it carries them
exactly: every value it holds is an integer (or a multiple of a power of two) below the 24-bit
(float32) or 53-bit (float64) mantissa, as proven where it is used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bit_type import BitType
from ..functional import int_exp
from ..kernels.tables import layernorm_power, probabilities_from_keys
from . import native

__all__ = [
    "quantize",
    "quantize_float",
    "dequantize",
    "requantize",
    "onednn_available",
    "prepack_weight",
    "int8_linear",
    "int_matmul_exact",
    "native_attention_matmul",
    "attention_scores",
    "attention_context",
    "lis_exp_table",
    "lis_prob_table",
    "lis_exponent_table",
    "log_int_softmax_codes",
    "int_layernorm_codes",
    "MASKED",
    "MASKED_2D",
    "lis_exp_table_2d",
    "lis_prob_from_keys",
]

#: Index of the saturated exponential in :func:`lis_exp_table` (entries ``0..255`` are ``t = 0..255``).
MASKED = 256


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """Float values → ``uint8`` codes ``clamp(round(x / scale + zp), lower, upper)`` (§4).

    The same float32 operations as :func:`fqvit_pl.quant.functional.fake_quantize` before it
    dequantizes, so the codes are the simulation's for the same ``x``. ``scale``/``zero_point``
    broadcast on ``x`` (per tensor, or per channel on the last dim).
    """
    return quantize_float(x, scale, zero_point, bit_type).to(torch.uint8)


def quantize_float(x: Tensor, scale: Tensor, zero_point: Tensor, bit_type: BitType) -> Tensor:
    """:func:`quantize` without the final cast: the codes as integer-valued float32 (one pass fewer
    where the next step reads them as numbers anyway)."""
    # in place on the fresh quotient: the same operations in the same order
    return (x / scale).add_(zero_point).round_().clamp_(bit_type.lower, bit_type.upper)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(codes - zp) * scale`` in float32: bit for bit the simulation's fake-quantized value.

    ``codes``: ``uint8``, or integer-valued float32 (:func:`quantize_float`; left unchanged)."""
    if codes.dtype == torch.float32:
        return torch.sub(codes, zero_point).mul_(scale)
    return codes.to(torch.float32).sub_(zero_point).mul_(scale)


def requantize(acc: Tensor, multiplier: Tensor, offset: Tensor, bit_type: BitType) -> Tensor:
    """Accumulator → codes of the next point: ``clamp(round(acc * multiplier + offset))`` as ``uint8``.

    ``multiplier`` is ``s_acc / s_out`` and ``offset`` is ``bias / s_out + zp_out`` (float32).
    """
    q = (acc * multiplier).add_(offset).round_().clamp_(bit_type.lower, bit_type.upper)
    return q.to(torch.uint8)


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``) runs on this CPU."""
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return False
    try:
        x = torch.zeros(2, 4, dtype=torch.uint8)
        w = torch.ops.onednn.qlinear_prepack(torch.ones(3, 4, dtype=torch.int8), [2, 4])
        out = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, w, torch.ones(3), torch.zeros(3, dtype=torch.long), None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.shape == (2, 3)
    except (RuntimeError, NotImplementedError):
        return False


def prepack_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed form of an int8 weight ``[out, in]`` (an opaque tensor, derived state)."""
    return torch.ops.onednn.qlinear_prepack(weight, None)


def int8_linear(
    codes: Tensor,
    in_scale: float,
    in_zero_point: int,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    *,
    packed: Tensor | None = None,
    zero_point_correction: Tensor | None = None,
) -> Tensor:
    """``Linear`` on codes: ``acc = sum_k (c_x - zp_x) * c_w`` in int32, returns ``acc * s_x * s_w + bias``.

    ``codes`` ``[M, K]`` uint8, ``weight`` ``[N, K]`` int8 (zero point 0) with per-output-channel
    ``weight_scale`` ``[N]``; returns float32 ``[M, N]``. With ``packed`` (see
    :func:`prepack_weight`) oneDNN's int8 GEMM computes it; otherwise ``torch._int_mm`` on
    ``c_x - 128`` (int8) with ``zero_point_correction = (128 - zp_x) * sum_k c_w`` (int32 ``[N]``)
    folded in: ``sum (c_x - zp_x) c_w = sum (c_x - 128) c_w + (128 - zp_x) sum c_w``. Both are exact
    integer accumulations; the int32 accumulator holds ``K * 255 * 128`` for ``K < 65000``.
    """
    if packed is not None:
        return torch.ops.onednn.qlinear_pointwise(
            codes, in_scale, in_zero_point, packed, weight_scale,
            torch.zeros_like(weight_scale, dtype=torch.long), bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
    shifted = (codes.to(torch.int16) - 128).to(torch.int8)
    if zero_point_correction is None:
        zero_point_correction = (128 - in_zero_point) * weight.to(torch.int32).sum(dim=1)
    acc = _int_mm(shifted, weight.t()) + zero_point_correction
    out = acc.to(torch.float32) * (weight_scale * in_scale)
    return out if bias is None else out + bias


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 ``[M, K] @ [K, N]`` → int32, by ``torch._int_mm`` where it applies, else int32 matmul."""
    if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        return a.to(torch.int32) @ b.to(torch.int32)
    return torch._int_mm(a, b)


def int_matmul_exact(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for float32 tensors holding integers ``|a|, |b| <= 255`` with inner size ``d <= 258``.

    Exact: every product is an integer of magnitude at most ``255**2``, so every partial sum, in any
    order or blocking the BLAS chooses, is an integer of magnitude at most ``d * 255**2 < 2**24``,
    which float32 represents exactly. (fp32 ``bmm`` is the fastest batched kernel here; int32 is ~10x
    slower.) Used for ``q @ k^T`` on the codes of the qkv point, zero point removed.
    """
    return a @ b


def native_attention_matmul(head_dim: int) -> bool:
    """Whether :func:`attention_scores` and :func:`attention_context` can run the AVX-512 kernels of
    ``csrc/attnmm.cpp`` for this head size (the kernels are built, the CPU has VNNI and BF16, and
    ``head_dim`` is a multiple of 16, at most 256). Decided when a model is built, not in forward."""
    ops = native.native_ops()
    return (
        ops is not None
        and head_dim % 16 == 0
        and head_dim <= 256
        and bool(ops.attention_matmul_vectorized())
    )


def _heads(x: Tensor, parts: int, heads: int) -> Tensor:
    """``[B, N, parts * heads * hd]`` → ``[parts, B, heads, N, hd]`` (a view)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4)


def attention_scores(qkv: Tensor, heads: int, zero_point: int, *, native: bool = False) -> Tensor:
    """``q @ k^T`` per head on the qkv codes minus their zero point, exact: float32 ``[B, heads, N, N]``.

    ``qkv``: ``uint8`` codes ``[B, N, 3 * dim]`` (q, k, v, each ``heads`` heads of ``hd``). Every
    entry is the integer ``sum_d (c_q - zp)(c_k - zp)``, ``|.| <= hd * 255**2 < 2**24`` for
    ``hd <= 258``, so float32 holds it exactly and both paths give the same bits: ``native`` (CPU;
    see :func:`native_attention_matmul`) runs ``fqvit_native::attention_scores`` (uint8 x int8
    dot products accumulated in int32, zero points folded in exactly, read from the codes in place);
    otherwise :func:`int_matmul_exact` on the float32 codes.
    """
    if native:
        return torch.ops.fqvit_native.attention_scores(qkv, heads, zero_point)
    dim = qkv.shape[-1] // 3
    q, k = _heads(qkv[..., : 2 * dim].to(torch.float32).sub_(zero_point), 2, heads).unbind(0)
    return int_matmul_exact(q, k.transpose(-2, -1))


def attention_context(
    probs: Tensor, qkv: Tensor, heads: int, zero_point: int, *, native: bool = False
) -> Tensor:
    """``probs @ (c_v - zp)`` per head, heads merged: float32 ``[B, N, dim]`` (``dim = heads * hd``).

    ``probs``: float32 (or bfloat16) ``[B, heads, N, N]``, each 0, a power of two ``2**-r``
    (Log-Int-Softmax) or an integer of magnitude at most 255 (a softmax point's codes minus its zero
    point; all exact in bfloat16, which the native kernel reads in place); ``qkv`` as
    in :func:`attention_scores` (V is its last third). The caller guarantees that every partial sum
    of a row is exact in float32 (``IntegerAttention.forward`` proves it: multiples of ``2**-15``
    below ``2**9``, or integers below ``2**24``); then the sum is the exact one in any order, and
    both paths give the same bits: ``native`` runs ``fqvit_native::attention_context`` (bf16 pairs,
    exact for these operands, accumulated in float32; it refuses a probability that is not exactly a
    bfloat16), otherwise :func:`int_matmul_exact` on the float32 codes of V.
    """
    if native:
        return torch.ops.fqvit_native.attention_context(probs, qkv, heads, zero_point)
    batch, tokens, width = qkv.shape
    v = _heads(qkv[..., 2 * width // 3 :].to(torch.float32).sub_(zero_point), 1, heads)[0]
    probs = probs.to(torch.float32)  # a bfloat16 bmm would round its sums
    return int_matmul_exact(probs, v).transpose(1, 2).reshape(batch, tokens, width // 3)


def lis_exp_table(score_scale: Tensor) -> Tensor:
    """The integer exponential of §8 step 2 for every shifted score ``-t``, ``t = 0..255``, float64 ``[257]``.

    Entry ``t`` is ``int_exp(-t)`` for the score point's scale (the contract's formula, read from
    :func:`fqvit_pl.quant.functional.int_exp`; integers, exact in float32 there as
    ``z < 2**24`` and ``2**(n-q)`` is a power of two); entry :data:`MASKED` is the saturated value
    ``int_exp(n * x0)`` of a score far below the row maximum (Swin's masked pairs).
    """
    t = torch.arange(0, -256, -1, dtype=torch.float32)
    e = int_exp(t, score_scale.reshape(()).to(torch.float32))
    saturated = int_exp(torch.tensor([-1e9]), score_scale.reshape(()).to(torch.float32))
    return torch.cat([e, saturated]).to(torch.float64)


def lis_exp_table_2d(score_scale: Tensor, zero_point: Tensor) -> Tensor:
    """The simulation's integer exponential for every (row-maximum code, code) pair, float64 ``[65537]``.

    The published Log-Int-Softmax divides the fake-quantized scores by their scale in float32
    (``x / s - max(x) / s``, §8 step 1); ``fl(fl(a * s) / s)`` is not always the integer ``a``, so the
    floor in the integer exponential now and then sees ``k * x0`` plus or minus one ulp and picks the
    neighbouring polynomial piece. Entry ``256 * c_max + c`` is ``int_exp`` of exactly what the
    simulation computes for a score of code ``c`` in a row whose largest code is ``c_max``, so the
    integer model gives the simulation's exponentials for the same codes; entry ``65536`` is the
    saturated value of a masked pair (:data:`MASKED_2D`). :func:`lis_exp_table` is the exact
    integer version (``t = c_max - c``).
    """
    scale = score_scale.reshape(()).to(torch.float32)
    value = (
        torch.arange(256, dtype=torch.float32) - zero_point.reshape(()).to(torch.float32)
    ) * scale
    shifted = value[None, :] / scale - value[:, None] / scale  # [c_max, c]
    e = int_exp(shifted.reshape(-1).contiguous(), scale).reshape(256, 256)
    e = torch.tril(e)  # a code above its row's maximum never occurs: 0 (keeps max(e) meaningful)
    saturated = int_exp(torch.tensor([-1e9]), scale)
    return torch.cat([e.reshape(-1), saturated]).to(torch.float64)


#: Index of the saturated exponential in :func:`lis_exp_table_2d`.
MASKED_2D = 65536


def _log_round(y: Tensor) -> Tensor:
    """§8 step 4 for float64 ``y >= 1`` (exact integers): ``r = floor(log2 y) + [y >= 1.5 * 2**floor(log2 y)]``.

    Read off the bits: ``y.view(int64) >> 51`` is the biased exponent ``E`` and the first mantissa
    bit ``h`` (``key = 2E + h``), and ``r = E - 1023 + h``. ``inf`` (``e == 0``) gives key 4094.
    """
    return torch.bitwise_right_shift(y.view(torch.int64), 51)


def lis_exponent_table(bits: int) -> Tensor:
    """``[4096]`` int64: the output exponent ``r`` (``2**bits`` meaning probability 0) for each key of :func:`_log_round`."""
    keys = torch.arange(4096, dtype=torch.int64)
    r = (keys >> 1) - 1023 + (keys & 1)
    levels = 2**bits
    r = torch.where(r >= levels, torch.full_like(r, levels), r.clamp(min=0))
    r[4094:] = levels  # inf (e == 0) and nan: probability 0
    return r


def lis_prob_from_keys(key: Tensor, bits: int) -> Tensor:
    """``lis_prob_table(bits)[key]`` computed elementwise (float32; a compiled graph fuses it, a
    gather it does not): ``2**-r`` for ``r = (key >> 1) - 1023 + (key & 1)``, 1 for ``r < 0``, 0
    for ``r >= 2**bits`` and for the keys of inf and NaN (4094, 4095). Equal to the table for every
    key where ``2**bits - 1 <= 126`` (tested), and for every key the kernels produce at any ``bits``:
    ``y < 2**52``, so ``r <= 52`` (the rule cannot build the table's subnormal ``2**-r``, ``r > 126``)."""
    out = probabilities_from_keys(key, bits, exponent_bias=1023)
    return torch.where(key >= 4094, 0.0, out)


def lis_prob_table(bits: int) -> Tensor:
    """``[4096]`` float32: ``2**-r`` (0 where ``r >= 2**bits``) for each key of :func:`_log_round`."""
    r = lis_exponent_table(bits)
    return torch.where(r >= 2**bits, 0.0, torch.pow(2.0, -r.to(torch.float64))).to(torch.float32)


def log_int_softmax_codes(
    score_codes: Tensor,
    exp_table: Tensor,
    out_table: Tensor,
    mask: Tensor | None = None,
    *,
    exact_float64: bool = True,
    softmax_bits: int | None = None,
) -> Tensor:
    """Log-Int-Softmax (§8) over the last dim of ``uint8`` score codes, by table lookups.

    ``score_codes`` may also be the codes as integer-valued float32 (:func:`quantize_float`).

    ``t = rowmax(c) - c`` (the zero point cancels) is an integer in ``0..255``; ``e = exp_table[t]``
    (:func:`lis_exp_table`; with the ``[65537]`` :func:`lis_exp_table_2d`,
    ``e = exp_table[256 * rowmax(c) + c]``, the simulation's float32 division included); ``S = sum(e)``; ``y = round(S / e)`` (half to even); the log rounding
    picks ``out_table[key(y)]`` (:func:`lis_prob_table` for the probabilities ``2**-r``,
    :func:`lis_exponent_table` for the exponents ``r``). ``mask`` (bool, broadcastable, True where
    Swin adds -100) sends those pairs to the saturated exponential (entry :data:`MASKED`); the
    converter checks that -100 always saturates and never makes a row maximum.

    With ``exact_float64`` (the converter's choice when ``row length * max(e) < 2**52``) float64
    carries the integers exactly: ``S < 2**52`` is exact whatever the summation order, and the
    correctly rounded ``S / e`` rounds half to even as the exact quotient does (a quotient within
    ``2**-53`` relative of a half-integer is one: ``|S/e - (k + 1/2)| >= 1/(2e)`` otherwise).
    Otherwise ``S`` and ``y`` are computed in int64 with integer division.

    ``softmax_bits`` (with ``out_table = lis_prob_table(softmax_bits)``): under ``torch.compile``
    the probabilities are computed from the keys (:func:`lis_prob_from_keys`, the same values),
    which fuses with the rest of the kernel; eager keeps the lookup.
    """
    shape = score_codes.shape
    # float codes: index arithmetic on integers below 2**17, exact in float32, one cast at the end
    c = score_codes if score_codes.is_floating_point() else score_codes.to(torch.int32)
    if exp_table.numel() == MASKED_2D + 1:  # the simulation's table, indexed by (row max, code)
        if mask is not None:
            c = c.masked_fill(mask, -512)  # never a row maximum (checked by the converter)
        index = c + c.amax(dim=-1, keepdim=True).mul_(256)
        if mask is not None:
            index = index.masked_fill_(mask.expand(shape), MASKED_2D)
    else:
        if mask is not None:
            c = c.masked_fill(mask, -512)
        index = torch.sub(c.amax(dim=-1, keepdim=True), c).clamp_(max=MASKED)
    # index_select on the flat tensor: several times faster than advanced indexing on CPU
    flat = index.reshape(-1).to(torch.int32)
    if exact_float64:
        e = torch.index_select(exp_table, 0, flat).view(shape)
        y = torch.div(e.sum(dim=-1, keepdim=True), e, out=e).round_()
        key = y.view(torch.int64).bitwise_right_shift_(51)  # _log_round, in place
        if softmax_bits is not None and torch.compiler.is_compiling():
            return lis_prob_from_keys(key, softmax_bits)
        return torch.index_select(out_table, 0, key.view(-1)).view(shape)
    e = torch.index_select(exp_table.to(torch.int64), 0, flat).view(shape)
    total = e.sum(dim=-1, keepdim=True)
    safe = e.clamp(min=1)
    y = torch.div(total, safe, rounding_mode="floor")
    rem2 = (total - y * safe) * 2
    y = y + ((rem2 > safe) | ((rem2 == safe) & (y % 2 == 1))).to(torch.int64)
    # Only y < 2**16 can give an exponent below 2**bits (bits <= 15): clamping to 2**40 keeps
    # every such key and sends the rest (and e == 0, y infinite) to probability 0.
    y = torch.where(e == 0, 2**40, y.clamp(max=2**40)).to(torch.float64)
    return torch.index_select(out_table, 0, _log_round(y).view(-1)).view(shape)


def int_layernorm_codes(
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
    sum_dtype: torch.dtype | None = None,
) -> Tensor:
    """The integer LayerNorm of §7 on LN-input codes ``[..., C]``: returns the codes of the next point.

    ``codes``: ``uint8`` or integer-valued float32 (:func:`quantize_float`).

    ``in_scale`` is the LN-input point's ``[C]`` (or ``[C / 4]``, tiled, or ``[]``) scales; ``s_min``
    their minimum and ``k = round(s_in / s_min)`` (powers of two with PTF), so
    ``x_q = (c - zp_in) * k`` is the input in units of ``s_min``. ``sum x_q`` and ``sum x_q**2`` are
    exact (float64 holds integers below 2**53: ``C * (255 * 8)**2 < 2**53``). The per-token
    multiplier and offset (§7 steps 2–4) follow the contract's float32 formula on those sums,
    operation for operation as the simulation; step 5, ``y_q = round((sign * M * x_q + B) / 2**N)``,
    is exact integer arithmetic in float64 (``|sign * M * x_q + B| < 2**53``; the division by a
    power of two is exact; round is half to even), and the codes are ``clamp(y_q + zp_out)``.
    Equal to the simulation whenever its float32 sums are exact (below 2**24); otherwise this one
    is the exact one.

    On the CPU the integer layers run :func:`.native_ln.int_layernorm_codes_native` instead (fused
    C++ kernels, the same codes; tested against this function).

    ``sum_dtype``: the dtype of ``sum x_q`` (float32 is exact while ``C * 255 * max(k) < 2**24``);
    ``None`` reads ``max(k)`` from the scales (a data-dependent decision ``torch.compile`` cannot
    trace: the integer layers pass it, decided when the model is converted).
    """
    channels = codes.shape[-1]
    s_min, k = layernorm_steps(in_scale, channels)
    # x_q and x_q**2 are integers below 2**12 and 2**22: exact in float32; the sums in float64
    zero_point = in_zero_point.reshape(-1)[0]
    if codes.dtype == torch.float32:  # integer-valued float codes (quantize_float): left unchanged
        x_q = torch.sub(codes, zero_point).mul_(k)
    else:
        x_q = codes.to(torch.float32).sub_(zero_point).mul_(k)
    # |x_q| <= 255 * max(k): the row sum is exact in float32 below 2**24 (no float64 copy of x_q)
    if sum_dtype is None:
        sum_dtype = layernorm_sum_dtype(channels, float(k.max()))
    total = x_q.sum(dim=-1, keepdim=True, dtype=sum_dtype)
    squares = (x_q * x_q).sum(dim=-1, keepdim=True, dtype=torch.float64)
    mean, std = layernorm_statistics(
        total.to(torch.float32), squares.to(torch.float32), s_min, channels
    )
    if torch.compiler.is_compiling():
        a = ((s_min / std) * weight) / out_scale
        # floor(log2) from exponent bits and ATen's log2 thresholds, 2**N from bits: the same
        # values as the eager lines below for every non-NaN a, and it fuses
        p = layernorm_power(torch.abs(a), bits)
    else:
        # the contract's float32 steps 3-4 (in place on fresh tensors: same operations, same
        # order); 2**n by exp2: the exact power of two for integer n, as pow(2.0, n)
        a = (s_min / std) * weight
        a.div_(out_scale)
        # fewer passes, the same values: bits - f is the exact -f + bits of small integers (or
        # +-inf), and sign(a) * floor(|a| * p) clamped to M's range is trunc(a * p) clamped
        # symmetrically
        p = torch.abs(a).log2_().floor_()
        p = torch.sub(bits, p, out=p).clamp_(0, 31).exp2_()
    signed_m = a.mul_(p).trunc_().clamp_(-(2 ** (bits + 1) - 1), 2 ** (bits + 1) - 1)
    b = (mean / std) * weight
    b = torch.sub(bias, b, out=b).div_(out_scale).mul_(p).round_()
    # step 5 exactly: |sign * M * x_q + B| < 2**53, division by a power of two, half-even round
    v = signed_m.to(torch.float64).mul_(x_q).add_(b).div_(p).round_()
    v.add_(out_zero_point.reshape(-1)[0]).clamp_(out_bit_type.lower, out_bit_type.upper)
    return v.to(torch.uint8)


def layernorm_steps(in_scale: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """§7 step 1's units: ``s_min = min(s_in)`` (0-dim) and ``k = round(s_in / s_min)`` (``[C]``, or
    ``[1]`` for a per-tensor point), the LN-input point's ``[C]``, ``[C / r]`` (tiled ``r`` times in
    channel order, Swin's patch merging) or ``[]`` scales ``in_scale``."""
    in_scale = in_scale.reshape(-1)
    if in_scale.numel() not in (1, channels):
        in_scale = in_scale.repeat(channels // in_scale.numel())
    s_min = in_scale.min()
    return s_min, torch.round(in_scale / s_min)


def layernorm_statistics(
    total: Tensor, squares: Tensor, s_min: Tensor, channels: int
) -> tuple[Tensor, Tensor]:
    """§7 step 2 in float32: the tokens' ``mean`` and ``std`` from ``sum x_q`` and ``sum x_q**2``
    (float32 ``[..., 1]``: the exact sums, rounded once) over ``channels``. Shared by the pure
    kernel and the fused one (:mod:`.native_ln`), so both compute the same bits."""
    mean = (total / channels) * s_min
    variance = channels * squares - total**2
    if torch.compiler.is_compiling():
        # ATen's CPU sqrt is not always inductor's correctly rounded one: keep eager's kernel
        return mean, (s_min / channels) * torch.ops.fqvit.integer_sqrt(variance)
    return mean, (s_min / channels) * torch.sqrt(variance)


@torch.library.custom_op("fqvit::integer_sqrt", mutates_args=())
def _aten_sqrt(x: Tensor) -> Tensor:
    """``torch.sqrt`` by ATen's kernel, opaque to inductor (the compiled integer LayerNorm's std)."""
    return torch.sqrt(x)


@_aten_sqrt.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def layernorm_sum_dtype(channels: int, max_step: float) -> torch.dtype:
    """The dtype in which :func:`int_layernorm_codes` sums ``x_q``: float32 while every partial sum
    (at most ``channels * 255 * max_step`` in magnitude) is an integer below 2**24, else float64."""
    return torch.float32 if channels * 255 * max_step < 2**24 else torch.float64


def linear_codes(x: Tensor) -> Tensor:
    """Flatten ``[..., K]`` to ``[M, K]`` contiguous for the GEMM."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def patches(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """``[B, C, H, W]`` → ``[B, H/p * W/p, C * ph * pw]``: the patch conv (stride = kernel) as a GEMM input.

    The order of the last dim is the conv weight's ``(C, kh, kw)``.
    """
    b, c, h, w = images.shape
    ph, pw = patch
    x = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def pad_codes(x: Tensor, pad: tuple[int, ...], zero_point: int) -> Tensor:
    """``F.pad`` of codes with the code of the value 0 (the simulation pads values with 0)."""
    if not any(pad):
        return x
    return F.pad(x, pad, value=zero_point)
