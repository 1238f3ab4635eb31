"""QuantReport: write :func:`fqvit_pl.analysis.quant_report` after a calibrated evaluation."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from fqvit_pl.analysis import quant_report, write_report
from fqvit_pl.analysis.table import Cell, format_table, read_paper_table, read_results
from fqvit_pl.callbacks.calibration import QuantCalibration
from fqvit_pl.callbacks.results import ResultsWriter
from fqvit_pl.checks import check_int
from fqvit_pl.quant import is_calibrated, quant_modules

__all__ = ["QuantReport"]


def _first(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class QuantReport(pl.Callback):
    """After validation/test of a calibrated module, write its quantization report to ``dir``.

    The report (:func:`fqvit_pl.analysis.quant_report`: report.json, report.md and PNG figures)
    is computed on rank zero on the first ``num_batches`` batches of the loader just evaluated,
    after the evaluation (so after :class:`QuantCalibration` calibrated the module, whatever the
    order of the callbacks). The figures also go to every logger of the trainer that takes images
    (TensorBoard's ``add_image``, or a ``log_image`` method as W&B's), and the summary numbers to
    its ``log_metrics``. When a :class:`ResultsWriter` of the same trainer writes a results CSV,
    the report adds the figure of this model's cells against the paper (including this
    evaluation's cell when the writer comes first in the callback list, as in ``main.py``).

    Args:
        dir: output folder; ``None`` disables the callback.
        num_batches: evaluation batches analyzed (the figures of the paper use 100 images).
        sensitivity: also rank the layers (quantize only one / all but one).
        chunk_size: images analyzed at once (memory: every point's float output of a chunk).
        during_fit: also write it after the validation epochs of ``fit`` (each one overwrites it).
        log_images: send the figures to the trainer's loggers.
        figures: draw the PNG figures; ``False`` writes report.json and report.md only (the
            figures cost several times the analysis on small networks, see
            ``benchmarks/report_time.py``).

    Attributes:
        last_report: the dict of the last report written, ``None`` before.
    """

    def __init__(
        self,
        dir: Optional[str] = None,
        num_batches: int = 1,
        sensitivity: bool = True,
        chunk_size: int = 32,
        during_fit: bool = False,
        log_images: bool = True,
        figures: bool = True,
    ) -> None:
        check_int("QuantReport: num_batches", num_batches)
        self.dir = dir
        self.num_batches = num_batches
        self.sensitivity = sensitivity
        self.chunk_size = chunk_size
        self.during_fit = during_fit
        self.log_images = log_images
        self.figures = figures
        self.last_report: Optional[dict[str, Any]] = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_write(trainer, pl_module, trainer.val_dataloaders)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_write(trainer, pl_module, trainer.test_dataloaders)

    def _maybe_write(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Any
    ) -> None:
        if self.dir is None or trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and not self.during_fit:
            return
        if not trainer.is_global_zero:
            return
        if not quant_modules(pl_module) or not is_calibrated(pl_module):
            rank_zero_warn(
                f"QuantReport: {type(pl_module).__name__} is not calibrated, no report written to "
                f"{self.dir} (add a QuantCalibration callback or calibrate first)"
            )
            return
        loader = _first(loaders)
        if loader is None:
            rank_zero_warn("QuantReport: no evaluation loader to take the report's images from")
            return
        self.write(trainer, pl_module, loader)

    def write(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any
    ) -> dict[str, Any]:
        """Compute the report on ``num_batches`` of ``loader`` and write it (and log it)."""
        batches = (
            move_data_to_device(batch, pl_module.device)
            for batch in islice(loader, self.num_batches)
        )
        report = quant_report(
            pl_module,
            batches,
            forward=lambda module, x: module(x),
            sensitivity=self.sensitivity,
            chunk_size=self.chunk_size,
        )
        calibration = next(
            (cb for cb in trainer.callbacks if isinstance(cb, QuantCalibration)), None
        )
        seconds = None if calibration is None else calibration.last_calibration_seconds
        report["timing"]["calibration_seconds"] = seconds
        folder = Path(self.dir)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        extra = self._table_figure(trainer, pl_module, report, folder) if self.figures else {}
        report["timing"]["table_figure_seconds"] = time.perf_counter() - start
        written = write_report(report, folder, figures=self.figures, extra_figures=extra)
        self.last_report = report
        timing = report["timing"]
        analysis = timing["analysis_seconds"]
        total = analysis + timing["table_figure_seconds"] + timing["files_seconds"]

        def ratio(value: float) -> str:
            return "" if not seconds else f" = {value / seconds:.1f}x the calibration"

        calibrated = "" if not seconds else f"; calibration {seconds:.2f} s"
        rank_zero_info(
            f"Quantization report written to {written['markdown']}: {total:.2f} s{ratio(total)} "
            f"(analysis {analysis:.2f} s{ratio(analysis)}, figures and files "
            f"{total - analysis:.2f} s{calibrated})"
        )
        if self.log_images:
            self._log(trainer, report, written)
        return report

    def _table_figure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: dict, folder: Path
    ) -> dict[str, str]:
        """This model's cells of the results CSV against the paper, when there is such a CSV."""
        writer = next((cb for cb in trainer.callbacks if isinstance(cb, ResultsWriter)), None)
        model = report["model"].get("model")
        if writer is None or not writer.csv_path or model is None:
            return {}
        rows = [r for r in read_results(writer.csv_path) if r.get("model") == model]
        if not rows:
            return {}
        cells = list(
            dict.fromkeys(
                Cell(model, r["method"], r["ptf"] == "True", r["lis"] == "True") for r in rows
            )
        )
        bits = {}
        for r in rows:
            bits[Cell(model, r["method"], r["ptf"] == "True", r["lis"] == "True")] = r["bits"]
        hparams = getattr(pl_module, "hparams", {})
        comparable = not hparams.get("model_kwargs") and hparams.get("num_classes", 1000) == 1000
        try:
            paper = read_paper_table()
        except FileNotFoundError:
            paper = {}
        _, table_cells = format_table(cells, bits, rows, paper, {model: comparable})
        from fqvit_pl.analysis.figures import plot_table  # matplotlib only when drawing

        title = f"{model}: top-1 of each cell" + (" against the paper" if comparable else "")
        path = plot_table(table_cells, folder / "table.png", title=title)
        return {} if path is None else {"table": "table.png"}

    def _log(self, trainer: pl.Trainer, report: dict, written: dict[str, Path]) -> None:
        figures = {key: written[key] for key in report.get("figures", {}) if key in written}
        scalars = {
            f"quant_report/{key}": value
            for key, value in report["output"].items()
            if isinstance(value, (int, float)) and key != "num_images"
        }
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                from matplotlib.image import imread

                for key, path in figures.items():
                    image = imread(path)[..., :3]
                    experiment.add_image(
                        f"quant_report/{key}", image, trainer.global_step, dataformats="HWC"
                    )
            elif callable(getattr(logger, "log_image", None)):
                for key, path in figures.items():
                    logger.log_image(
                        key=f"quant_report/{key}", images=[str(path)], step=trainer.global_step
                    )
