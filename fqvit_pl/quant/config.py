"""The configuration of one run: (method, ptf, lis) expanded to the per-role table of docs/method.md §2."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .bit_type import BitType, get_bit_type
from .observers import OBSERVER_CLASSES
from .quantizers import QUANTIZER_CLASSES

__all__ = [
    "CalibrationConfigError",
    "PointConfig",
    "QuantConfig",
    "METHODS",
    "ROLES",
    "OBSERVERS",
    "QUANTIZERS",
    "GRANULARITIES",
]

METHODS = ("minmax", "ema", "percentile", "omse")
OBSERVERS = tuple(OBSERVER_CLASSES)
QUANTIZERS = tuple(QUANTIZER_CLASSES)
GRANULARITIES = ("channel", "tensor")
#: weight: every Linear/Conv2d weight; activation: every Q(x); ln_input: every LNQ(x); softmax: attention probabilities.
ROLES = ("weight", "activation", "ln_input", "softmax")


class CalibrationConfigError(ValueError):
    """A calibration (state dict) made for another quantization configuration than the model's."""


@dataclass(frozen=True)
class PointConfig:
    """How one quantization point quantizes: grid, observer, granularity and quantizer kind."""

    bit_type: BitType
    observer: str
    granularity: str
    quantizer: str

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {OBSERVERS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}"
            )
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one of {QUANTIZERS}")
        OBSERVER_CLASSES[self.observer].check_supported(
            self.bit_type, self.granularity == "channel"
        )

    @property
    def label(self) -> str:
        """``bit_type/observer/granularity/quantizer``, e.g. ``uint8/omse/tensor/uniform``.

        Every calibrated point stores it (:class:`~fqvit_pl.quant.QuantAct`'s ``point_config``
        buffer), so a calibration never loads into a point built differently.
        """
        return f"{self.bit_type.name}/{self.observer}/{self.granularity}/{self.quantizer}"


@dataclass(frozen=True)
class QuantConfig:
    """The three user choices of the method plus optional per-role overrides.

    ``QuantConfig("omse", ptf=True, lis=True).point("ln_input")`` gives the §2 row of that role.
    ``overrides`` maps a role (``weight``, ``activation``, ``ln_input``, ``softmax``) to the fields
    it changes, e.g. ``{"activation": {"bit_type": "uint6"}, "softmax": {"bit_type": "uint8"}}``
    (8-bit Log-Int-Softmax with 6-bit activations). ``ln_eps`` is an epsilon the integer
    LayerNorm adds to the variance; the published method has none (``0.0``, the default), so a
    constant token gives NaN there (see :func:`~fqvit_pl.quant.functional.int_layernorm`).
    """

    method: str = "minmax"
    ptf: bool = True
    lis: bool = True
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ln_eps: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.ln_eps, (int, float)) and 0.0 <= self.ln_eps < float("inf")):
            raise ValueError(
                f"QuantConfig: ln_eps must be a finite number >= 0, got {self.ln_eps!r}"
            )
        if self.method not in METHODS:
            raise ValueError(
                f"QuantConfig: unknown method {self.method!r}; choose one of {METHODS}"
            )
        for role, changes in dict(self.overrides).items():
            if role not in ROLES:
                raise ValueError(f"QuantConfig.overrides: unknown role {role!r}; roles are {ROLES}")
            if not isinstance(changes, Mapping):
                raise ValueError(
                    f"QuantConfig.overrides[{role!r}] must be a mapping of field to value"
                )
            unknown = set(changes) - {"bit_type", "observer", "granularity", "quantizer"}
            if unknown:
                raise ValueError(
                    f"QuantConfig.overrides[{role!r}]: unknown field(s) {sorted(unknown)}; "
                    "fields are bit_type, observer, granularity, quantizer"
                )
        for role in ROLES:  # fail now, not when the first layer is built
            try:
                self.point(role)
            except ValueError as err:
                raise ValueError(f"QuantConfig: role {role!r}: {err}") from None
        if self.point("softmax").granularity != "tensor":
            raise ValueError(
                "QuantConfig: role 'softmax' is quantized per tensor; granularity must be 'tensor'"
            )

    def _default(self, role: str) -> PointConfig:
        if role == "weight":
            return PointConfig(get_bit_type("int8"), "minmax", "channel", "uniform")
        if role == "activation":
            return PointConfig(get_bit_type("uint8"), self.method, "tensor", "uniform")
        if role == "ln_input":
            if self.ptf:
                return PointConfig(get_bit_type("uint8"), "ptf", "channel", "uniform")
            return PointConfig(get_bit_type("uint8"), self.method, "tensor", "uniform")
        if role == "softmax":
            if self.lis:
                return PointConfig(get_bit_type("uint4"), "minmax", "tensor", "log2")
            return PointConfig(get_bit_type("uint8"), self.method, "tensor", "uniform")
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")

    def point(self, role: str) -> PointConfig:
        """The :class:`PointConfig` of ``role`` after overrides."""
        cfg = self._default(role)
        changes = dict(self.overrides.get(role, {}))
        if "bit_type" in changes:
            changes["bit_type"] = get_bit_type(changes["bit_type"])
        return replace(cfg, **changes) if changes else cfg

    def describe(self) -> str:
        """The whole configuration in one line: method, ptf, lis, ln_eps (if set) and every role's point."""
        eps = f" ln_eps={self.ln_eps:g}" if self.ln_eps else ""
        roles = " ".join(f"{role}={self.point(role).label}" for role in ROLES)
        return f"method={self.method} ptf={self.ptf} lis={self.lis}{eps} {roles}"

    @property
    def bits_label(self) -> str:
        """``W/A/Attn`` bit widths as the paper's table writes them, e.g. ``8/8/4``."""
        return f"{self.point('weight').bit_type.bits}/{self.point('activation').bit_type.bits}/{self.point('softmax').bit_type.bits}"
