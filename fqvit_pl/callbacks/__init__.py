"""Lightning callbacks: :class:`QuantCalibration` (reusable with any LightningModule whose network
contains ``fqvit_pl.quant`` layers), :class:`ResultsWriter` (summary line and results CSV) and
:class:`QuantReport` (the quantization report of :mod:`fqvit_pl.analysis`) and
:class:`ExportArtifacts` (int8 safetensors / ONNX files of the calibrated model)."""

from fqvit_pl.callbacks.calibration import (
    DEFAULT_NUM_BATCHES,
    QuantCalibration,
    default_batch_to_input,
)
from fqvit_pl.callbacks.export import ExportArtifacts
from fqvit_pl.callbacks.report import QuantReport
from fqvit_pl.callbacks.results import ResultsWriter

__all__ = [
    "QuantCalibration",
    "ResultsWriter",
    "QuantReport",
    "ExportArtifacts",
    "DEFAULT_NUM_BATCHES",
    "default_batch_to_input",
]
