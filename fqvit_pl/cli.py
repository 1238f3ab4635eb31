"""The command line: a LightningCLI over :class:`QuantViTModule` and the DataModules of ``datamodules``.

``python main.py {fit,validate,test,predict} --config configs/<model>.yaml [--key value ...]``.
Besides the usual ``model``/``data``/``trainer`` groups it adds two callbacks, configurable as
``calibration.*`` (:class:`~fqvit_pl.callbacks.QuantCalibration`), ``results.*``
(:class:`~fqvit_pl.callbacks.ResultsWriter`) and ``export.*`` (:class:`~fqvit_pl.callbacks.ExportArtifacts`).
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import datamodules  # noqa: F401  (registers ImageNetDataModule / DigitsDataModule for short class paths)
from fqvit_pl.callbacks import ExportArtifacts, QuantCalibration, ResultsWriter
from fqvit_pl.module import QuantViTModule

__all__ = ["FQViTCLI", "cli_main"]


class FQViTCLI(LightningCLI):
    """LightningCLI with the calibration and results callbacks always present."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``calibration``, ``results`` and ``export`` callback groups."""
        parser.add_lightning_class_args(QuantCalibration, "calibration")
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(ExportArtifacts, "export")


def cli_main(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> FQViTCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    return FQViTCLI(
        QuantViTModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        # The module takes its optimizer and scheduler as arguments (model.optimizer, model.lr_scheduler).
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **kwargs,
    )
