"""QuantReport in a Trainer: written after the calibrated evaluation, logged to an image logger."""

import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from datamodules import DigitsDataModule
from fqvit_pl.callbacks import QuantCalibration, QuantReport, ResultsWriter
from fqvit_pl.module import QuantViTModule
from fqvit_pl.quant import quant_modules

VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


class ImageLogger(Logger):
    """A logger whose experiment takes images, as TensorBoard's SummaryWriter does."""

    def __init__(self):
        super().__init__()
        self.images, self.metrics = {}, {}
        outer = self

        class Experiment:
            def add_image(self, tag, image, step, dataformats):
                outer.images[tag] = (image.shape, dataformats, step)

        self._experiment = Experiment()

    @property
    def experiment(self):
        return self._experiment

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _trainer(callbacks, logger=False):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _parts():
    torch.manual_seed(0)
    module = QuantViTModule("deit_tiny", num_classes=10, model_kwargs=VIT)
    data = DigitsDataModule(
        img_size=16, batch_size=8, limit=120, calib_batch_size=8, num_calib_batches=2
    )
    return module, data


def test_report_written_after_calibration_whatever_the_callback_order(tmp_path):
    module, data = _parts()
    logger = ImageLogger()
    report = QuantReport(str(tmp_path / "report"), num_batches=2, chunk_size=8)
    writer = ResultsWriter(str(tmp_path / "results.csv"))
    # listed before the calibration (it writes after the evaluation), after the results writer
    # (whose row then is in the cell figure)
    trainer = _trainer([writer, report, QuantCalibration()], logger)
    trainer.validate(module, datamodule=data, verbose=False)
    folder = tmp_path / "report"
    data_json = json.loads((folder / "report.json").read_text())
    assert data_json["output"]["num_images"] == 16
    assert data_json["model"] == {
        "model": "deit_tiny",
        "method": "minmax",
        "ptf": True,
        "lis": True,
        "bits": "8/8/4",
    }
    assert data_json["timing"]["calibration_seconds"] > 0
    # the results CSV of the same trainer gives the cell figure
    assert "table" in data_json["figures"] and (folder / "table.png").is_file()
    assert set(logger.images) == {f"quant_report/{k}" for k in data_json["figures"]}
    shape, layout, _ = logger.images["quant_report/attention"]
    assert layout == "HWC" and shape[2] == 3
    assert logger.metrics["quant_report/fp_agreement"] == data_json["output"]["fp_agreement"]
    assert all(m.is_quantizing for m in quant_modules(module))  # left as validation left it


def test_no_folder_no_report_and_uncalibrated_module_warns(tmp_path):
    module, data = _parts()
    off = QuantReport(None)
    _trainer([QuantCalibration(), off]).validate(module, datamodule=data, verbose=False)
    assert off.last_report is None
    fresh, data = _parts()
    on = QuantReport(str(tmp_path / "r"))
    with pytest.warns(UserWarning, match="not calibrated"):
        _trainer([on]).validate(fresh, datamodule=data, verbose=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="num_batches"):
        QuantReport("x", num_batches=0)


def test_without_figures_only_json_and_markdown(tmp_path):
    module, data = _parts()
    logger = ImageLogger()
    report = QuantReport(str(tmp_path / "report"), figures=False)
    writer = ResultsWriter(str(tmp_path / "results.csv"))
    _trainer([writer, QuantCalibration(), report], logger).validate(
        module, datamodule=data, verbose=False
    )
    folder = tmp_path / "report"
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md"]
    assert report.last_report["figures"] == {}
    assert logger.images == {} and "quant_report/fp_agreement" in logger.metrics
