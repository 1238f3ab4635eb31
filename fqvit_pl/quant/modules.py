"""Quantized layers: the activation point, Linear, Conv2d, LayerNorm and Softmax (§6–§8).

Mode flags live in buffers (``calibrated``, ``quant_enabled``) so checkpoints carry them; a Python
mirror of each flag is what ``forward`` branches on, so a quantized forward never reads a tensor
value on the host. The mirrors are refreshed whenever a state dict is loaded.

A weight point (``QuantAct(weight=True)``) caches its fake-quantized weight while no gradient is
needed: see :meth:`QuantAct.forward`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import CalibrationConfigError, PointConfig
from .observers import build_observer
from .quantizers import build_quantizer

__all__ = [
    "QuantModule",
    "QuantAct",
    "QuantLinear",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantSoftmax",
]


def _sync_flags(module: nn.Module, incompatible_keys: Any) -> None:
    for sub in module.modules():
        if isinstance(sub, QuantModule):
            sub._sync_from_buffers()


class QuantModule(nn.Module):
    """Mixin of every quantized layer: the ``quant_enabled`` flag and a name for error messages.

    ``qname`` defaults to the class name; :func:`fqvit_pl.quant.calibrate` sets it to the module's
    path in the model so that errors name the layer at fault.
    """

    def _init_quant_state(self) -> None:
        self.register_buffer("quant_enabled", torch.zeros((), dtype=torch.bool))
        self._quantize = False
        self.qname = type(self).__name__
        self.register_load_state_dict_post_hook(_sync_flags)

    def _sync_from_buffers(self) -> None:
        self._quantize = bool(self.quant_enabled)

    @property
    def is_calibrated(self) -> bool:
        """Whether every quantization parameter of this module has been computed."""
        return True

    @property
    def is_quantizing(self) -> bool:
        """Whether fake quantization is on now (the Python mirror of ``quant_enabled``: no host read)."""
        return self._quantize

    def set_quantization(self, enabled: bool) -> None:
        """Switch fake quantization on or off; on requires a calibrated module."""
        if enabled and not self.is_calibrated:
            raise RuntimeError(
                f"{self.qname}: cannot quantize before calibration (run fqvit_pl.quant.calibrate first)"
            )
        self.quant_enabled.fill_(enabled)
        self._quantize = enabled

    def reset_calibration(self) -> None:
        """Forget observed statistics and computed parameters; quantization off."""
        self.set_quantization(False)

    def set_observing(self, observing: bool, last_batch: bool = False) -> None:
        """Enter or leave calibration; ``last_batch`` marks the batch on which parameters are computed."""

    def set_name(self, name: str) -> None:
        """Name used in error messages (the module's path in its model)."""
        self.qname = name


#: Bytes of the ``point_config`` buffer: room for the longest :attr:`PointConfig.label`.
_LABEL_BYTES = 48


def encode_label(label: str) -> Tensor:
    """``label`` as a zero-padded ``[48]`` uint8 tensor (a buffer that any checkpoint format keeps)."""
    data = label.encode("ascii")
    if len(data) > _LABEL_BYTES:
        raise ValueError(f"configuration label {label!r} is longer than {_LABEL_BYTES} bytes")
    return torch.tensor(list(data.ljust(_LABEL_BYTES, b"\0")), dtype=torch.uint8)


def decode_label(code: Tensor) -> str:
    """The label :func:`encode_label` stored in ``code`` (``?`` for bytes that are not ASCII)."""
    return bytes(code.detach().cpu().reshape(-1).tolist()).rstrip(b"\0").decode("ascii", "replace")


def stored_point_label(state_dict: Mapping[str, Any], prefix: str) -> str | None:
    """The configuration label of a *calibrated* point stored under ``prefix`` in ``state_dict``.

    ``None`` when the point is absent, uncalibrated (its statistics are the initial ones, so any
    configuration may take them) or has no ``point_config`` entry.
    """
    code, calibrated = (
        state_dict.get(prefix + "point_config"),
        state_dict.get(prefix + "calibrated"),
    )
    if not isinstance(code, Tensor) or not isinstance(calibrated, Tensor):
        return None
    if code.dtype != torch.uint8 or code.dim() != 1 or not bool(calibrated.any()):
        return None
    return decode_label(code)


class QuantAct(QuantModule):
    """A quantization point ``Q(x)``: an observer plus a quantizer (§2, §6).

    ``num_channels`` is the size of the channel axis (last dim; dim 1 for NCHW), needed for
    per-channel configs; the output has the input's shape. With ``weight=True`` the point lays out
    a weight (channel = dim 0).

    ``replicated_input=True`` declares that the point's input is the same tensor on every process
    (a parameter, or anything computed from parameters only, such as a position embedding or a
    relative-position bias table): under ``torch.distributed`` its statistics are then not merged
    across processes (merging would count each value once per process). Default: ``weight`` (a
    weight is a parameter). Data-dependent inputs must keep it ``False``.

    The point's :attr:`PointConfig.label` is stored in the ``point_config`` buffer; a state dict
    whose point was calibrated with another configuration does not load
    (:class:`~fqvit_pl.quant.CalibrationConfigError`).
    """

    def __init__(
        self,
        num_channels: int,
        config: PointConfig,
        weight: bool = False,
        *,
        replicated_input: bool | None = None,
    ) -> None:
        super().__init__()
        per_channel = config.granularity == "channel"
        self.config = config
        self.is_weight_point = weight
        self.replicated_input = weight if replicated_input is None else replicated_input
        self.observer = build_observer(
            config.observer,
            config.bit_type,
            num_channels,
            per_channel,
            weight,
            replicated=self.replicated_input,
        )
        self.quantizer = build_quantizer(
            config.quantizer, config.bit_type, num_channels, per_channel, weight
        )
        self.register_buffer("point_config", encode_label(config.label))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._init_quant_state()
        self._calibrated = False
        self._observing = False
        self._last_batch = False
        self._weight_cache: tuple | None = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_weight_cache"] = None  # derived, never pickled or deep-copied
        return state

    def clear_weight_cache(self) -> None:
        """Drop the cached fake-quantized weight (it is refreshed on the next forward anyway)."""
        self._weight_cache = None

    def set_quantization(self, enabled: bool) -> None:
        super().set_quantization(enabled)
        self._weight_cache = None

    def set_name(self, name: str) -> None:
        super().set_name(name)
        self.observer.name = name

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stored = stored_point_label(state_dict, prefix)
        if stored is not None and stored != self.config.label:
            name = prefix.rstrip(".") or self.qname
            raise CalibrationConfigError(
                f"{name}: the state dict holds a calibration made with {stored}, this point is "
                f"built with {self.config.label}; build the model with the checkpoint's "
                "quantization configuration, or load only its float weights and recalibrate"
            )
        if prefix + "point_config" in state_dict:
            # The label describes this point, not the checkpoint's (an uncalibrated one may differ).
            state_dict[prefix + "point_config"] = self.point_config
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _sync_from_buffers(self) -> None:
        super()._sync_from_buffers()
        self._calibrated = bool(self.calibrated)
        self._weight_cache = None

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def reset_calibration(self) -> None:
        super().reset_calibration()
        self.observer.reset()
        self.calibrated.fill_(False)
        self._calibrated = False

    def set_observing(self, observing: bool, last_batch: bool = False) -> None:
        self._observing = observing
        self._last_batch = observing and last_batch
        self._weight_cache = None

    @property
    def scale(self) -> Tensor:
        """The frozen scale (``[C]`` or ``[]``)."""
        return self.quantizer.scale

    def forward(self, x: Tensor) -> Tensor:
        if self._observing:
            self.observer.update(x)
            if self._last_batch:
                self.quantizer.set_qparams(*self.observer.compute_qparams(x))
                self.calibrated.fill_(True)
                self._calibrated = True
        if self._quantize:
            if (
                self.is_weight_point
                and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()
            ):
                return self._cached_weight(x)
            return self.quantizer(x)
        return x

    def _weight_key(self, w: Tensor) -> tuple:
        state = tuple((t.data_ptr(), t._version) for t in self.quantizer.buffers())
        return (w.data_ptr(), w._version, w.shape, w.stride(), w.dtype, w.device, state)

    def _cached_weight(self, w: Tensor) -> Tensor:
        """``quantizer(w)``, reused while ``w`` and the quantizer's buffers are unchanged.

        Only used with grad mode off (no graph to keep) and outside ``torch.compile``. The key is the
        weight's storage address and version counter (bumped by every in-place change: optimizer
        steps, ``load_state_dict``, ``copy_`` under ``no_grad`` ...) and those of the scale and zero
        point; the cache keeps the weight's storage alive, so an address is never reused while it is
        a key. Not seen: in-place changes through ``weight.data`` (PyTorch does not count those
        versions); call :meth:`clear_weight_cache` after such a change. The cache is no state: it
        is not in ``state_dict`` and is dropped on every mode switch and state-dict load.
        """
        if w.is_inference() or any(t.is_inference() for t in self.quantizer.buffers()):
            return self.quantizer(w)  # inference tensors have no version counter
        key = self._weight_key(w)
        cache = self._weight_cache
        if cache is not None and cache[0] == key:
            return cache[2]
        out = self.quantizer(w)
        self._weight_cache = (key, w.detach(), out)
        return out


class QuantLinear(nn.Linear):
    """``nn.Linear`` (same parameter names) whose weight passes through the point ``weight_quant``.

    The weight point is per output channel (int8, minmax by default); ``x`` is ``[..., in_features]``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, config: PointConfig
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_quant = QuantAct(out_features, config, weight=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameter names) whose weight passes through the point ``weight_quant``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        bias: bool = True,
        *,
        config: PointConfig,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.weight_quant = QuantAct(out_channels, config, weight=True)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_quant(self.weight)
        if self.padding_mode != "zeros" or isinstance(
            self.padding, str
        ):  # not in our models: inductor's own conv
            return self._conv_forward(x, weight, self.bias)
        return kernels.conv2d(
            x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class QuantLayerNorm(nn.LayerNorm, QuantModule):
    """``nn.LayerNorm`` (same parameter names) with the integer mode of §7.

    ``forward(x, in_point, out_point)``: with ``integer=True`` and quantization on, computes the
    integer LayerNorm from ``in_point``'s per-channel scales and ``out_point``'s scale; otherwise the
    float LayerNorm (the points are then unused). ``x`` is ``[..., C]``. ``eps`` is the float
    LayerNorm's epsilon; the integer one adds ``integer_eps`` (default 0, as published).
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-6,
        *,
        integer: bool = False,
        integer_eps: float = 0.0,
    ) -> None:
        super().__init__(normalized_shape, eps=eps)
        self.integer = integer
        self.integer_eps = integer_eps
        self._init_quant_state()

    def set_quantization(self, enabled: bool) -> None:
        super().set_quantization(enabled)
        if enabled and self.integer:
            kernels.build_kernel_tables(self.weight.device)  # so that torch.compile finds them

    def forward(
        self, x: Tensor, in_point: QuantAct | None = None, out_point: QuantAct | None = None
    ) -> Tensor:
        if self._quantize and self.integer:
            if in_point is None or out_point is None:
                raise RuntimeError(
                    f"{self.qname}: the integer LayerNorm needs its input and output points"
                )
            return kernels.int_layernorm(
                x, in_point.scale, out_point.scale, self.weight, self.bias, eps=self.integer_eps
            )
        return kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        integer = f", integer=True, integer_eps={self.integer_eps:g}" if self.integer else ""
        return super().extra_repr() + integer


class QuantSoftmax(QuantModule):
    """Softmax over the last dim (§8): Log-Int-Softmax when ``lis``, else float softmax plus a point.

    ``forward(x, in_point)``: ``in_point`` is the quantization point that produced ``x``; its scale
    feeds Log-Int-Softmax. With ``lis``, the integer path runs once quantization is on, and also on
    the last calibration batch as soon as ``in_point`` has its scale (§9, as published).
    """

    def __init__(self, config: PointConfig, lis: bool) -> None:
        super().__init__()
        self.lis = lis
        self.bit_type = config.bit_type
        # With lis the output lies on the log grid already: no point follows it.
        self.point = None if lis else QuantAct(1, config)
        self._init_quant_state()
        self._last_batch = False

    def set_observing(self, observing: bool, last_batch: bool = False) -> None:
        self._last_batch = observing and last_batch

    def set_quantization(self, enabled: bool) -> None:
        super().set_quantization(enabled)
        if enabled and self.lis:
            kernels.build_kernel_tables(
                self.quant_enabled.device, lis_bits=self.bit_type.bits
            )  # for torch.compile

    def forward(self, x: Tensor, in_point: QuantAct | None = None) -> Tensor:
        if self.lis:
            ready = in_point is not None and in_point.is_calibrated
            if self._quantize or (self._last_batch and ready):
                if in_point is None:
                    raise RuntimeError(
                        f"{self.qname}: Log-Int-Softmax needs the point that quantized its input"
                    )
                return kernels.log_int_softmax(x, in_point.scale, self.bit_type)
            return kernels.softmax(x, dim=-1)
        return self.point(kernels.softmax(x, dim=-1))
