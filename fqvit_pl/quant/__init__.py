"""fqvit_pl.quant: the quantization parts of FQ-ViT, usable without Lightning.

Bit types, the per-role configuration, observers, quantizers, quantized layers and the
model-level calibration API. The formulas are in :mod:`.functional` (each once, as
``docs/method.md`` states them); the faster kernels that compute the same bits are in
:mod:`.kernels`, behind one switch: :func:`set_fast_kernels` / :func:`fast_kernels`.
"""

from . import functional, kernels
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
from .checks import (
    NonFiniteOutputError,
    check_calibration_config,
    check_finite_output,
    first_nonfinite_layer,
    guard_calibration_config,
)
from .config import METHODS, ROLES, CalibrationConfigError, PointConfig, QuantConfig
from .integer import (
    IntegerConversionError,
    build_integer_model,
    compile_integer,
    to_integer,
)
from .kernels import fast_kernels, fast_kernels_enabled, set_fast_kernels
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

__all__ = [
    "BIT_TYPES",
    "BitType",
    "get_bit_type",
    "METHODS",
    "ROLES",
    "PointConfig",
    "QuantConfig",
    "CalibrationConfigError",
    "check_calibration_config",
    "guard_calibration_config",
    "NonFiniteOutputError",
    "check_finite_output",
    "first_nonfinite_layer",
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
    "functional",
    "kernels",
    "set_fast_kernels",
    "fast_kernels",
    "fast_kernels_enabled",
    "to_integer",
    "compile_integer",
    "build_integer_model",
    "IntegerConversionError",
]
