"""``quant_report``: where a calibrated network loses accuracy, per quantization point and per layer.

The analysis only observes. It runs the network in float and quantized, switches single modules'
quantization on or off through their public switch, and hooks module outputs; afterwards every
module has its quantize flag back, the hooks are removed and the state dict is unchanged.

Passes per chunk of images (at most ``chunk_size``):

1. **float** (every module off): each point's float input/output is recorded; on the spot the
   point alone is switched on and run again on the same input ("alone" error, clipping, ranges,
   histograms).
2. **quantized** (every module on): each point's output is compared with its float output
   ("accumulated" error: its own error plus everything upstream).
3. **sensitivity** (optional): per layer, only that layer quantized; then per layer, all but
   that layer. Modules that run before the layer are not recomputed: their outputs from pass 1
   (resp. 2) are reused, which are exactly what they would compute.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from fqvit_pl.checks import check_int
from fqvit_pl.quant import QuantAct, QuantLayerNorm, QuantModule, QuantSoftmax, quant_modules

from .layers import layer_groups, layer_units
from .metrics import (
    HISTOGRAM_BINS,
    HISTOGRAM_MIN_LOG2,
    ErrorStats,
    channel_min_max,
    clipped_counts,
    lis_flush_threshold,
    lis_levels,
    log2_histogram,
    uniform_levels,
)

__all__ = ["quant_report", "DEFAULT_CHUNK_SIZE"]

#: Images per analysis pass: the float outputs of every point of one chunk are held in memory.
DEFAULT_CHUNK_SIZE = 32
#: Uniform 4-bit levels that Log-Int-Softmax replaces (figure and zero rate): over [0, 1].
_UNIFORM_BITS = 4


def _split_batch(batch: Any, index: int) -> tuple[Tensor, Optional[Tensor]]:
    """``(inputs, labels or None)`` of a batch: a tensor, or a sequence ``(inputs, labels, ...)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point():
            return batch[0], labels
        return batch[0], None
    raise TypeError(
        f"quant_report: batch {index} is a {type(batch).__name__}; give input tensors or "
        "(inputs, labels) pairs (map other layouts first, e.g. (b['image'], b['label']))"
    )


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _floats(t: Tensor) -> float | list[float]:
    values = t.detach().float().cpu()
    return float(values) if values.dim() == 0 else values.tolist()


@dataclass
class _PointStats:
    """What one quantized module accumulates over the report's images."""

    alone: ErrorStats = field(default_factory=ErrorStats)
    accumulated: ErrorStats = field(default_factory=ErrorStats)
    clipped: Optional[Tensor] = None  # [C] int64
    counted: Optional[Tensor] = None  # [C] int64 values per channel
    low: Optional[Tensor] = None  # [C] observed minimum (float input)
    high: Optional[Tensor] = None
    flushed: int = 0  # LIS: positive probabilities output as 0
    positive: int = 0
    input_point: Optional[str] = None
    output_point: Optional[str] = None
    done: bool = False  # weight points: computed once


@dataclass
class _SoftmaxStats:
    counts: Tensor = field(default_factory=lambda: torch.zeros(HISTOGRAM_BINS, dtype=torch.long))
    below: int = 0
    zeros: int = 0
    total: int = 0
    lis_flush: int = 0  # float probabilities at or below the LIS flush threshold
    uniform_zero: int = 0  # probabilities a uniform 4-bit [0, 1] quantizer maps to 0
    maximum: float = 0.0


@dataclass
class _Agreement:
    """Top-1 agreement with the float model, top-1 against labels, and the logits' error."""

    agree: int = 0
    correct: int = 0
    labelled: int = 0
    images: int = 0
    logits: ErrorStats = field(default_factory=ErrorStats)

    def update(self, reference: Tensor, logits: Tensor, labels: Optional[Tensor]) -> None:
        prediction = logits.argmax(dim=-1)
        self.agree += int((prediction == reference.argmax(dim=-1)).sum())
        self.images += prediction.numel()
        if labels is not None:
            self.correct += int((prediction == labels).sum())
            self.labelled += labels.numel()
        self.logits.update(reference, logits)

    def summary(self) -> dict[str, Any]:
        logits = self.logits.summary()
        return {
            "fp_agreement": 100.0 * self.agree / self.images if self.images else None,
            "top1": 100.0 * self.correct / self.labelled if self.labelled else None,
            "logits_sqnr_db": logits["sqnr_db"],
            "logits_cosine": logits["cosine"],
        }


class _Analysis:
    """The passes of one report over a network (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[nn.Module, Any], Tensor],
        sensitivity: bool,
    ) -> None:
        self.model = model
        self.forward = forward
        self.sensitivity = sensitivity
        self.modules: dict[str, QuantModule] = {m.qname: m for m in quant_modules(model)}
        self.names = {id(m): name for name, m in self.modules.items()}
        self.all_modules = dict(model.named_modules())
        self.stats: dict[str, _PointStats] = defaultdict(_PointStats)
        self.softmax: dict[str, _SoftmaxStats] = defaultdict(_SoftmaxStats)
        self.norm_inputs: dict[str, dict[str, Any]] = {}
        self.ln_input_points: set[str] = set()
        self.order: list[str] = []
        self.full = _Agreement()
        self.float_top1 = _Agreement()
        self.groups: dict[str, list[str]] = {}
        self.units: dict[str, list[str]] = {}
        self.layer_only: dict[str, _Agreement] = defaultdict(_Agreement)
        self.layer_all_but: dict[str, _Agreement] = defaultdict(_Agreement)
        # per pass
        self._mode = "float"
        self._calls: dict[str, int] = defaultdict(int)
        self._refs: dict[tuple[str, int], Tensor] = {}
        self._busy = False
        self._tick = 0
        self._starts: dict[str, int] = {}
        self._unit_ticks: dict[str, tuple[int, int]] = {}
        self._unit_out: dict[str, dict[str, list[Any]]] = {"float": {}, "quant": {}}
        self._unit_calls: dict[str, int] = defaultdict(int)

    # -- switches -------------------------------------------------------------------------

    def _set(self, quantized: Callable[[str], bool]) -> None:
        for name, module in self.modules.items():
            wanted = quantized(name)
            if module.is_quantizing != wanted:
                module.set_quantization(wanted)

    def _alone(self, module: QuantModule, args: tuple, kwargs: dict) -> Any:
        """``module`` on the same input with only its own quantization on (no hooks fire)."""
        self._busy = True
        module.set_quantization(True)
        try:
            return module.forward(*args, **kwargs)
        finally:
            module.set_quantization(False)
            self._busy = False

    # -- hooks ----------------------------------------------------------------------------

    def _point_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy:
            return
        name = self.names[id(module)]
        call = self._calls[name]
        self._calls[name] += 1
        if self._mode == "float":
            self._observe_float(name, module, call, args, kwargs, output)
        elif self._mode == "quant":
            ref = self._refs.pop((name, call), None)
            if ref is not None:
                self.stats[name].accumulated.update(ref, output)

    def _observe_float(
        self, name: str, module: nn.Module, call: int, args: tuple, kwargs: dict, output: Any
    ) -> None:
        stats = self.stats[name]
        if isinstance(module, QuantAct):
            if stats.done:
                return
            x = args[0]
            stats.alone.update(x, self._alone(module, args, kwargs))
            self._observe_range(stats, module, x)
            if module.is_weight_point:
                stats.done = True  # the same weight on every chunk
            else:
                self._refs[(name, call)] = x.detach().clone()
        elif isinstance(module, QuantSoftmax):
            self._observe_softmax(name, module, output)
            if module.lis:
                in_point = args[1] if len(args) > 1 else kwargs.get("in_point")
                stats.input_point = self.names.get(id(in_point))
                quantized = self._alone(module, args, kwargs)
                stats.alone.update(output, quantized)
                positive = output > 0
                stats.flushed += int((positive & (quantized == 0)).sum())
                stats.positive += int(positive.sum())
                self._refs[(name, call)] = output.detach().clone()
        elif isinstance(module, QuantLayerNorm):
            x = args[0]
            in_point = args[1] if len(args) > 1 else kwargs.get("in_point")
            out_point = args[2] if len(args) > 2 else kwargs.get("out_point")
            stats.input_point = self.names.get(id(in_point))
            stats.output_point = self.names.get(id(out_point))
            if stats.input_point is not None:
                self.ln_input_points.add(stats.input_point)
            low, high = channel_min_max(x)
            entry = self.norm_inputs.setdefault(name, {"low": low, "high": high})
            entry["low"], entry["high"] = (
                torch.minimum(entry["low"], low),
                torch.maximum(entry["high"], high),
            )
            if module.integer:
                stats.alone.update(output, self._alone(module, args, kwargs))
                self._refs[(name, call)] = output.detach().clone()

    def _observe_range(self, stats: _PointStats, module: QuantAct, x: Tensor) -> None:
        weight = module.is_weight_point
        if module.config.granularity == "channel":
            low, high = channel_min_max(x, weight=weight)
        else:
            low, high = (v.float().reshape(1) for v in torch.aminmax(x.detach()))
        stats.low = low if stats.low is None else torch.minimum(stats.low, low)
        stats.high = high if stats.high is None else torch.maximum(stats.high, high)
        scale = getattr(module.quantizer, "scale", None)
        zero_point = getattr(module.quantizer, "zero_point", None)
        if scale is None or zero_point is None:
            return
        bit_type = module.config.bit_type
        clipped = clipped_counts(
            x, scale, zero_point, bit_type.lower, bit_type.upper, weight=weight, bounds=(low, high)
        ).cpu()
        per_channel = torch.full_like(clipped, x.numel() // clipped.numel())
        stats.clipped = clipped if stats.clipped is None else stats.clipped + clipped
        stats.counted = per_channel if stats.counted is None else stats.counted + per_channel

    def _observe_softmax(self, name: str, module: QuantSoftmax, p: Tensor) -> None:
        entry = self.softmax[name]
        counts, below, zeros = log2_histogram(p)
        entry.counts += counts.cpu()
        entry.below += below
        entry.zeros += zeros
        entry.total += p.numel()
        entry.lis_flush += int((p <= lis_flush_threshold(_lis_bits(module))).sum())
        step = uniform_levels(_UNIFORM_BITS)[1]
        entry.uniform_zero += int((torch.round(p / step) == 0).sum())
        entry.maximum = max(entry.maximum, float(p.max()))

    def _order_hook(self, module: nn.Module, args: tuple) -> None:
        name = self.names[id(module)]
        if name not in self.order:
            self.order.append(name)

    def _unit_pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._starts[module._fqvit_report_unit] = self._tick  # type: ignore[attr-defined]
        self._tick += 1

    def _unit_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        name = module._fqvit_report_unit  # type: ignore[attr-defined]
        if self._mode == "float":
            self._unit_ticks[name] = (self._starts[name], self._tick)
            self._unit_calls[name] += 1
        self._unit_out[self._mode].setdefault(name, []).append(_clone(output))
        self._tick += 1

    # -- passes ---------------------------------------------------------------------------

    def _run(self, mode: str, inputs: Tensor) -> Tensor:
        self._mode = mode
        self._calls = defaultdict(int)
        self._tick = 0
        logits = self.forward(self.model, inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = list(logits.shape) if isinstance(logits, Tensor) else ""
            raise TypeError(
                "quant_report: the forward must return [B, num_classes] logits, got "
                f"{type(logits).__name__}{shape}; pass forward=lambda model, x: ... to extract them"
            )
        return logits.detach().float()

    def _probe(self, inputs: Tensor) -> None:
        """Learn the execution order from one float image, then the layers and their units."""
        hooks = [m.register_forward_pre_hook(self._order_hook) for m in self.modules.values()]
        try:
            self._set(lambda name: False)
            self._run("probe", inputs[:1])
        finally:
            for hook in hooks:
                hook.remove()
        names = self.order + [n for n in self.modules if n not in self.order]
        self.groups = layer_groups(names)
        self.units = layer_units(self.groups)

    def run_chunk(self, inputs: Tensor, labels: Optional[Tensor]) -> None:
        """All passes over one chunk of images."""
        if not self.groups:
            self._probe(inputs)
        self._unit_out = {"float": {}, "quant": {}}
        self._unit_ticks, self._unit_calls, self._starts = {}, defaultdict(int), {}
        hooks = [
            m.register_forward_hook(self._point_hook, with_kwargs=True)
            for m in self.modules.values()
        ]
        try:
            with _UnitHooks(self, active=self.sensitivity):
                self._set(lambda name: False)
                reference = self._run("float", inputs)
                self._set(lambda name: True)
                quantized = self._run("quant", inputs)
        finally:
            for hook in hooks:
                hook.remove()
            self._refs.clear()
        self.full.update(reference, quantized, labels)
        self.float_top1.update(reference, reference, labels)
        if self.sensitivity:
            self._sensitivity(inputs, labels, reference)
        self._unit_out = {"float": {}, "quant": {}}

    def _skippable(self, group: str) -> list[str]:
        """Units of other layers that finish before ``group`` starts and run once per forward:
        their outputs in the float (quantized) pass are what they compute in an "only" ("all
        but") pass of ``group``, so they are replayed instead of recomputed."""
        starts = [self._unit_ticks[u][0] for u in self.units[group] if u in self._unit_ticks]
        begin = min(starts) if starts else -1
        return [
            unit
            for other, units in self.units.items()
            if other != group
            for unit in units
            if unit in self._unit_ticks
            and self._unit_calls[unit] == 1
            and 0 <= self._unit_ticks[unit][1] < begin
        ]

    def _sensitivity(self, inputs: Tensor, labels: Optional[Tensor], reference: Tensor) -> None:
        # All "only" passes first, then all "all but" passes: consecutive passes then differ in
        # two layers' switches only, so the other layers keep their cached fake-quantized weights
        # (a switch drops a weight point's cache).
        skippable = {group: self._skippable(group) for group in self.groups}
        for mode, inside, results in (
            ("float", True, self.layer_only),
            ("quant", False, self.layer_all_but),
        ):
            for group, names in self.groups.items():
                members = set(names)
                self._set(lambda n: (n in members) == inside)
                with _Replay(self, skippable[group], self._unit_out[mode]):
                    logits = self._run("sensitivity", inputs)
                results[group].update(reference, logits, labels)

    # -- result ---------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """The JSON-ready report (see :func:`quant_report`)."""
        names = self.order + [n for n in self.modules if n not in self.order]
        group_of = {name: group for group, members in self.groups.items() for name in members}
        points = {}
        for index, name in enumerate(names):
            entry = self._describe(name, self.modules[name])
            if entry is None:
                continue
            entry["order"] = index
            entry["layer"] = group_of.get(name)
            points[name] = entry
        full = self.full.summary()
        output = {
            "num_images": self.full.images,
            "fp_agreement": full["fp_agreement"],
            "top1": full["top1"],
            "fp_top1": self.float_top1.summary()["top1"],
            "logits_sqnr_db": full["logits_sqnr_db"],
            "logits_cosine": full["logits_cosine"],
        }
        return {
            "output": output,
            "points": points,
            "layernorm_inputs": self._norm_inputs(),
            "attention": self._attention(),
            "sensitivity": self._ranking(output),
        }

    def _describe(self, name: str, module: QuantModule) -> Optional[dict[str, Any]]:
        stats = self.stats[name]
        if isinstance(module, QuantAct):
            return self._describe_act(name, module, stats)
        if isinstance(module, QuantSoftmax) and module.lis:
            bits = _lis_bits(module)
            in_point = self.modules.get(stats.input_point or "")
            return {
                "kind": "softmax_lis",
                "bit_type": module.bit_type.name,
                "quantizer": "log2",
                "granularity": "tensor",
                "observer": None,
                "input_point": stats.input_point,
                "input_scale": None if in_point is None else _floats(in_point.scale),
                "scale": None,
                "zero_point": None,
                "levels": lis_levels(bits),
                "representable_range": [0.0, 1.0],
                "clipping_rate": stats.flushed / stats.positive if stats.positive else None,
                "clipping": "positive probabilities output as 0 (log2 grid underflow)",
                "alone": stats.alone.summary(),
                "accumulated": stats.accumulated.summary(),
            }
        if isinstance(module, QuantLayerNorm) and module.integer:
            return {
                "kind": "layernorm_integer",
                "bit_type": None,
                "quantizer": "integer LayerNorm (PTF)",
                "granularity": "channel",
                "observer": None,
                "input_point": stats.input_point,
                "output_point": stats.output_point,
                "scale": None,
                "zero_point": None,
                "clipping_rate": None,
                "alone": stats.alone.summary(),
                "accumulated": stats.accumulated.summary(),
            }
        return None

    def _describe_act(self, name: str, module: QuantAct, stats: _PointStats) -> dict[str, Any]:
        config = module.config
        bit_type = config.bit_type
        parent = self.all_modules.get(name.rpartition(".")[0])
        if module.is_weight_point:
            kind = "weight"
        elif isinstance(parent, QuantSoftmax) and parent.point is module:
            kind = "softmax"
        elif name in self.ln_input_points or config.observer == "ptf":
            kind = "ln_input"
        else:
            kind = "activation"
        entry: dict[str, Any] = {
            "kind": kind,
            "bit_type": bit_type.name,
            "quantizer": config.quantizer,
            "granularity": config.granularity,
            "observer": config.observer,
        }
        scale = getattr(module.quantizer, "scale", None)
        zero_point = getattr(module.quantizer, "zero_point", None)
        entry["scale"] = None if scale is None else _floats(scale)
        entry["zero_point"] = None if zero_point is None else _floats(zero_point)
        alpha = getattr(module.observer, "alpha", None)
        if isinstance(alpha, Tensor):
            entry["ptf_alpha"] = alpha.tolist()
        entry["calibration_range"] = [
            _floats(module.observer.min_val),
            _floats(module.observer.max_val),
        ]
        if scale is not None and zero_point is not None:
            entry["representable_range"] = [
                _floats((bit_type.lower - zero_point) * scale),
                _floats((bit_type.upper - zero_point) * scale),
            ]
        if stats.low is not None:
            per_channel = config.granularity == "channel"
            entry["observed_range"] = [
                _floats(stats.low if per_channel else stats.low[0]),
                _floats(stats.high if per_channel else stats.high[0]),
            ]
        if stats.clipped is not None:
            entry["clipping_rate"] = float(stats.clipped.sum()) / float(stats.counted.sum())
            if stats.clipped.numel() > 1:
                entry["clipping_rate_per_channel"] = (
                    stats.clipped.double() / stats.counted.double()
                ).tolist()
        else:
            entry["clipping_rate"] = None
        entry["alone"] = stats.alone.summary()
        entry["accumulated"] = (
            stats.alone.summary() if module.is_weight_point else stats.accumulated.summary()
        )
        return entry

    def _norm_inputs(self) -> dict[str, Any]:
        out = {}
        for name, entry in self.norm_inputs.items():
            in_point_name = self.stats[name].input_point
            in_point = self.modules.get(in_point_name or "")
            alpha = getattr(getattr(in_point, "observer", None), "alpha", None)
            channels = entry["low"].numel()
            if isinstance(alpha, Tensor) and alpha.numel() and channels % alpha.numel() == 0:
                alpha = alpha.repeat(
                    channels // alpha.numel()
                ).tolist()  # patch merging: tiled (§7)
            else:
                alpha = None
            out[name] = {
                "input_point": in_point_name,
                "integer": bool(getattr(self.modules[name], "integer", False)),
                "channel_min": entry["low"].tolist(),
                "channel_max": entry["high"].tolist(),
                "ptf_alpha": alpha,
            }
        return out

    def _attention(self) -> dict[str, Any]:
        out = {}
        for name, entry in self.softmax.items():
            module = self.modules[name]
            bits = _lis_bits(module)
            out[name] = {
                "lis": bool(module.lis),
                "num_values": entry.total,
                "histogram": {
                    "log2_min": HISTOGRAM_MIN_LOG2,
                    "log2_max": 0,
                    "bins": HISTOGRAM_BINS,
                    "counts": entry.counts.tolist(),
                    "below_range": entry.below,
                    "zeros": entry.zeros,
                },
                "max_probability": entry.maximum,
                "lis_bits": bits,
                "lis_flush_threshold": lis_flush_threshold(bits),
                "lis_flush_rate": entry.lis_flush / entry.total if entry.total else None,
                "uniform4_zero_rate": entry.uniform_zero / entry.total if entry.total else None,
            }
        return out

    def _ranking(self, output: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.sensitivity:
            return []
        full_agreement = output["fp_agreement"]
        full_top1 = output["top1"]
        fp_top1 = output["fp_top1"]
        rows = []
        for group, members in self.groups.items():
            only = self.layer_only[group].summary()
            all_but = self.layer_all_but[group].summary()
            rows.append(
                {
                    "layer": group,
                    "modules": list(members),
                    "only": only,
                    "all_but": all_but,
                    "only_agreement_drop": 100.0 - only["fp_agreement"],
                    "all_but_agreement_gain": all_but["fp_agreement"] - full_agreement,
                    "only_top1_drop": None
                    if fp_top1 is None or only["top1"] is None
                    else fp_top1 - only["top1"],
                    "all_but_top1_gain": None
                    if full_top1 is None or all_but["top1"] is None
                    else all_but["top1"] - full_top1,
                }
            )

        def key(row: dict[str, Any]) -> tuple[float, float]:
            sqnr = row["only"]["logits_sqnr_db"]
            return (-row["only_agreement_drop"], math.inf if sqnr is None else sqnr)

        rows.sort(key=key)
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        return rows


def _lis_bits(module: QuantSoftmax) -> int:
    return module.bit_type.bits if module.lis else _UNIFORM_BITS


class _UnitHooks:
    """Forward hooks on every unit (see :func:`layer_units`) while active."""

    def __init__(self, analysis: _Analysis, active: bool) -> None:
        self.analysis = analysis
        self.active = active and bool(analysis.units)
        self.handles: list[Any] = []

    def __enter__(self) -> _UnitHooks:
        if self.active:
            for units in self.analysis.units.values():
                for unit in units:
                    module = self.analysis.all_modules[unit]
                    module._fqvit_report_unit = unit  # type: ignore[attr-defined]
                    self.handles.append(
                        module.register_forward_pre_hook(self.analysis._unit_pre_hook)
                    )
                    self.handles.append(module.register_forward_hook(self.analysis._unit_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if self.active:
            for units in self.analysis.units.values():
                for unit in units:
                    module = self.analysis.all_modules[unit]
                    if "_fqvit_report_unit" in module.__dict__:
                        del module._fqvit_report_unit


class _Replay:
    """Replace the forward of the given units by their recorded outputs while active."""

    def __init__(
        self, analysis: _Analysis, units: list[str], outputs: dict[str, list[Any]]
    ) -> None:
        self.modules = [(analysis.all_modules[u], outputs[u][0]) for u in units if outputs.get(u)]

    def __enter__(self) -> _Replay:
        for module, output in self.modules:
            module.forward = lambda *args, _out=output, **kwargs: _clone(_out)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, _ in self.modules:
            if "forward" in module.__dict__:
                del module.forward


def _model_description(model: nn.Module) -> dict[str, Any]:
    """Model name and quantization configuration, where the network exposes them."""
    net = getattr(model, "net", model)
    qconfig = getattr(net, "qconfig", None)
    info: dict[str, Any] = {"model": getattr(net, "model_name", type(net).__name__)}
    if qconfig is not None:
        info.update(
            method=qconfig.method,
            ptf=qconfig.ptf,
            lis=qconfig.lis,
            bits=qconfig.bits_label,
        )
    return info


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def quant_report(
    model: nn.Module,
    batches: Iterable[Any],
    out_dir: str | Path | None = None,
    *,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    sensitivity: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    figures: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """Analyze a calibrated network on ``batches``; with ``out_dir``, write report.json, report.md and PNGs.

    ``batches`` yields input tensors ``[B, 3, H, W]`` or ``(inputs, labels)`` pairs (labels give
    top-1; without them only agreement with the float model is measured); ``forward(model, x)``
    must return ``[B, num_classes]`` logits (default ``model(x)``). The model is not changed: its
    quantize flags, state dict and train/eval mode are as before, whatever happens.

    Returns a JSON-ready dict:

    - ``model``: name, method, ptf, lis, bits (where the network has a ``qconfig``);
    - ``output``: ``num_images``, ``fp_agreement`` (% of images whose quantized top-1 equals the
      float top-1), ``top1``/``fp_top1`` (% with labels, else ``None``), ``logits_sqnr_db``,
      ``logits_cosine``;
    - ``points``: per quantization point (module name, execution order): ``kind`` (weight,
      activation, ln_input, softmax, softmax_lis, layernorm_integer), bit type, observer,
      ``scale``/``zero_point`` (``[C]`` lists per channel), ``ptf_alpha`` (PTF points),
      ``calibration_range``, ``representable_range`` ``[(qmin - zp) s, (qmax - zp) s]``,
      ``observed_range`` (float input on these images), ``clipping_rate`` (share of float input
      values whose code ``round(x / s + zp)`` lies outside ``[qmin, qmax]``; for LIS the share of
      positive probabilities output as 0), and ``alone``/``accumulated`` errors
      ``{sqnr_db, cosine, mse}`` against the float model (``sqnr_db`` ``None`` with ``mse`` 0:
      no error, infinite SQNR);
    - ``layernorm_inputs``: per LayerNorm, the per-channel min/max of its input and the PTF
      factor of each channel (``None`` without PTF);
    - ``attention``: per softmax, the histogram of the float probabilities (2048 log2-spaced
      bins over [2**-32, 1]), the share LIS flushes to 0 and the share a uniform 4-bit [0, 1]
      quantizer maps to 0;
    - ``sensitivity``: per layer (``blocks.3``, ``embed``, ``head`` …; see
      :func:`fqvit_pl.analysis.layer_groups`), ``only`` (only this layer quantized) and
      ``all_but`` (everything else quantized) agreement/top-1/logits SQNR, ranked by the
      agreement lost when only the layer is quantized, then by its logits SQNR;
    - ``timing``: seconds of the analysis and of the files.

    ``chunk_size`` bounds the images analyzed at once (the float outputs of every point of a
    chunk are held in memory). Raises ``ValueError`` for an uncalibrated network or no images.
    """
    check_int("quant_report: chunk_size", chunk_size)
    modules = quant_modules(model)
    if not modules:
        raise ValueError(
            f"quant_report: {type(model).__name__} contains no fqvit_pl.quant layers: nothing to report"
        )
    uncalibrated = [m.qname for m in modules if not m.is_calibrated]
    if uncalibrated:
        raise ValueError(
            f"quant_report: {len(uncalibrated)} quantization point(s) are not calibrated, first "
            f"{uncalibrated[0]!r}: run fqvit_pl.quant.calibrate(model, batches) first"
        )
    flags = [(m, m.is_quantizing) for m in modules]
    was_training = model.training
    device = _device(model)
    forward = forward or (lambda m, x: m(x))
    analysis = _Analysis(model, forward, sensitivity)
    start = time.perf_counter()
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                inputs, labels = _split_batch(batch, index)
                inputs = inputs.to(device)
                labels = None if labels is None else labels.to(device)
                for offset in range(0, inputs.shape[0], chunk_size):
                    analysis.run_chunk(
                        inputs[offset : offset + chunk_size],
                        None if labels is None else labels[offset : offset + chunk_size],
                    )
    finally:
        for module, flag in flags:
            if module.is_quantizing != flag:
                module.set_quantization(flag)
        model.train(was_training)
    if analysis.full.images == 0:
        raise ValueError("quant_report: no images were given (batches is empty)")
    report = {"model": _model_description(model), **analysis.result()}
    report["timing"] = {"analysis_seconds": time.perf_counter() - start}
    if out_dir is not None:
        from .writer import write_report

        write_report(report, out_dir, figures=figures, title=title)
    return report
