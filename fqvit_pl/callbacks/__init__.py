"""Lightning callbacks: :class:`QuantCalibration` (reusable with any LightningModule whose network
contains ``fqvit_pl.quant`` layers), :class:`ResultsWriter` (summary line and results CSV) and
:class:`QuantReport` (the quantization report of :mod:`fqvit_pl.analysis`)."""

from fqvit_pl.callbacks.calibration import (
    DEFAULT_NUM_BATCHES,
    QuantCalibration,
    default_batch_to_input,
)
from fqvit_pl.callbacks.report import QuantReport
from fqvit_pl.callbacks.results import ResultsWriter

__all__ = [
    "QuantCalibration",
    "ResultsWriter",
    "QuantReport",
    "DEFAULT_NUM_BATCHES",
    "default_batch_to_input",
]
