"""The command line: a LightningCLI over :class:`QuantViTModule` and the DataModules of ``datamodules``.

``python main.py {fit,validate,test,predict} --config configs/<model>.yaml [--key value ...]``.
Besides the usual ``model``/``data``/``trainer`` groups it adds four callbacks, configurable as
``calibration.*`` (:class:`~fqvit_pl.callbacks.QuantCalibration`), ``results.*``
(:class:`~fqvit_pl.callbacks.ResultsWriter`), ``report.*`` (:class:`~fqvit_pl.callbacks.QuantReport`,
off until ``--report.dir`` is given) and ``export.*`` (:class:`~fqvit_pl.callbacks.ExportArtifacts`).
Before building anything it checks ``--ckpt_path`` against the command line,
``--trainer.precision`` and ``--data.root`` (see :mod:`fqvit_pl.checks`).
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

import datamodules  # noqa: F401  (registers ImageNetDataModule / DigitsDataModule for short class paths)
from fqvit_pl.callbacks import ExportArtifacts, QuantCalibration, QuantReport, ResultsWriter
from fqvit_pl.checks import check_checkpoint_hparams, check_data_root, check_precision
from fqvit_pl.module import QuantViTModule

__all__ = ["FQViTCLI", "cli_main"]


class FQViTCLI(LightningCLI):
    """LightningCLI with the calibration and results callbacks always present."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``calibration``, ``results``, ``report`` and ``export`` callback groups."""
        parser.add_lightning_class_args(QuantCalibration, "calibration")
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(QuantReport, "report")
        parser.add_lightning_class_args(ExportArtifacts, "export")

    def _run_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then refuse a ``--ckpt_path`` written for another model than the command line's.

        Lightning next merges the checkpoint's hyperparameters into the model's arguments; keeping
        the command line's model arguments lets :meth:`before_instantiate_classes` undo that merge.
        """
        super().parse_arguments(parser, args)
        config = self._run_config()
        self._given_model: Optional[Namespace] = None
        if config.get("ckpt_path") and config.get("model") is not None:
            check_checkpoint_hparams(config.ckpt_path, config.model.as_dict())
            self._given_model = config.model.clone()

    def before_instantiate_classes(self) -> None:
        """Check the precision and the data root before any model is built or downloaded."""
        config = self._run_config()
        if getattr(self, "_given_model", None) is not None:
            # The command line's run options (fp_agreement, pretrained, ...) win over the checkpoint's.
            config.model = self._given_model
        precision = (config.get("trainer") or Namespace()).get("precision")
        if precision is not None:
            check_precision(precision)
        data_args = (config.get("data") or Namespace()).get("init_args")
        if isinstance(data_args, Namespace) and "root" in data_args:
            check_data_root(data_args.root)


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
