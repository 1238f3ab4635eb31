"""ResultsWriter: the one-line summary and results-CSV row at the end of an evaluation run."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from fqvit_pl.callbacks.calibration import QuantCalibration, default_batch_to_input
from fqvit_pl.results import ResultRow, append_result, check_results_path, format_summary

__all__ = ["ResultsWriter"]


def _describe(pl_module: pl.LightningModule) -> dict[str, Any]:
    """Model, method, ptf, lis and bits of the run: ``pl_module.describe()`` if it has one, else its hparams."""
    describe = getattr(pl_module, "describe", None)
    if callable(describe):
        return dict(describe())
    hparams = pl_module.hparams
    return {
        "model": hparams.get("model_name", type(pl_module).__name__),
        "method": hparams.get("method", ""),
        "ptf": hparams.get("ptf", ""),
        "lis": hparams.get("lis", ""),
        "bits": hparams.get("bits", ""),
    }


def _batch_size(batch: Any) -> int:
    inputs = default_batch_to_input(batch)
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() > 0 else 1
    try:
        return len(inputs)
    except TypeError:
        return 1


class ResultsWriter(pl.Callback):
    """At the end of ``validate``/``test``: print a one-line summary and append it to a CSV.

    The row (see :class:`fqvit_pl.results.ResultRow`) takes the model description from
    ``pl_module.describe()`` (or its hparams ``model_name``/``method``/``ptf``/``lis``), the
    accuracies from the logged ``{val,test}/top1``, ``/top5``, ``/loss``, ``/fp_top1`` and
    ``/fp_agreement`` (as percentages), the calibration time from a :class:`QuantCalibration`
    callback of the same trainer, and images/s from the wall time of the evaluation loop (first
    batch start to last batch end, including the extra float pass when ``fp_agreement`` is on).

    Args:
        csv_path: results CSV to append to (created with a header if new; checked at ``setup``,
            before the run); ``None`` only prints.
        during_fit: also report every validation epoch of ``fit``.
    """

    def __init__(
        self, csv_path: Optional[str] = "results/results.csv", during_fit: bool = False
    ) -> None:
        self.csv_path = csv_path
        self.during_fit = during_fit
        self.last_row: Optional[ResultRow] = None
        self._start = 0.0
        self._end = 0.0
        self._images = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a results CSV that could not take the row, before the run rather than after it."""
        if self.csv_path and (stage != "fit" or self.during_fit):
            check_results_path(self.csv_path)

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (
            self.during_fit or trainer.state.fn != TrainerFn.FITTING
        )

    def _epoch_start(self) -> None:
        self._images = 0
        self._start = self._end = time.perf_counter()

    def _batch_end(self, batch: Any) -> None:
        self._images += _batch_size(batch)
        self._end = time.perf_counter()

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        images = int(
            trainer.strategy.reduce(
                torch.tensor(self._images, device=pl_module.device), reduce_op="sum"
            )
        )
        metrics = trainer.callback_metrics

        def percent(name: str) -> Optional[float]:
            value = metrics.get(f"{prefix}/{name}")
            return None if value is None else 100.0 * float(value)

        loss = metrics.get(f"{prefix}/loss")
        seconds = self._end - self._start
        calibration = next(
            (cb for cb in trainer.callbacks if isinstance(cb, QuantCalibration)), None
        )
        info = _describe(pl_module)
        row = ResultRow(
            model=str(info.get("model", "")),
            method=str(info.get("method", "")),
            ptf=info.get("ptf", ""),
            lis=info.get("lis", ""),
            bits=str(info.get("bits", "")),
            top1=percent("top1"),
            top5=percent("top5"),
            calib_seconds=None if calibration is None else calibration.last_calibration_seconds,
            images_per_s=images / seconds if seconds > 0 and images else None,
            num_images=images,
            fp_top1=percent("fp_top1"),
            fp_agreement=percent("fp_agreement"),
            loss=None if loss is None else float(loss),
            stage=str(trainer.state.fn.value),
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            execution=str(info.get("execution", "simulated")),
            sim_agreement=percent("sim_agreement"),
            ln_eps=float(info.get("ln_eps", 0.0)),
        )
        self.last_row = row
        rank_zero_info(format_summary(row))
        if self.csv_path and trainer.is_global_zero:
            append_result(self.csv_path, row)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(batch)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(batch)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer):
            self._report(trainer, pl_module, "val")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer):
            self._report(trainer, pl_module, "test")
