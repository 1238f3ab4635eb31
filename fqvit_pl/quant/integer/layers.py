"""Integer modules: thin wrappers holding int8 weights, scales and zero points as buffers.

Every module's state is plain tensors (persistent buffers); shapes follow from the constructor
arguments alone, so an empty model built from its description loads a state dict without the float
model. Derived state (oneDNN's packed weights, Python copies of per-tensor scalars) is rebuilt on
demand and after every ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.swin_transformer import get_relative_position_index
from torch import Tensor, nn

from .. import kernels as float_kernels
from ..bit_type import BitType
from . import kernels, native, native_ln

__all__ = ["IntPoint", "IntegerLinear", "IntegerLayerNorm", "IntegerAttention", "IntegerMlp"]


class IntPoint(nn.Module):
    """A quantization point's frozen parameters: ``scale`` (``[]`` or ``[C]``) and ``zero_point``.

    ``quantize(x)`` gives its ``uint8`` codes, ``dequantize(codes)`` their float values (§4).
    """

    def __init__(self, bit_type: BitType, channels: int | None = None) -> None:
        super().__init__()
        if bit_type.signed or bit_type.bits > 8:
            raise ValueError(
                f"an activation point must be unsigned and at most 8 bits, got {bit_type.name}"
            )
        self.bit_type = bit_type
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.py_scale = 1.0
        self.py_zero_point = 0
        self.py_max_step = 1.0

    def refresh(self) -> None:
        """Copy a per-tensor scale, the (shared) zero point and the largest PTF step
        ``max round(scale / min(scale))`` to Python numbers: oneDNN's calls take them, and the
        integer LayerNorm decides its sum dtype from them when the model is built, not in forward
        (a decision read from a tensor would break a ``torch.compile`` graph)."""
        self.py_scale = float(self.scale.reshape(-1)[0])
        self.py_zero_point = int(self.zero_point.reshape(-1)[0])
        self.py_max_step = float(torch.round(self.scale / self.scale.min()).max())

    @property
    def per_tensor(self) -> bool:
        return self.scale.dim() == 0

    def quantize(self, x: Tensor) -> Tensor:
        """Float ``[..., C]`` → ``uint8`` codes."""
        return kernels.quantize(x, self.scale, self.zero_point, self.bit_type)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes → float32 values ``(c - zp) * scale``."""
        return kernels.dequantize(codes, self.scale, self.zero_point)

    def fake_quantize(self, x: Tensor) -> Tensor:
        """``dequantize(quantize(x))``: the value this point gives ``x``."""
        return self.dequantize(self.quantize(x))

    def extra_repr(self) -> str:
        return f"{self.bit_type.name}, {'tensor' if self.per_tensor else 'channel'}"


class IntegerLinear(nn.Module):
    """A Linear on codes: int8 ``weight`` ``[out, in]``, float32 ``weight_scale`` ``[out]``, float ``bias``.

    ``forward(codes, in_point)`` → float32 ``[..., out]`` (``acc * s_x * s_w + bias``);
    ``codes_out(codes, in_point, out_point)`` → the next point's ``uint8`` codes (oneDNN requantizes
    inside the GEMM when the point is a per-tensor uint8 one). The bias stays float32 (added to the
    accumulator's value, as the simulation adds it): rounding it to the accumulator's scale would move
    values by up to ``s_x * s_w / 2`` and cross rounding boundaries of the next point.
    ``refresh()`` (which the integer model runs after conversion and every ``load_state_dict``)
    rebuilds the derived ``weight_column_sum`` after the weight changed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.backend = "onednn" if kernels.onednn_available() else "int_mm"
        self._packed: Tensor | None = None
        # derived: sum_k c_w per output channel (int32 [out]), for the int_mm zero-point term
        self.register_buffer(
            "weight_column_sum", torch.zeros(out_features, dtype=torch.int32), persistent=False
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_packed"] = None  # derived, never pickled or deep-copied
        return state

    def refresh(self) -> None:
        """Rebuild derived state (the weight's column sums; packed weights on demand) after the
        buffers changed."""
        self._packed = None
        self.weight_column_sum = self.weight.to(torch.int32).sum(dim=1)

    def _packed_weight(self) -> Tensor:
        if self._packed is None:
            self._packed = kernels.prepack_weight(self.weight)
        return self._packed

    def _correction(self, zero_point: int) -> Tensor:
        # computed in forward from a buffer: no Python cache that a compiled graph would guard on
        return (128 - zero_point) * self.weight_column_sum

    def forward(self, codes: Tensor, in_point: IntPoint) -> Tensor:
        lead = codes.shape[:-1]
        flat = kernels.linear_codes(codes)
        if self.backend == "onednn" and codes.device.type == "cpu":
            out = kernels.int8_linear(
                flat, in_point.py_scale, in_point.py_zero_point, self.weight,
                self.weight_scale, self.bias, packed=self._packed_weight(),
            )  # fmt: skip
        else:
            out = kernels.int8_linear(
                flat, in_point.py_scale, in_point.py_zero_point, self.weight, self.weight_scale,
                self.bias, zero_point_correction=self._correction(in_point.py_zero_point),
            )  # fmt: skip
        return out.reshape(*lead, self.out_features)

    def codes_out(self, codes: Tensor, in_point: IntPoint, out_point: IntPoint) -> Tensor:
        """The codes of ``out_point`` for this Linear's output (fused requantization where possible)."""
        fused = (
            self.backend == "onednn"
            and codes.device.type == "cpu"
            and out_point.per_tensor
            and out_point.bit_type.bits == 8
        )
        if not fused:
            return out_point.quantize(self(codes, in_point))
        lead = codes.shape[:-1]
        out = torch.ops.onednn.qlinear_pointwise(
            kernels.linear_codes(codes), in_point.py_scale, in_point.py_zero_point,
            self._packed_weight(), self.weight_scale,
            torch.zeros_like(self.weight_scale, dtype=torch.long), self.bias,
            out_point.py_scale, out_point.py_zero_point, torch.uint8, "none", [], "",
        )  # fmt: skip
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, int8"


class IntegerLayerNorm(nn.Module):
    """LayerNorm from the codes of its LN-input point to the codes of the point after it.

    ``integer``: §7 (:func:`kernels.int_layernorm_codes`, PTF on; on the CPU the fused kernels of
    :mod:`.native_ln` with the same codes, where they are built); otherwise the float LayerNorm on
    the dequantized input, as the simulation does with ptf off. ``weight``/``bias`` are gamma/beta.
    """

    def __init__(self, channels: int, eps: float, integer: bool) -> None:
        super().__init__()
        self.channels, self.eps, self.integer = channels, eps, integer
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))

    def forward(self, codes: Tensor, in_point: IntPoint, out_point: IntPoint) -> Tensor:
        if self.integer:
            args = (
                codes, in_point.zero_point, in_point.scale, self.weight, self.bias,
                out_point.scale, out_point.zero_point, out_point.bit_type,
            )  # fmt: skip
            if native_ln.layernorm_native(codes, in_point.py_max_step):
                return native_ln.int_layernorm_codes_native(*args)  # fused, the same codes
            return kernels.int_layernorm_codes(
                *args, sum_dtype=kernels.layernorm_sum_dtype(self.channels, in_point.py_max_step)
            )
        x = (
            in_point.dequantize(codes)
            if in_point.per_tensor
            else _dequantize_tiled(codes, in_point)
        )
        y = float_kernels.layer_norm(x, (self.channels,), self.weight, self.bias, self.eps)
        return out_point.quantize(y)

    def extra_repr(self) -> str:
        return f"{self.channels}, integer={self.integer}"


def _dequantize_tiled(codes: Tensor, point: IntPoint) -> Tensor:
    reps = codes.shape[-1] // point.scale.numel()
    return kernels.dequantize(codes, point.scale.repeat(reps), point.zero_point.repeat(reps))


class IntegerMlp(nn.Module):
    """``fc1`` (int8 GEMM, float out), GELU in float, ``act`` point, ``fc2`` → codes of ``fc2_point``."""

    def __init__(self, dim: int, hidden: int, act: BitType) -> None:
        super().__init__()
        self.fc1 = IntegerLinear(dim, hidden)
        self.act_point = IntPoint(act)
        self.fc2 = IntegerLinear(hidden, dim)
        self.fc2_point = IntPoint(act)

    def forward(self, codes: Tensor, in_point: IntPoint) -> Tensor:
        hidden = self.act_point.quantize(float_kernels.gelu(self.fc1(codes, in_point)))
        return self.fc2.codes_out(hidden, self.act_point, self.fc2_point)


class IntegerAttention(nn.Module):
    """Multi-head attention on codes (§6.5, §6.3 with ``window_area``: Swin's relative position bias).

    ``q @ k^T`` on the codes of ``qkv_point`` (exact: :func:`kernels.attention_scores`), the
    score point's codes, Log-Int-Softmax on them (``lis``) or float softmax and its uint8 point,
    ``attn @ V`` exact (see :meth:`forward`; :func:`kernels.attention_context`), ``context_point``
    codes, ``proj``. Both matmuls run AVX-512 kernels on the CPU where they are built
    (``native_matmul``), else float32 ``bmm``: the same bits.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        act: BitType,
        softmax: BitType,
        lis: bool,
        *,
        window_size: tuple[int, int] | None = None,
        tokens: int = 4096,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        if self.head_dim > 258:
            raise ValueError(f"head_dim {self.head_dim} > 258: q @ k^T would not be exact in fp32")
        self.scale = self.head_dim**-0.5
        self.lis = lis
        self.scale_query_first = window_size is not None  # Swin: (q * scale) @ k^T
        self.qkv = IntegerLinear(dim, 3 * dim, bias=qkv_bias)
        self.qkv_point = IntPoint(act)
        self.score_point = IntPoint(act)
        self.window_area = None
        self.tokens = (
            tokens  # the longest row Log-Int-Softmax sees (for the float64 exactness bound)
        )
        if window_size is not None:
            self.window_area = window_size[0] * window_size[1]
            rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
            self.register_buffer(
                "bias_table_codes", torch.zeros(rows, num_heads, dtype=torch.uint8)
            )
            self.bias_table_point = IntPoint(act)
            self.bias_point = IntPoint(act)
            self.register_buffer(
                "relative_position_index",
                get_relative_position_index(*window_size).reshape(-1),
                persistent=False,
            )
        #: whether q @ k^T and attn @ V run the AVX-512 kernels (``csrc/attnmm.cpp``) on CPU
        #: tensors: set by ``refresh_tables``; both paths give the same bits
        self.native_matmul = False
        if lis:
            self.softmax_bits = softmax.bits
            # Derived from the score point's scale and zero point (refresh_tables), not state.
            self.exact_lis = False
            self.register_buffer(
                "lis_exp_table",
                torch.zeros(kernels.MASKED_2D + 1, dtype=torch.float64),
                persistent=False,
            )
            self.register_buffer(
                "lis_prob_table", kernels.lis_prob_table(softmax.bits), persistent=False
            )
            self.exact_float64 = True
            #: whether forward runs the fused CPU kernel (``native_probabilities``) on CPU tensors:
            #: set by ``refresh_tables`` (False where ``native.native_ops()`` is None); both
            #: paths give the same bits
            self.native_lis = False
        else:
            self.softmax_point = IntPoint(softmax)
        self.context_point = IntPoint(act)
        self.proj = IntegerLinear(dim, dim)
        self.proj_point = IntPoint(act)

    def lis_point(self) -> IntPoint:
        """The point whose codes Log-Int-Softmax reads (Swin: after the bias)."""
        return self.bias_point if self.window_area is not None else self.score_point

    def refresh_tables(self) -> None:
        """Recompute the Log-Int-Softmax exponential table from the score scale, and its exactness
        flag; decide whether the native attention matmuls run."""
        # a Python flag, not a call in forward: torch.compile must not trace the build
        self.native_matmul = kernels.native_attention_matmul(self.head_dim)
        if self.lis:
            point = self.lis_point()
            if self.exact_lis:
                table = kernels.lis_exp_table(point.scale)
            else:
                table = kernels.lis_exp_table_2d(point.scale, point.zero_point)
            self.lis_exp_table = table.to(self.lis_prob_table.device)
            tokens = self.window_area or self.tokens
            self.exact_float64 = float(self.lis_exp_table.max()) * tokens < 2.0**52
            # a Python flag, not a call in forward: torch.compile must not trace the build
            self.native_lis = native.native_available()

    def relative_bias(self) -> Tensor:
        """Swin's quantized bias table gathered to ``[1, heads, N, N]`` (float values)."""
        table = self.bias_table_point.dequantize(self.bias_table_codes)
        bias = table[self.relative_position_index].reshape(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, codes: Tensor, in_point: IntPoint, mask: Tensor | None = None) -> Tensor:
        """``[B, N, dim]`` codes of ``in_point`` → ``[B, N, dim]`` codes of ``proj_point``.

        ``mask``: Swin's shift mask ``[windows, N, N]`` (0 / -100, added after the bias point).

        ``attn @ V`` is exact in fp32 with Log-Int-Softmax: each probability is 0 or ``2**-r``,
        ``0 <= r <= 15`` (4-bit), and ``c_v - zp_v`` is an integer of magnitude at most 255, so every
        term and partial sum is a multiple of ``2**-15``. The log rounding gives ``p <= 1.5 e / S``
        for every score (``y = round(S / e)``; ``p = 2**-f <= 1.5 / y`` when ``y < 1.5 * 2**f``,
        ``p = 2**-(f+1) < 1 / y`` otherwise, and ``p * (S / e) <= 1.5`` over the rounding), so a row
        sums to ``sum p <= 1.5`` and every partial sum is below ``1.5 * 255 = 382.5 < 2**9`` in
        magnitude: 9 + 15 = 24 bits, exact in float32 in any summation order. (The converter refuses
        softmax grids wider than 4 bits.) Without lis, ``(c_p - zp_p) @ (c_v - zp_v)`` holds integers
        below ``N * 255**2 < 2**24`` for ``N <= 258`` tokens.
        """
        qkv = self.qkv.codes_out(codes, in_point, self.qkv_point)
        if self.lis and self.native_lis and qkv.device.type == "cpu":
            probs = self.native_probabilities(self.accumulator(qkv), mask)
            context = self.attend(probs, qkv) * self.qkv_point.scale
        else:
            context = self.context(self.scores(qkv), qkv, mask)
        return self.proj.codes_out(
            self.context_point.quantize(context), self.context_point, self.proj_point
        )

    def scores(self, qkv: Tensor) -> Tensor:
        """qkv codes ``[B, N, 3 * dim]`` → score codes ``[B, heads, N, N]`` of :meth:`lis_point`
        as integer-valued float32."""
        acc = self.accumulator(qkv)
        # codes as integer-valued float32: LIS and the bias read them as numbers (no uint8 round trip)
        point = self.score_point
        scores = kernels.quantize_float(
            acc.mul_(self.score_step()), point.scale, point.zero_point, point.bit_type
        )
        if self.window_area is not None:
            value = self.score_point.dequantize(scores).add_(self.relative_bias())
            point = self.bias_point
            scores = kernels.quantize_float(value, point.scale, point.zero_point, point.bit_type)
        return scores

    def accumulator(self, qkv: Tensor) -> Tensor:
        """qkv codes ``[B, N, 3 * dim]`` → ``q @ k^T`` on the codes minus their zero point
        ``[B, heads, N, N]`` (exact integers in float32, :func:`kernels.attention_scores`)."""
        return kernels.attention_scores(
            qkv, self.num_heads, self.qkv_point.py_zero_point, native=self._native(qkv)
        )

    def score_step(self) -> Tensor:
        """The value of one unit of the ``q @ k^T`` accumulator (float32 ``[]``)."""
        s = self.qkv_point.scale
        return (s * self.scale) * s if self.scale_query_first else (s * s) * self.scale

    def native_probabilities(self, acc: Tensor, mask: Tensor | None = None) -> Tensor:
        """The Log-Int-Softmax probabilities ``2**-r`` (float32 ``[B, heads, N, N]``) from the
        ``q @ k^T`` accumulator by the fused CPU kernel (``csrc/lis.cpp``): the score codes, Swin's
        bias point and ``mask`` and :func:`kernels.log_int_softmax_codes` in one pass per row, bit
        for bit :meth:`scores` followed by :meth:`context`'s Log-Int-Softmax."""
        point = self.score_point
        if self.window_area is None:
            bias = bias_scale = bias_zero_point = None
            bias_type = point.bit_type
        else:
            bias = self.relative_bias()[0]
            bias_scale, bias_zero_point = self.bias_point.scale, self.bias_point.zero_point
            bias_type = self.bias_point.bit_type
        return torch.ops.fqvit_native.lis_softmax(
            acc, self.score_step(), point.scale, point.zero_point,
            point.bit_type.lower, point.bit_type.upper, bias, bias_scale, bias_zero_point,
            bias_type.lower, bias_type.upper, mask, self.lis_exp_table, self.softmax_bits,
            self.exact_float64,
        )  # fmt: skip

    def _native(self, qkv: Tensor) -> bool:
        return self.native_matmul and qkv.device.type == "cpu"

    def context(self, scores: Tensor, qkv: Tensor, mask: Tensor | None = None) -> Tensor:
        """Softmax of the score codes, ``@ V`` (V's codes read from the qkv codes ``[B, N, 3 * dim]``),
        merged heads: the float32 values ``[B, N, dim]`` that ``context_point`` quantizes."""
        batch, _, tokens, _ = scores.shape
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(-1, windows, self.num_heads, tokens, tokens)
            mask = mask[None, :, None]
        if self.lis:
            probs = kernels.log_int_softmax_codes(
                scores, self.lis_exp_table, self.lis_prob_table,
                None if mask is None else mask != 0, exact_float64=self.exact_float64,
                softmax_bits=self.softmax_bits,
            )  # fmt: skip
            probs = probs.view(batch, self.num_heads, tokens, tokens)
            return self.attend(probs, qkv) * self.qkv_point.scale
        value = self.lis_point().dequantize(scores)
        if mask is not None:
            value = value + mask
        value = value.view(batch, self.num_heads, tokens, tokens)
        p = self.softmax_point.quantize(float_kernels.softmax(value, -1))
        p = p.to(torch.float32) - self.softmax_point.zero_point
        return self.attend(p, qkv) * (self.softmax_point.scale * self.qkv_point.scale)

    def attend(self, probs: Tensor, qkv: Tensor) -> Tensor:
        """``probs`` ``[B, heads, N, N]`` ``@ (c_v - zp)``, merged heads: float32 ``[B, N, dim]``
        (exact, :func:`kernels.attention_context`)."""
        return kernels.attention_context(
            probs, qkv, self.num_heads, self.qkv_point.py_zero_point, native=self._native(qkv)
        )
