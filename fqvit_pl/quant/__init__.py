"""fqvit_pl.quant: the quantization parts of FQ-ViT, usable without Lightning.

Bit types, the per-role configuration, observers, quantizers, quantized layers and the
model-level calibration API. See ``shared/docs/fqvit-method.md`` for the numerical contract.
"""

from . import eager_kernels
from .bit_type import BIT_TYPES, BitType, get_bit_type
from .calibrate import (
    calibrate,
    calibration_checksum,
    default_reducer,
    disable_quantization,
    enable_quantization,
    is_calibrated,
    quant_modules,
    reset_calibration,
)
from .config import METHODS, ROLES, PointConfig, QuantConfig
from .integer import IntegerConversionError, build_integer_model, to_integer  # noqa: E402
from .modules import QuantAct, QuantConv2d, QuantLayerNorm, QuantLinear, QuantModule, QuantSoftmax
from .observers import (
    EmaObserver,
    MinMaxObserver,
    Observer,
    OmseObserver,
    PercentileObserver,
    PtfObserver,
    build_observer,
)
from .quantizers import Log2Quantizer, Quantizer, UniformQuantizer, build_quantizer
from .reduce import DistributedReducer, LocalReducer, StatReducer, get_reducer, use_reducer
from .scratch import scratch_scope, with_scratch_scope

__all__ = [
    "BIT_TYPES",
    "BitType",
    "get_bit_type",
    "METHODS",
    "ROLES",
    "PointConfig",
    "QuantConfig",
    "Observer",
    "MinMaxObserver",
    "EmaObserver",
    "PercentileObserver",
    "OmseObserver",
    "PtfObserver",
    "build_observer",
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "build_quantizer",
    "QuantModule",
    "QuantAct",
    "QuantLinear",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantSoftmax",
    "calibrate",
    "calibration_checksum",
    "enable_quantization",
    "disable_quantization",
    "is_calibrated",
    "quant_modules",
    "reset_calibration",
    "default_reducer",
    "StatReducer",
    "LocalReducer",
    "DistributedReducer",
    "get_reducer",
    "use_reducer",
    "scratch_scope",
    "with_scratch_scope",
    "eager_kernels",
    "to_integer",
    "build_integer_model",
    "IntegerConversionError",
]
