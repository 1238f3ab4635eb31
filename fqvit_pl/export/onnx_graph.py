"""``export_onnx``: the integer model as a standard ONNX graph that ONNX Runtime runs on int8 kernels.

Codes travel as ``uint8`` tensors with the points' zero points (``DequantizeLinear`` reads them).
Weights are int8 (``gemm="u8s8"``: uint8 x int8 GEMMs, exact with VNNI) or ``w + 128`` as uint8
with zero point 128 (``gemm="u8u8"``: exact on every x86 CPU, slower).

Two forms. ``exact=True`` (default) computes the integer model's arithmetic operation for operation:

- Linear / patch conv: ``MatMulInteger`` (int32 accumulator), then ``acc * (s_x * s_w) + bias``
  in float32 and the next point's ``QuantizeLinear`` (docs/method.md §12).
- ``q @ k^T`` and (without LIS) ``attn @ V``: ``MatMulInteger`` on the codes, zero points as its
  inputs; the score codes by one float32 multiplier where it is proven, for every accumulator the
  GEMM can produce, to round as the integer model's ``acc * step / s`` (else the same ops). With
  LIS, ``attn @ V`` multiplies the probabilities ``2**-r`` by ``c_v - zp_v`` in float32, exact
  (the proof in :class:`fqvit_pl.quant.integer.IntegerAttention`).
- Log-Int-Softmax (§8): the integer model's own exponential and probability tables, read by
  ``GatherElements`` (~1-2 elementwise passes in ONNX Runtime; ``Gather`` costs ~50) at the
  kernel's int32 indices; the row sum and ``round(S / e)`` in float64 where ``max(e) * N < 2**52``
  (rounding by ``+ 2**52 - 2**52``; else int64, as the integer model), giving ``2**(15 - r)`` for
  ``attn @ V`` in float32 (exact, ``2**-15 s_v`` folded into its scale).
- PTF LayerNorm (§7): ``x_q`` in float32 (integers below 2**12), the row sum and the sum of squares
  exact (float32 below 2**24, else float64), the per-token multiplier and offset by the contract's
  float32 formula (``2**-N`` as Rump's unit in the first place of ``|A|``: three float32
  operations, no ``Log``/``Pow``), and ``round((M x_q + B) / 2**N)`` in float32 where a bound on
  ``N`` from the gains and scales proves it exact (``N <= 15``; ``N <= 23`` with ``B`` split at
  an even integer), else in float64; ``QuantizeLinear`` (scale 1) rounds, adds the zero point and
  clamps.
- GELU, the residual additions, the Swin pooling and the logits in float, as in the integer model.

``exact=False`` is the fast form: QDQ patterns ONNX Runtime fuses (``QGemm`` with the int32 bias,
``QLinearMatMul`` for ``q @ k^T``), one ``QuantizeLinear`` per per-tensor point, float32
``LayerNormalization`` on the dequantized PTF codes, and LIS as ``2**-r`` with
``r = floor(log2(4 / (3 p)))`` from ``LogSoftmax``; per-axis Quantize/DequantizeLinear are avoided
(ONNX Runtime runs them as slow scalar loops).

Only standard ONNX operators (opset 17): no custom op is needed to run the graph.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .artifact import _data_config, _unwrap, as_integer_model

__all__ = ["export_onnx", "OnnxExportError", "OPSET"]

#: The ONNX opset of the exported graphs (LayerNormalization needs 17).
OPSET = 17


#: The parts computed in their fast form by ``export_onnx(exact=False)``.
_FAST_PARTS = ("quantize", "linear", "layernorm", "scores", "softmax")


class OnnxExportError(ValueError):
    """An integer model (or one of its layers) that ``export_onnx`` cannot express; names it."""


def _np(t: Tensor | float | int, dtype: Any = None) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return a.astype(dtype) if dtype is not None else a


def _reference_codes(x: Tensor, point: nn.Module) -> Tensor:
    """The integer model's codes of ``x`` at ``point`` as float32 (:func:`kernels.quantize_float`)."""
    from ..quant.integer import kernels

    return kernels.quantize_float(x, point.scale.reshape(()), point.zero_point.reshape(()),
                                  point.bit_type)  # fmt: skip


def _transitions(f: Callable[[Tensor], Tensor], lo: int, hi: int, bit_type: Any) -> Tensor:
    """For a nondecreasing code function ``f`` on the integers ``lo..hi``: ``lo``, ``hi`` and, for
    every code ``k`` of ``bit_type``, ``t_k - 1`` and ``t_k`` where ``t_k`` is the first integer
    with ``f >= k`` (bisection, all codes at once): int64, within ``lo..hi``."""
    k = torch.arange(bit_type.lower + 1, bit_type.upper + 1, dtype=torch.float32)
    left = torch.full(k.shape, lo, dtype=torch.int64)
    right = torch.full(k.shape, hi + 1, dtype=torch.int64)
    while bool((left < right).any()):
        mid = (left + right) // 2
        reached = f(mid.clamp(max=hi)) >= k
        right = torch.where(reached & (left < right), mid, right)
        left = torch.where(~reached & (left < right), mid + 1, left)
    points = torch.cat([torch.tensor([lo, hi]), left, left - 1])
    return torch.unique(points.clamp(lo, hi))


def _product_codes(x: Tensor, m: Tensor, point: nn.Module) -> Tensor:
    """``clamp(round(fl(fl(x * m) + zp)))`` in float32 (round half to even): what
    :meth:`_Exporter._quantize_by_product` computes in ONNX Runtime."""
    bt = point.bit_type
    zp = point.zero_point.reshape(()).to(torch.float32)
    return (x * m).add_(zp).round_().clamp_(bt.lower, bt.upper)


class _Graph:
    """A tiny ONNX graph builder: unique names, constants as initializers, one call per node."""

    def __init__(self) -> None:
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = None) -> str:
        array = np.array(_np(value, dtype) if dtype is not None else _np(value), order="C")
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    # -- small compositions ------------------------------------------------------------------

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", [x, self.const(np.array(shape, np.int64), "shape")])

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        i64 = np.int64
        return self.op(
            "Slice",
            [x, self.const(np.array([start], i64)), self.const(np.array([end], i64)),
             self.const(np.array([axis], i64))],
        )  # fmt: skip


class _Exporter:
    """Walks an :class:`IntegerViT` / :class:`IntegerSwin` and emits the ONNX nodes of each layer."""

    def __init__(self, model: nn.Module, exact: bool = True, gemm: str = "u8s8") -> None:
        from onnx import TensorProto

        self.model = model
        self.g = _Graph()
        self.T = TensorProto
        self.exact = exact
        self.gemm = gemm
        self.fast = set() if exact else set(_FAST_PARTS)
        self._tables: dict[tuple, str] = {}  # GatherElements data by content

    # -- points --------------------------------------------------------------------------------

    def _point_consts(self, point: nn.Module, channels: int | None = None) -> tuple[str, str, dict]:
        bt = point.bit_type
        if bt.signed or bt.bits > 8:
            raise OnnxExportError(
                f"export_onnx: point of type {bt.name} is not an unsigned <=8-bit grid"
            )
        scale = point.scale.detach().to(torch.float32)
        zp = point.zero_point.detach()
        if scale.dim() == 0:
            return self.g.const(scale, "scale"), self.g.const(zp, "zp", np.uint8), {}
        if channels is not None and scale.numel() != channels:  # Swin's patch merging: tiled scales
            reps = channels // scale.numel()
            scale, zp = scale.repeat(reps), zp.repeat(reps)
        return (
            self.g.const(scale, "scale"),
            self.g.const(zp, "zp", np.uint8),
            {"axis": -1},
        )

    def quantize(self, x: str, point: nn.Module) -> str:
        """Float → the point's uint8 codes: ``clamp(round(x / s + zp))`` as §4.

        ``QuantizeLinear`` computes ``round(x / s) + zp``, which differs from the simulation's
        ``round(x / s + zp)`` where the float32 addition rounds across a half; so the division and
        addition are explicit, and ``QuantizeLinear`` (scale 1, zero point 0) rounds and saturates.
        """
        g = self.g
        bt = point.bit_type
        if bt.signed or bt.bits > 8:
            raise OnnxExportError(
                f"export_onnx: point of type {bt.name} is not an unsigned <=8-bit grid"
            )
        if "quantize" in self.fast and point.scale.dim() == 0:
            # one QuantizeLinear: round(x / s) + zp (a half step apart from the contract, rarely);
            # per-channel (PTF) points keep the explicit division: ONNX Runtime's per-axis
            # QuantizeLinear is a slow scalar loop
            s, z = point.scale.detach().to(torch.float32), point.zero_point.detach()
            if bt.bits < 8:  # a narrower unsigned grid: clamp x to its codes' range first
                x = g.op("Clip", [x, g.const((bt.lower - z.float()) * s),
                                  g.const((bt.upper - z.float()) * s)])  # fmt: skip
            return g.op("QuantizeLinear", [x, g.const(s, "scale"), g.const(z, "zp", np.uint8)])
        scale = g.const(point.scale.detach().to(torch.float32), "scale")
        zp = g.const(point.zero_point.detach().to(torch.float32), "zp")
        y = g.op("Add", [g.op("Div", [x, scale]), zp])  # QuantizeLinear rounds half to even
        if bt.bits < 8:  # a narrower unsigned grid: clamp to its codes
            y = g.op(
                "Clip",
                [
                    y,
                    g.const(np.array(bt.lower, np.float32)),
                    g.const(np.array(bt.upper, np.float32)),
                ],
            )
        one, zero = g.const(np.array(1.0, np.float32)), g.const(np.array(0, np.uint8))
        return g.op("QuantizeLinear", [y, one, zero], "codes")

    def dequantize(self, codes: str, point: nn.Module, channels: int | None = None) -> str:
        scale, zp, attrs = self._point_consts(point, channels)
        if attrs:  # the same float32 (c - zp) * s; ONNX Runtime's per-axis DequantizeLinear is slow
            g = self.g
            zp_value = g.const(np.array(int(point.zero_point.reshape(-1)[0]), np.uint8))
            one = g.const(np.array(1.0, np.float32))
            return g.op("Mul", [g.op("DequantizeLinear", [codes, one, zp_value]), scale])
        return self.g.op("DequantizeLinear", [codes, scale, zp], "value", **attrs)

    def fake_quantize(self, x: str, point: nn.Module) -> str:
        return self.dequantize(self.quantize(x, point), point)

    def _zp8(self, point: nn.Module) -> str:
        if point.scale.dim() != 0:
            raise OnnxExportError("export_onnx: a GEMM input point must be per tensor")
        return self.g.const(np.array(int(point.zero_point), np.uint8), "zp")

    # -- layers --------------------------------------------------------------------------------

    def _weight(self, layer: nn.Module, transpose: bool) -> tuple[str, str]:
        """The int8 weight as ``gemm`` wants it (``[in, out]`` if ``transpose``) and its zero point.

        ``u8s8``: int8 weights, zero point 0. ``u8u8``: ``w + 128`` as uint8, zero point 128.
        """
        g = self.g
        weight = layer.weight.detach()
        weight = weight.t() if transpose else weight
        if self.gemm == "u8u8":
            weight = (weight.to(torch.int16) + 128).to(torch.uint8)
            return g.const(weight.contiguous(), "weight"), g.const(np.array(128, np.uint8), "wzp")
        return g.const(weight.to(torch.int8).contiguous(), "weight"), g.const(
            np.array(0, np.int8), "wzp"
        )

    def linear(
        self, codes: str, in_point: nn.Module, layer: nn.Module, out_point: nn.Module | None = None
    ) -> str:
        """The codes of ``in_point`` through ``layer``: float32, or codes of ``out_point`` if given.

        Exact: ``MatMulInteger`` → int32 → ``acc * (s_x * s_w) + bias`` (float32) → quantize.
        Fast: ``DequantizeLinear`` → ``Gemm`` (2-D) with DQ'd int8 weights and int32 bias
        → ``QuantizeLinear``, which ONNX Runtime fuses into one ``QGemm`` (int32 accumulator,
        requantization in the kernel).
        """
        g = self.g
        if "linear" not in self.fast:
            weight, w_zp = self._weight(layer, transpose=True)
            acc = g.op("MatMulInteger", [codes, weight, self._zp8(in_point), w_zp], "acc")
            multiplier = g.const(
                layer.weight_scale.detach() * in_point.scale.detach(), "multiplier"
            )
            out = g.op("Mul", [g.cast(acc, self.T.FLOAT), multiplier])
            if layer.bias is not None:
                out = g.op("Add", [out, g.const(layer.bias.detach(), "bias")])
            return out if out_point is None else self.quantize(out, out_point)
        in_features, out_features = layer.weight.shape[1], layer.weight.shape[0]
        x = self.dequantize(g.reshape(codes, [-1, in_features]), in_point)
        weight, w_zp = self._weight(layer, transpose=False)
        w_scale = layer.weight_scale.detach().to(torch.float32).reshape(-1)
        if w_scale.numel() == 1:
            w_scale = w_scale.expand(out_features)
        w_zp = g.const(np.full(out_features, 128 if self.gemm == "u8u8" else 0,
                               np.uint8 if self.gemm == "u8u8" else np.int8))  # fmt: skip
        w = g.op("DequantizeLinear", [weight, g.const(w_scale.contiguous()), w_zp], axis=0)
        inputs = [x, w]
        if layer.bias is not None:  # int32 bias on the accumulator's grid (QGemm's contract)
            bias_scale = (w_scale * in_point.scale.detach().to(torch.float32)).contiguous()
            bias = torch.round(layer.bias.detach().to(torch.float64) / bias_scale.double())
            if bool((bias.abs() < 2**31 - 1).all()) and bool((bias_scale > 0).all()):
                inputs.append(
                    g.op("DequantizeLinear", [g.const(bias.to(torch.int32), "bias"),
                         g.const(bias_scale, "bias_scale"),
                         g.const(np.zeros(out_features, np.int32))], axis=0)
                )  # fmt: skip
        out = g.op("Gemm", inputs, transB=1)
        if len(inputs) == 2 and layer.bias is not None:
            out = g.op("Add", [out, g.const(layer.bias.detach(), "bias")])
        if out_point is not None:
            out = self.quantize(out, out_point)
        shape = g.op(
            "Concat",
            [
                g.slice(g.op("Shape", [codes]), 0, -1, 0),
                g.const(np.array([out_features], np.int64)),
            ],
            axis=0,
        )
        return g.op("Reshape", [out, shape])

    def codes_out(
        self, codes: str, in_point: nn.Module, layer: nn.Module, out_point: nn.Module
    ) -> str:
        return self.linear(codes, in_point, layer, out_point)

    def layer_norm(
        self, codes: str, norm: nn.Module, in_point: nn.Module, out_point: nn.Module
    ) -> str:
        """LayerNorm from the codes of ``in_point`` to the codes of ``out_point`` (§7 with PTF)."""
        g, T = self.g, self.T
        channels = norm.channels
        if (
            not norm.integer or "layernorm" in self.fast
        ):  # fast: float LayerNorm on the dequantized codes
            x = self.dequantize(codes, in_point, channels)
            y = g.op(
                "LayerNormalization",
                [x, g.const(norm.weight.detach()), g.const(norm.bias.detach())],
                axis=-1, epsilon=float(norm.eps),
            )  # fmt: skip
            return self.quantize(y, out_point)
        in_scale = in_point.scale.detach().reshape(-1).to(torch.float32)
        if in_scale.numel() not in (1, channels):
            in_scale = in_scale.repeat(channels // in_scale.numel())
        s_min = in_scale.min()
        k = torch.round(in_scale / s_min)
        zp = int(in_point.zero_point.reshape(-1)[0])
        f32 = np.float32
        # x_q = (c - zp) * k: integers of magnitude <= 255 * max(k) < 2**12, exact in float32
        x_q = g.op("DequantizeLinear", [codes, g.const(np.array(1.0, f32)),
                                        g.const(np.array(zp, np.uint8))])  # fmt: skip
        if bool((k != 1).any()):
            x_q = g.op("Mul", [x_q, g.const(k if k.numel() > 1 else k.reshape(()), "ptf")])
        bound = 255 * float(k.max())
        axes = g.const(np.array([-1], np.int64))
        # the row sum and sum of squares are exact: float32 below 2**24, else float64 (< 2**53)
        if channels * bound < 2**24:
            total_f = g.op("ReduceSum", [x_q, axes], keepdims=1)
        else:
            total_f = g.cast(g.op("ReduceSum", [g.cast(x_q, T.DOUBLE), axes], keepdims=1), T.FLOAT)
        if channels * bound**2 < 2**24:
            squares_f = g.op("ReduceSumSquare", [x_q], axes=[-1], keepdims=1)
        else:
            squares_f = g.cast(
                g.op("ReduceSumSquare", [g.cast(x_q, T.DOUBLE)], axes=[-1], keepdims=1), T.FLOAT
            )
        # The contract's float32 formula, operation for operation (kernels.int_layernorm_codes).
        mean = g.op(
            "Mul", [g.op("Div", [total_f, g.const(np.array(channels, f32))]), g.const(s_min)]
        )
        variance = g.op(
            "Sub",
            [g.op("Mul", [g.const(np.array(channels, f32)), squares_f]), g.op("Mul", [total_f, total_f])],
        )  # fmt: skip
        std = g.op("Mul", [g.const(s_min / channels), g.op("Sqrt", [variance])])
        weight, bias = g.const(norm.weight.detach()), g.const(norm.bias.detach())
        out_scale = g.const(out_point.scale.detach().to(torch.float32))
        a = g.op("Div", [g.op("Mul", [g.op("Div", [g.const(s_min), std]), weight]), out_scale])
        bits = 7  # the multiplier's precision (kernels.int_layernorm_codes)
        inv_p = self._ptf_power(a, bits)  # 2**-N
        # sign(a) * clamp(floor(|a| p), 0, 255) = trunc(clamp(a p, -255, 255)); Cast truncates.
        # a / 2**-N = a * 2**N exactly (a power of two; the clamp makes an overflow harmless)
        limit = float(2 ** (bits + 1) - 1)
        signed_m = g.op("Clip", [g.op("Div", [a, inv_p]), g.const(np.array(-limit, f32)),
                                 g.const(np.array(limit, f32))])  # fmt: skip
        signed_m = g.cast(g.cast(signed_m, T.INT32), T.FLOAT)
        offset = g.op("Sub", [bias, g.op("Mul", [g.op("Div", [mean, std]), weight])])
        # O = offset / s_out; B = round(O * 2**N) = round(O / 2**-N) (the same exact product)
        o_scaled = g.op("Div", [offset, out_scale])
        m_x = g.op("Mul", [signed_m, x_q])  # |M x_q| <= 255 * 255 * 16 < 2**20: exact
        form = self._ln_sum_form(norm, in_scale, s_min, zp, out_point, bits)
        if form == "float32":
            # step 5 in float32 (N <= 15, proof in _ln_sum_form): (M x_q + B) * 2**-N, rounded
            # by QuantizeLinear below
            b = g.op("Round", [g.op("Div", [o_scaled, inv_p])])
            y = g.op("Mul", [g.op("Add", [m_x, b]), inv_p])
        elif form == "float32_split":
            # step 5 in float32 (N <= 23, proof in _ln_sum_form): O = E + o with E even
            o_clipped = g.op("Clip", [o_scaled, g.const(np.array(-(2.0**22), f32)),
                                      g.const(np.array(2.0**22, f32))])  # fmt: skip
            magic = g.const(np.array(1.5 * 2.0**24, f32))
            even = g.op("Sub", [g.op("Add", [o_clipped, magic]), magic])
            b = g.op("Round", [g.op("Div", [g.op("Sub", [o_clipped, even]), inv_p])])
            y = g.op("Round", [g.op("Mul", [g.op("Add", [m_x, b]), inv_p])])
            y = g.op("Add", [y, even])
        else:
            # step 5 in float64: |M x_q + B| < 2**53 exact (kernels.int_layernorm_codes), times
            # 2**-N exact, rounded half to even; the rounded codes back in float32 (integers,
            # exact below 2**24, and a larger |y| saturates the same way after rounding)
            b = g.op("Round", [g.op("Div", [o_scaled, inv_p])])
            y = g.op("Add", [g.cast(m_x, T.DOUBLE), g.cast(b, T.DOUBLE)])
            y = g.cast(g.op("Round", [g.op("Mul", [y, g.cast(inv_p, T.DOUBLE)])]), T.FLOAT)
        # QuantizeLinear (scale 1) rounds half to even (the float32 path's step-5 rounding; exact
        # on the float64 path's integers), adds the zero point and saturates to 0..255; a
        # narrower grid clamps y to its codes first: round(clip(y, lo - zp, hi - zp)) =
        # clip(round(y), lo - zp, hi - zp) for integer bounds, so the order does not matter
        bt = out_point.bit_type
        zp_out = int(out_point.zero_point.reshape(-1)[0])
        if bt.bits < 8:
            y = g.op("Clip", [y, g.const(np.array(bt.lower - zp_out, f32)),
                              g.const(np.array(bt.upper - zp_out, f32))])  # fmt: skip
        return g.op("QuantizeLinear", [y, g.const(np.array(1.0, f32)),
                                       g.const(np.array(zp_out, np.uint8))])  # fmt: skip

    @staticmethod
    def _ln_sum_form(
        norm: nn.Module, in_scale: Tensor, s_min: Tensor, zp: int, out_point: nn.Module, bits: int
    ) -> str:
        """How step 5, ``round((M x_q + B) / 2**N)``, is exact for every input: ``"float32"``,
        ``"float32_split"`` or ``"float64"``, from the largest ``N`` the layer can reach.

        ``|M x_q| < 2**20`` (``M <= 255``, ``|x_q| <= 255 * 16``) and ``B`` (a float32 integer)
        are exact; ``M = 0`` where ``gamma = 0``. The bound on ``N``: whatever the codes,
        ``std <= s_min * X * (1 + 2**-24)**4`` with ``X = max_c k_c * max(zp, 255 - zp) = max |x_q|``
        (``var <= C * sum x_q**2 <= C**2 X**2``; each of ``sum x_q**2``, ``C *``, ``sqrt`` and
        ``s_min / C *`` rounds up by at most a relative 2**-24), so three more roundings give
        ``|A| >= L = min_{gamma != 0} |gamma| / (max s_out * X) * (1 - 2**-16)`` (or ``A = +-inf``
        where ``std = 0``: ``N = 0``; or NaN, which stays NaN on every path), and
        ``N <= 7 - floor(log2 L)``.

        - ``N <= 15``, ``"float32"``: ``M x_q + B`` is exact below 2**24; at or above it, the
          rounded sum is on the same side of ``+-2**24`` (a float32), so exact and rounded
          quotients are both at least ``2**(24 - N) >= 2**9`` in magnitude with the same sign:
          both saturate (``|y| >= 512`` puts ``y + zp`` outside 0..255).
        - ``N <= 23``, ``"float32_split"``: ``O = offset / s_out`` clipped to ``+-2**22`` (beyond,
          ``|y| > 2**21`` saturates either way; NaN stays NaN), ``E`` its nearest even integer
          (``O + 1.5 * 2**24`` rounds to a multiple of 2, the subtraction is exact) and
          ``o = O - E`` in ``[-1, 1]`` (exact). ``E 2**N`` is an even integer, so
          ``B = E 2**N + round(o 2**N)`` and ``round((M x_q + B) / 2**N) = E + round(z / 2**N)``
          (an even shift keeps half-to-even ties) with ``z = M x_q + round(o 2**N)``,
          ``|z| < 2**20 + 2**23``: exact, and so are ``z * 2**-N``, its rounding and ``+ E``.
        - else ``"float64"``: ``|M x_q + B| < 2**53``.
        """
        k = torch.round(in_scale.double() / float(s_min))
        x_max = float((k * max(zp, 255 - zp)).max())
        gamma = norm.weight.detach().double().abs()
        gamma = gamma[gamma > 0]
        if gamma.numel() == 0:
            return "float32"
        s_out = float(out_point.scale.detach().double().reshape(-1).max())
        lower = float(gamma.min()) / (s_out * x_max) * (1 - 2.0**-16)
        n_max = min(max(bits - (math.frexp(lower)[1] - 1), 0), 31)  # floor(log2 L) by frexp
        return "float32" if n_max <= 15 else "float32_split" if n_max <= 23 else "float64"

    def _ptf_power(self, a: str, bits: int) -> str:
        """``2 ** -clamp(bits - floor(log2 |a|), 0, 31)`` (= ``1 / 2**N``) for float32 ``a``, exact.

        ``|a|`` clamped to ``[2**(bits-31), 2**(bits+1))`` (the largest float32 below
        ``2**(bits+1)``) leaves the clamped exponent unchanged (zero and subnormals to ``N = 31``,
        infinity to ``N = 0``). Of that ``x``, the unit in the first place ``2**floor(log2 x)`` is
        ``q - (1 - 2**-24) q`` with ``q = (2**23 + 1) x`` (S. M. Rump's ufp formula for a binary
        format with ``eps = 2**-23``: the two products round ``x``'s trailing bits the same way
        and leave only its leading one); ``2**23 + 1`` is scaled by ``2**-bits`` (exact, no
        underflow for ``x >= 2**-24``), which scales every rounded result by the same power of
        two. Three float32 operations; checked in NumPy on every float32 of the clamped range
        (2**28 values, all equal) and in ONNX Runtime on three whole binades and the edges
        (tests/export/test_onnx_decompositions.py).
        """
        g, f32 = self.g, np.float32
        top = np.nextafter(f32(2.0 ** (bits + 1)), f32(0))
        x = g.op("Clip", [g.op("Abs", [a]), g.const(np.array(2.0 ** (bits - 31), f32)),
                          g.const(np.array(top, f32))])  # fmt: skip
        q = g.op("Mul", [x, g.const(np.array((2.0**23 + 1) * 2.0**-bits, f32))])
        return g.op("Sub", [q, g.op("Mul", [q, g.const(np.array(1 - 2.0**-24, f32))])])

    def gelu(self, x: str) -> str:
        """Exact (erf) GELU in the pattern ONNX Runtime fuses into one ``Gelu`` kernel (the exported
        test models give the same logits, bit for bit, as with ``x * sqrt(0.5)`` unfused)."""
        g, f32 = self.g, np.float32
        erf = g.op("Erf", [g.op("Div", [x, g.const(np.array(math.sqrt(2.0), f32))])])
        y = g.op("Mul", [x, g.op("Add", [erf, g.const(np.array(1.0, f32))])])
        return g.op("Mul", [y, g.const(np.array(0.5, f32))])

    def residual(
        self, x: str, x_point: nn.Module, branch: str, branch_point: nn.Module, out: nn.Module
    ) -> str:
        total = self.g.op(
            "Add", [self.dequantize(x, x_point), self.dequantize(branch, branch_point)]
        )
        return self.quantize(total, out)

    def mlp(self, codes: str, mlp: nn.Module, in_point: nn.Module) -> str:
        hidden = self.quantize(self.gelu(self.linear(codes, in_point, mlp.fc1)), mlp.act_point)
        return self.codes_out(hidden, mlp.act_point, mlp.fc2, mlp.fc2_point)

    def log_int_softmax(
        self, scores: str, attn: nn.Module, mask: np.ndarray | None, tokens: int
    ) -> str:
        """§8 on the uint8 score codes ``[..., N]`` → ``2**(L-1) * p`` as float32 (``L = 2**bits``).

        Bit for bit :func:`kernels.log_int_softmax_codes`: the integer model's own tables, read by
        ``GatherElements`` (one gather ~1-2 elementwise passes in ONNX Runtime; ``Gather``, which
        copies element by element, costs ~50), and arithmetic that is exact:

        1. the exponential ``e = attn.lis_exp_table[index]`` with the kernel's index, in int32:
           ``256 * max(c) + c`` (the simulation's ``[65537]`` table; stored as its lower triangle
           ``c <= max(c)``, the only pairs that occur, at ``m (m + 1) / 2 + c``) or ``max(c) - c``
           (the exact ``[257]`` one), ``max`` over the row's unmasked codes. A masked pair (Swin) is offset
           below every code before the row maximum and then indexes a block of the table filled
           with the saturated entry (:data:`kernels.MASKED`), as the kernel's ``masked_fill``.
           The entries are float32 integers (:func:`kernels.lis_exp_table`; checked), so the
           float32 table loses nothing;
        2. ``y = min(round(S / e), 2**L)`` (half to even) in float64 where the integer model
           divides in float64 (``max(e) * tokens < 2**52``): :meth:`_lis_quotient_float64`, exact.
           Only ``y`` up to ``2**L`` matters: every ``y >= 0.75 * 2**L`` gives ``r >= L``,
           probability 0;
        3. the log rounding: ``ptable[y] = 2**(L-1) * lis_prob_table[key(y)]`` for every
           ``y = 0..2**L``, built at export with the kernel's own key (``_log_round``) and table,
           read by ``GatherElements`` (``y`` cast to int32, exact).

        Where the integer model divides in int64 (row sums past 2**52), ``y`` comes from
        :meth:`_lis_quotient_int64` (its own proof), then step 3.
        """
        from ..quant.integer import kernels

        g, T, i32 = self.g, self.T, np.int32
        table = attn.lis_exp_table.detach().cpu().to(torch.float64)
        if not torch.equal(table.to(torch.float32).to(torch.float64), table):
            raise OnnxExportError(
                "export_onnx: a Log-Int-Softmax exponential table holds values that are not float32"
            )
        table = table.to(torch.float32)
        saturated = float(table[-1])
        if table.numel() == kernels.MASKED_2D + 1:  # the simulation's table, (max c, c) pairs
            # its lower triangle (c <= max c: the only pairs that occur) row after row: entry
            # m (m + 1) / 2 + c is the kernel's 256 m + c
            entries = torch.cat([table[256 * m : 256 * m + m + 1] for m in range(256)])
            codes = g.cast(scores, T.INT32)
            if mask is None:
                row_max = g.cast(g.op("ReduceMax", [scores], axes=[-1], keepdims=1), T.INT32)
                block = 0
            else:  # masked pairs: codes - block (never the row max), then the saturated block
                block = entries.numel() + 256
                codes = g.op(
                    "Add", [codes, g.const(np.where(mask, -block, 0).astype(i32), "lis_mask")]
                )
                row_max = g.op("ReduceMax", [codes], axes=[-1], keepdims=1)
                entries = torch.cat([torch.full((block,), saturated), entries])
            triangle = g.op(  # per row: m (m + 1) / 2 + block, int32 (exact)
                "Div",
                [g.op("Mul", [row_max, g.op("Add", [row_max, g.const(np.array(1, i32))])]),
                 g.const(np.array(2, i32))],
            )  # fmt: skip
            offset = g.op("Add", [triangle, g.const(np.array(block, i32))]) if block else triangle
            index = g.op("Add", [codes, offset])
        else:  # the exact table: max(c) - c; masked pairs: codes - 512, then t >= 257 saturated
            codes = g.cast(scores, T.INT32)
            entries = table[: kernels.MASKED]
            if mask is not None:
                codes = g.op(
                    "Add", [codes, g.const(np.where(mask, -512, 0).astype(i32), "lis_mask")]
                )
                entries = torch.cat([entries, torch.full((512,), saturated)])
            index = g.op("Sub", [g.op("ReduceMax", [codes], axes=[-1], keepdims=1), codes])
        # GatherElements runs its rows in parallel: two where every batch's element count is even,
        # else one per image for ViT (the table expanded at run time: a copy per image about as
        # large as the image's scores); Swin's first axis is images x windows: one row
        count = getattr(attn, "num_heads", 1) * tokens**2 * (1 if mask is None else mask.shape[1])
        vit = getattr(attn, "window_area", None) is None and mask is None
        rows = 2 if count % 2 == 0 else (0 if vit else 1)
        e = self._lookup(entries, index, rows)
        levels = 2**attn.softmax_bits
        if attn.exact_float64 and float(attn.lis_exp_table.max()) * tokens < 2.0**52:
            y = self._lis_quotient_float64(e, levels)
        else:
            y = self._lis_quotient_int64(e, levels)
        return self._lookup(
            self._lis_probability_table(attn.softmax_bits), g.cast(y, T.INT32), rows
        )

    def _lis_quotient_float64(self, e32: str, levels: int) -> str:
        """``min(round(S / e), 2**levels)`` (half to even) as float64 for float32 integers ``e32``
        whose row sums ``S`` stay below 2**52: ``inf`` where ``e = 0`` (clamped to ``2**levels``).

        ``S`` is exact in any order; ``w = fl(S / e)`` is a half-integer only where ``S / e`` is
        one (a quotient ``k + 1/2`` apart is at least ``1 / (2e)`` away, more than half an ulp of
        ``S / e`` as ``S < 2**52``), and on the same side of every half-integer; ``Clip`` to
        ``2**levels`` keeps that; ``fl(w + 2**52)`` rounds to the nearest integer, ties to even (the
        ulp is 1 in ``[2**52, 2**53)`` and ``2**52`` is even), and ``- 2**52`` is exact. A row of
        zeros (``S = 0``, scales past ~1.67) is given ``S = 1/2``: ``inf``, probability 0, as
        the int64 division gives (the float64 kernel has no key for ``0 / 0``).
        """
        g, T, f64 = self.g, self.T, np.float64
        e64 = g.cast(e32, T.DOUBLE)
        total = g.op("ReduceSum", [e64, g.const(np.array([-1], np.int64))], keepdims=1)
        total = g.op("Max", [total, g.const(np.array(0.5, f64))])  # per row: free
        w = g.op("Div", [total, e64])
        w = g.op("Clip", [w, "", g.const(np.array(2.0**levels, f64))])  # Clip: faster than Min
        magic = g.const(np.array(2.0**52, f64))
        return g.op("Sub", [g.op("Add", [w, magic]), magic])

    def _lis_probability_table(self, bits: int) -> Tensor:
        """``2**(L-1) * p`` for every quotient ``y = 0..2**L`` (float32 ``[2**L + 1]``): the integer
        model's ``lis_prob_table(bits)`` at the key ``_log_round(y)``, scaled by a power of two."""
        from ..quant.integer import kernels

        levels = 2**bits
        y = torch.arange(2**levels + 1, dtype=torch.float64)
        probs = kernels.lis_prob_table(bits)[kernels._log_round(y)]
        return probs * 2.0 ** (levels - 1)

    def _lookup(self, table: Tensor, index: str, rows: int = 1) -> str:
        """``table[index]`` elementwise for a 1-D float ``table`` and an int32 ``index`` of any
        shape whose element count ``rows`` divides: ``GatherElements`` on the index as ``[rows,
        -1]`` (its data must be at least as large as the index on every other axis: the table as
        ``[1, K]`` expanded to ``[rows, K]``, a constant ONNX Runtime folds when loading). The
        rows run in parallel. ``rows=0``: one row per index along its first axis (the batch), the
        table expanded at run time. Tables are shared by content (the probability table of every
        layer).
        """
        g = self.g
        key = (table.dtype, tuple(table.shape), table.numpy().tobytes(), rows)
        data = self._tables.get(key)
        i64 = np.int64
        if rows == 0:
            batch = g.slice(g.op("Shape", [index]), 0, 1, 0)
        if data is None:
            data = g.const(table.reshape(1, -1).contiguous(), "table")
            if rows > 1:
                data = g.op("Expand", [data, g.const(np.array([rows, table.numel()], i64))])
            elif rows == 0:
                shape = g.op("Concat", [batch, g.const(np.array([table.numel()], i64))], axis=0)
                data = g.op("Expand", [data, shape])
            self._tables[key] = data
        if rows == 0:
            flat_shape = g.op("Concat", [batch, g.const(np.array([-1], i64))], axis=0)
            values = g.op("GatherElements", [data, g.op("Reshape", [index, flat_shape])], axis=1)
        else:
            values = g.op("GatherElements", [data, g.reshape(index, [rows, -1])], axis=1)
        return g.op("Reshape", [values, g.op("Shape", [index])])

    def _lis_quotient_int64(self, e32: str, levels: int) -> str:
        """``min(round(S / e), 2**levels)`` as float32 for the float32 exponentials ``e32`` (exact
        integers) where ``S`` may pass 2**53: int64 sum, integer division, round half to even by
        the remainder; ``e = 0`` gives ``2**levels``.

        Only quotients up to ``2**levels`` matter (the clamp), so the quotient's parity and the
        rounding step are float32 arithmetic on the clamped quotient (ONNX Runtime's int64 ``Mod``
        costs ~10 elementwise passes).
        """
        g, T, f32, i64 = self.g, self.T, np.float32, np.int64
        e = g.cast(e32, T.INT64)
        total = g.op("ReduceSum", [e, g.const(np.array([-1], i64))], keepdims=1)
        safe = g.op("Max", [e, g.const(np.array(1, i64))])
        quotient = g.op("Div", [total, safe])  # positive operands: the floor
        twice_rem = g.op("Mul", [g.op("Sub", [total, g.op("Mul", [quotient, safe])]),
                                 g.const(np.array(2, i64))])  # fmt: skip
        # float32 holds the clamped quotient (<= 2**levels <= 2**16) exactly
        q = g.cast(g.op("Min", [quotient, g.const(np.array(2**levels, i64))]), T.FLOAT)
        odd = g.op("Sub", [q, g.op("Mul", [g.op("Floor", [g.op("Mul", [q, g.const(np.array(0.5, f32))])]),
                                           g.const(np.array(2.0, f32))])])  # fmt: skip
        above = g.cast(g.op("Greater", [twice_rem, safe]), T.FLOAT)
        tie = g.cast(g.op("Equal", [twice_rem, safe]), T.FLOAT)
        y = g.op("Add", [q, g.op("Add", [above, g.op("Mul", [tie, odd])])])
        # e = 0 (y infinite): the quotient S / 1 may be small; send it past the clamp
        zero = g.cast(g.op("Equal", [e32, g.const(np.array(0.0, f32))]), T.FLOAT)
        y = g.op("Add", [y, g.op("Mul", [zero, g.const(np.array(2.0**levels, f32))])])
        return g.op("Min", [y, g.const(np.array(2.0**levels, f32))])

    def log_int_softmax_fast(
        self, scores: str, attn: nn.Module, mask: Tensor | None, heads: int, tokens: int
    ) -> str:
        """§8 in float32: ``2**-r`` with ``r = floor(log2(4 / (3 p)))`` (the contract's rounding
        of ``log2(1 / p)`` at 1.5) from ``LogSoftmax`` of the dequantized scores; 0 for ``r >= 2**b``.

        The integer model's exponential is the §8 polynomial, here ``exp`` itself: ``r`` can move
        by one where ``1 / p`` lies next to a rounding boundary (the fast form's only difference).
        """
        g, f32 = self.g, np.float32
        value = self.dequantize(scores, attn.lis_point())
        if mask is not None:
            windows = mask.shape[0]
            value = g.reshape(value, [-1, windows, heads, tokens, tokens])
            value = g.op("Add", [value, g.const(mask[None, :, None].detach().to(torch.float32))])
        value = g.reshape(value, [-1, heads, tokens, tokens])
        log_p = g.op("LogSoftmax", [value], axis=-1)
        # -r = ceil(log2 p - log2(4/3))
        minus_r = g.op(
            "Ceil",
            [g.op("Add", [g.op("Mul", [log_p, g.const(np.array(1 / math.log(2), f32))]),
                          g.const(np.array(-math.log2(4 / 3), f32))])],
        )  # fmt: skip
        levels = float(2**attn.softmax_bits)
        power = g.op("Exp", [g.op("Mul", [minus_r, g.const(np.array(math.log(2), f32))])])
        kept = g.cast(g.op("Greater", [minus_r, g.const(np.array(-levels, f32))]), self.T.FLOAT)
        return g.op("Mul", [power, kept])  # faster than Where in ONNX Runtime

    def _score_codes(self, acc: str, attn: nn.Module) -> str:
        """The ``q @ k^T`` accumulator (int32) → the score point's uint8 codes, as the integer model:
        ``clamp(round(fl(fl(fl(acc * step) / s) + zp)))`` (:meth:`IntegerAttention.scores`).

        Where a single float32 multiplier ``m`` (``fl(step / s)`` or a neighbour) gives the same
        code for **every** accumulator value the GEMM can produce (``|acc| <= head_dim *
        max|c - zp|**2``), the graph computes ``clamp(round(fl(fl(acc * m) + zp)))``: no ``Div``
        (~6 ``Mul`` in ONNX Runtime). Else the integer model's operations. Either way
        ``fl(acc * m)`` (or ``fl(acc * step)``) is one ``DequantizeLinear`` of the int32
        accumulator (zero point 0): the accumulator is an integer below 2**24, exact in float32,
        times the scale, one rounding: the ``Cast`` and ``Mul`` in one pass.

        The check, at export: both code functions ``f`` (the integer model's) and ``g`` are
        nondecreasing in ``acc`` (products by positive constants, the addition, rounding and
        clamping are monotone). If they agree at both ends of the range and at ``t_k`` and
        ``t_k - 1`` for every code ``k`` of ``f``, ``t_k`` the first accumulator with ``f >= k``
        (found by bisection), they agree everywhere: ``g(a) > f(a) = j`` would need
        ``g(a) <= g(t_{j+1} - 1) = f(t_{j+1} - 1) = j``, and ``g(a) < f(a) = j`` would need
        ``g(a) >= g(t_j) = f(t_j) >= j``. (Tested against every accumulator.)
        """
        g = self.g
        point, qkv_point = attn.score_point, attn.qkv_point
        s = qkv_point.scale.detach().to(torch.float32)
        step = (s * attn.scale) * s if attn.scale_query_first else (s * s) * attn.scale
        zero = g.const(np.array(0, np.int32))
        zp, bt = int(qkv_point.zero_point), qkv_point.bit_type
        bound = attn.head_dim * max(zp - bt.lower, bt.upper - zp) ** 2

        def codes(acc: Tensor) -> Tensor:
            return _reference_codes(acc.to(torch.float32) * step, point)

        def chunks() -> Iterator[tuple[Tensor, Tensor]]:
            acc = _transitions(codes, -bound, bound, point.bit_type)
            yield acc.to(torch.float32), codes(acc)

        m = self._verified_multiplier(chunks, step / point.scale.detach().to(torch.float32), point)
        if m is None:
            return self.quantize(g.op("DequantizeLinear", [acc, g.const(step), zero]), point)
        return self._codes_of(
            g.op("DequantizeLinear", [acc, g.const(m, "multiplier"), zero]), point
        )

    def _biased_codes(self, scores: str, attn: nn.Module) -> str:
        """Swin: the score codes plus the relative position bias → the bias point's codes, as
        :meth:`IntegerAttention.scores`: ``x = fl(fl((c - zp) s) + b)`` (``DequantizeLinear``, the
        same float32 product), then quantized by one ``Mul`` where :meth:`_verified_multiplier`
        proves it equal to the ``Div`` for every ``x`` that can occur (every code times every bias
        value: a proof by exhaustion), else by :meth:`quantize`."""
        g = self.g
        point, bias_point = attn.score_point, attn.bias_point
        bias = attn.relative_bias().detach().to(torch.float32)
        value = g.op("Add", [self.dequantize(scores, point), g.const(bias)])
        if "quantize" in self.fast:
            return self.quantize(value, bias_point)
        bt = point.bit_type
        codes = torch.arange(bt.lower, bt.upper + 1, dtype=torch.float32)
        x = point.dequantize(codes)[:, None] + torch.unique(bias)[None, :]

        def chunks() -> Iterator[tuple[Tensor, Tensor]]:
            yield x, _reference_codes(x, bias_point)

        guess = 1 / bias_point.scale.detach().to(torch.float32)
        m = self._verified_multiplier(chunks, guess, bias_point)
        if m is None:
            return self.quantize(value, bias_point)
        return self._quantize_by_product(value, m, bias_point)

    @staticmethod
    def _verified_multiplier(
        chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]], guess: Tensor, point: nn.Module
    ) -> Tensor | None:
        """The first float32 ``m`` among ``guess`` and its neighbours (2 ulps each way) for which
        ``clamp(round(fl(fl(x * m) + zp)))`` equals the reference codes on every ``(x, codes)``
        chunk, or None. ``round`` is half to even, as ``QuantizeLinear``'s."""
        guess = guess.reshape(()).to(torch.float32)
        candidates = [guess]
        for direction in (math.inf, -math.inf):
            m = guess
            for _ in range(2):
                m = torch.nextafter(m, torch.tensor(direction, dtype=torch.float32))
                candidates.append(m)
        alive = list(candidates)
        for x, reference in chunks():
            alive = [m for m in alive if torch.equal(_product_codes(x, m, point), reference)]
            if not alive:
                return None
        return alive[0]

    def _quantize_by_product(self, x: str, m: Tensor, point: nn.Module) -> str:
        """``clamp(round(fl(fl(x * m) + zp)))`` as uint8 codes: ``Mul``, ``Add``, (``Clip`` for a
        narrower grid), ``QuantizeLinear`` with scale 1 (rounds half to even, saturates)."""
        return self._codes_of(self.g.op("Mul", [x, self.g.const(m, "multiplier")]), point)

    def _codes_of(self, product: str, point: nn.Module) -> str:
        """``clamp(round(fl(product + zp)))`` as uint8 codes of ``point``."""
        g, f32 = self.g, np.float32
        bt = point.bit_type
        zp = g.const(point.zero_point.detach().to(torch.float32).reshape(()), "zp")
        y = g.op("Add", [product, zp])
        if bt.bits < 8:
            y = g.op(
                "Clip", [y, g.const(np.array(bt.lower, f32)), g.const(np.array(bt.upper, f32))]
            )
        one, zero = g.const(np.array(1.0, f32)), g.const(np.array(0, np.uint8))
        return g.op("QuantizeLinear", [y, one, zero], "codes")

    def attention(
        self, codes: str, attn: nn.Module, in_point: nn.Module, tokens: int, mask: Tensor | None
    ) -> str:
        """``[b, N, dim]`` codes of ``in_point`` → ``[b, N, dim]`` codes of ``attn.proj_point``."""
        g, T = self.g, self.T
        heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.dim
        qkv = self.codes_out(codes, in_point, attn.qkv, attn.qkv_point)
        qkv = g.transpose(g.reshape(qkv, [-1, tokens, 3, heads, head_dim]), [2, 0, 3, 1, 4])
        q, k, v = (g.op("Gather", [qkv, g.const(np.array(i, np.int64))]) for i in range(3))
        zp = self._zp8(attn.qkv_point)
        s = attn.qkv_point.scale.detach()
        if "scores" not in self.fast:
            acc = g.op("MatMulInteger", [q, g.transpose(k, [0, 1, 3, 2]), zp, zp], "scores_acc")
            scores = self._score_codes(acc, attn)
        else:  # DQ → MatMul → Q: one QLinearMatMul (the softmax scale folded into q's scale)
            q_value = g.op("DequantizeLinear", [q, g.const(s * attn.scale), zp])
            k_value = g.op("DequantizeLinear", [g.transpose(k, [0, 1, 3, 2]), g.const(s), zp])
            scores = self.quantize(g.op("MatMul", [q_value, k_value]), attn.score_point)
        if attn.window_area is not None:
            scores = self._biased_codes(scores, attn)
        windows = None if mask is None else mask.shape[0]
        if windows is not None:
            scores = g.reshape(scores, [-1, windows, heads, tokens, tokens])
        if attn.lis and "softmax" in self.fast:
            probs = self.log_int_softmax_fast(scores, attn, mask, heads, tokens)
            context = g.op("MatMul", [probs, self.dequantize(v, attn.qkv_point)])
        elif attn.lis:
            lis_mask = None if mask is None else (mask != 0)[None, :, None].numpy()
            probs = g.reshape(
                self.log_int_softmax(scores, attn, lis_mask, tokens), [-1, heads, tokens, tokens]
            )
            one = g.const(np.array(1.0, np.float32))
            v_int = g.op("DequantizeLinear", [v, one, zp])  # c_v - zp_v, exact
            # probs hold 2**(L-1) p: integers, so probs @ (c_v - zp) stays exact in float32 (row
            # sums of p <= 1.5, IntegerAttention's proof: |partial sums| <= 1.5 * 2**(L-1) * 255
            # < 2**24 for L <= 16); 2**-(L-1) s_v is s_v scaled exactly, the same rounding as
            # (exact sum * 2**-(L-1)) * s_v in the integer model
            step = attn.qkv_point.scale.detach().to(torch.float32) * 2.0 ** -(
                2**attn.softmax_bits - 1
            )
            context = g.op("Mul", [g.op("MatMul", [probs, v_int]), g.const(step)])
        else:
            value = self.dequantize(scores, attn.lis_point())
            if mask is not None:
                value = g.op("Add", [value, g.const(mask[None, :, None].detach())])
            value = g.reshape(value, [-1, heads, tokens, tokens])
            p = self.quantize(g.op("Softmax", [value], axis=-1), attn.softmax_point)
            acc = g.op("MatMulInteger", [p, v, self._zp8(attn.softmax_point), zp], "context_acc")
            step = attn.softmax_point.scale.detach() * attn.qkv_point.scale.detach()
            context = g.op("Mul", [g.cast(acc, T.FLOAT), g.const(step)])
        context = g.reshape(g.transpose(context, [0, 2, 1, 3]), [-1, tokens, dim])
        context = self.quantize(context, attn.context_point)
        return self.codes_out(context, attn.context_point, attn.proj, attn.proj_point)

    def patches(self, x: str, size: tuple[int, int], chans: int, patch: tuple[int, int]) -> str:
        """``[B, C, H, W]`` → ``[B, H/p * W/p, C * ph * pw]`` (the patch conv's GEMM input)."""
        (h, w), (ph, pw) = size, patch
        x = self.g.reshape(x, [-1, chans, h // ph, ph, w // pw, pw])
        x = self.g.transpose(x, [0, 2, 4, 1, 3, 5])
        return self.g.reshape(x, [-1, (h // ph) * (w // pw), chans * ph * pw])

    # -- networks ------------------------------------------------------------------------------

    def vit(self, images: str) -> str:
        g, m = self.g, self.model
        if m.input_point is not None:
            codes = self.patches(
                self.quantize(images, m.input_point), m.img_size, m.in_chans, m.patch_size
            )
            tokens = self.codes_out(codes, m.input_point, m.patch_proj, m.proj_point)
        else:  # ViT: the patch conv sees float pixels (int8 weight dequantized, float GEMM)
            x = self.patches(images, m.img_size, m.in_chans, m.patch_size)
            weight = m.patch_proj.weight.to(torch.float32) * m.patch_proj.weight_scale[:, None]
            value = g.op(
                "Add",
                [g.op("MatMul", [x, g.const(weight.t().contiguous())]), g.const(m.patch_proj.bias)],
            )
            tokens = self.quantize(value, m.proj_point)
        x = self.dequantize(tokens, m.proj_point)
        dim = m.cls_token.shape[-1]
        batch = g.slice(g.op("Shape", [images]), 0, 1, 0)
        cls_shape = g.op("Concat", [batch, g.const(np.array([1, dim], np.int64))], axis=0)
        cls = g.op("Expand", [g.const(m.cls_token.detach()), cls_shape])
        x = self.fake_quantize(g.op("Concat", [cls, x], axis=1), m.cls_point)
        x = self.quantize(
            g.op("Add", [x, g.const(m.pos_point.dequantize(m.pos_codes).detach())]), m.embed_point
        )
        point = m.embed_point
        tokens = m.pos_codes.shape[1]
        for block in m.blocks:
            h = self.layer_norm(x, block.norm1, point, block.norm1_point)
            a = self.attention(h, block.attn, block.norm1_point, tokens, None)
            x = self.residual(x, point, a, block.attn.proj_point, block.res1_point)
            h = self.layer_norm(x, block.norm2, block.res1_point, block.norm2_point)
            x = self.residual(x, block.res1_point, self.mlp(h, block.mlp, block.norm2_point),
                              block.mlp.fc2_point, block.res2_point)  # fmt: skip
            point = block.res2_point
        cls = self.layer_norm(g.slice(x, 0, 1, 1), m.norm, point, m.pre_head_point)
        logits = self.linear(g.reshape(cls, [-1, dim]), m.pre_head_point, m.head)
        return self.fake_quantize(logits, m.logits_point)

    def _roll(self, x: str, shift: tuple[int, int], size: tuple[int, int]) -> str:
        """``torch.roll(x, shift, dims=(1, 2))`` on ``[B, H, W, C]``."""
        for axis, (s, n) in enumerate(zip(shift, size), start=1):
            s %= n
            if s:
                x = self.g.op(
                    "Concat",
                    [self.g.slice(x, n - s, n, axis), self.g.slice(x, 0, n - s, axis)],
                    axis=axis,
                )
        return x

    def swin_block(self, x: str, block: nn.Module, point: nn.Module) -> str:
        g = self.g
        (height, width), (wh, ww) = block.resolution, block.window_size
        if height % wh or width % ww:
            raise OnnxExportError(
                f"export_onnx: a Swin stage of resolution {block.resolution} needs padding to its window "
                f"{block.window_size}; export supports resolutions divisible by the window"
            )
        dim = block.attn.dim
        h = self.layer_norm(x, block.norm1, point, block.norm1_point)
        h = g.reshape(h, [-1, height, width, dim])
        shift = block.shift_size
        h = self._roll(h, (-shift[0], -shift[1]), (height, width))
        h = g.transpose(
            g.reshape(h, [-1, height // wh, wh, width // ww, ww, dim]), [0, 1, 3, 2, 4, 5]
        )
        h = g.reshape(h, [-1, wh * ww, dim])
        h = self.attention(h, block.attn, block.norm1_point, wh * ww, block.attn_mask)
        h = g.transpose(
            g.reshape(h, [-1, height // wh, width // ww, wh, ww, dim]), [0, 1, 3, 2, 4, 5]
        )
        h = self._roll(g.reshape(h, [-1, height, width, dim]), shift, (height, width))
        h = g.reshape(h, [-1, height * width, dim])
        x = self.residual(x, point, h, block.attn.proj_point, block.res1_point)
        h = self.layer_norm(x, block.norm2, block.res1_point, block.norm2_point)
        return self.residual(x, block.res1_point, self.mlp(h, block.mlp, block.norm2_point),
                             block.mlp.fc2_point, block.res2_point)  # fmt: skip

    def patch_merging(self, x: str, down: nn.Module, point: nn.Module) -> str:
        g = self.g
        height, width = down.resolution
        if height % 2 or width % 2:
            raise OnnxExportError(f"export_onnx: patch merging of odd resolution {down.resolution}")
        dim = down.norm.channels // 4
        rows, cols = down.output_resolution
        x = g.transpose(g.reshape(x, [-1, rows, 2, cols, 2, dim]), [0, 1, 3, 4, 2, 5])
        x = self.layer_norm(
            g.reshape(x, [-1, rows * cols, 4 * dim]), down.norm, point, down.norm_point
        )
        return self.codes_out(x, down.norm_point, down.reduction, down.reduction_point)

    def swin(self, images: str) -> str:
        g, m = self.g, self.model
        codes = self.patches(
            self.quantize(images, m.input_point), m.img_size, m.in_chans, m.patch_size
        )
        x = self.codes_out(codes, m.input_point, m.patch_proj, m.proj_point)
        x = self.layer_norm(x, m.patch_norm, m.proj_point, m.patch_norm_point)
        point = m.patch_norm_point
        for stage in m.layers:
            if stage.downsample is not None:
                x = self.patch_merging(x, stage.downsample, point)
                point = stage.downsample.reduction_point
            for block in stage.blocks:
                x = self.swin_block(x, block, point)
                point = block.res2_point
        x = self.dequantize(self.layer_norm(x, m.norm, point, m.norm_point), m.norm_point)
        pooled = self.quantize(g.op("ReduceMean", [x], axes=[1], keepdims=0), m.pool_point)
        return self.fake_quantize(self.linear(pooled, m.pool_point, m.head), m.logits_point)

    def build(self) -> Any:
        m, helper, T = self.model, self.g.helper, self.T
        family = m.integer_config["family"]
        images = "images"
        with torch.no_grad():
            logits = (self.vit if family == "vit" else self.swin)(images)
        logits = self.g.op("Identity", [logits], "logits")
        self.g.nodes[-1].output[0] = "logits"
        h, w = m.img_size
        # a point's constants are made before knowing which of them its operators read: keep the
        # read ones (ONNX Runtime warns for every unread initializer when it loads the graph)
        read = {name for node in self.g.nodes for name in node.input}
        self.g.initializers = [t for t in self.g.initializers if t.name in read]
        graph = helper.make_graph(
            self.g.nodes,
            f"fqvit_{m.integer_config['model_name']}_int8",
            [helper.make_tensor_value_info(images, T.FLOAT, ["batch", m.in_chans, h, w])],
            [
                helper.make_tensor_value_info(
                    "logits", T.FLOAT, ["batch", m.integer_config["num_classes"]]
                )
            ],
            self.g.initializers,
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fqvit_pl"
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str] | None = None,
    *,
    exact: bool = True,
    gemm: str = "u8s8",
) -> Any:
    """The ONNX graph (``onnx.ModelProto``) of ``model``'s integer model; written to ``path`` if given.

    ``exact=True`` (default; 0.87-1.03x timm's float graph in ONNX Runtime on this project's CPU,
    ``benchmarks/onnx_speed.py``): the integer model's arithmetic operation for operation (integer
    PTF LayerNorm, the §8 integer exponential and division), bit for bit given the same GEMM results.

    ``exact=False`` (fast, 1.3-1.75x float): QDQ patterns that ONNX Runtime fuses into ``QGemm`` and
    ``QLinearMatMul``, ``QuantizeLinear`` rounding ``x / s`` then adding the zero point, float32
    ``LayerNormalization`` on the dequantized PTF codes and Log-Int-Softmax's rounding of
    ``log2(1 / p)`` from ``LogSoftmax``. Its logits differ from the integer model's by about the
    quantization error itself (a code moved by one rounding propagates through the network), so
    it does not meet the 5% bar of the exact form: a speed option, check its accuracy on your data.

    ``gemm``: ``"u8s8"`` (default) uint8 activations × int8 weights, ONNX Runtime's fast x86 path,
    exact on CPUs with VNNI (AVX-512 VNNI / AVX-VNNI); without VNNI its 16-bit pairwise sums can
    saturate (``255 * 127 * 2 > 2**15``). ``"u8u8"``: weights stored as ``w + 128`` (zero point 128),
    exact on every x86 CPU, slower (~1.8x per GEMM on this machine).

    ``model``: an integer model, a calibrated ``create_model`` network (converted with
    :func:`fqvit_pl.quant.to_integer`) or a LightningModule holding one as ``net``. Input
    ``images`` float32 ``[batch, C, H, W]`` (dynamic batch), output ``logits`` ``[batch, classes]``.
    The graph's metadata holds the ``integer_config`` and the §10 data config.

    Raises:
        ImportError: ``onnx`` is not installed (``pip install fqvit_pl[onnx]``).
        OnnxExportError: a layer the graph cannot express (e.g. a Swin stage that needs padding).
    """
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("export_onnx needs onnx: pip install 'fqvit_pl[onnx]'") from error
    from .. import __version__

    if gemm not in ("u8s8", "u8u8"):
        raise OnnxExportError(f"export_onnx: gemm={gemm!r}; use 'u8s8' or 'u8u8'")
    source = _unwrap(model)
    integer = as_integer_model(source)
    if any(
        t.device.type != "cpu" for t in integer.buffers()
    ):  # leave the caller's model where it is
        integer = copy.deepcopy(integer).cpu()
    proto = _Exporter(integer, exact=exact, gemm=gemm).build()
    proto.producer_version = __version__
    for key, value in (
        ("integer_config", json.dumps(integer.integer_config, sort_keys=True)),
        ("data_config", json.dumps(_data_config(source, integer), sort_keys=True)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        onnx.save(proto, os.fspath(path))
    return proto
