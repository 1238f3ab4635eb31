"""fqvit_pl.analysis: where a quantized network loses accuracy, without Lightning.

:func:`quant_report` measures every quantization point of a calibrated network (scales, zero
points, PTF factors, clipping, SQNR and cosine against the float model, alone and accumulated)
and every layer's sensitivity, and writes report.json, report.md and figures
(:mod:`fqvit_pl.analysis.figures`, matplotlib, imported only when figures are drawn).
"""

from .layers import layer_groups, layer_units
from .metrics import (
    ErrorStats,
    channel_min_max,
    clipped_counts,
    cosine_similarity,
    lis_flush_threshold,
    lis_levels,
    sqnr_db,
    uniform_levels,
)
from .report import DEFAULT_CHUNK_SIZE, quant_report
from .writer import render_markdown, write_report

__all__ = [
    "quant_report",
    "DEFAULT_CHUNK_SIZE",
    "write_report",
    "render_markdown",
    "layer_groups",
    "layer_units",
    "ErrorStats",
    "sqnr_db",
    "cosine_similarity",
    "channel_min_max",
    "clipped_counts",
    "lis_levels",
    "lis_flush_threshold",
    "uniform_levels",
]
