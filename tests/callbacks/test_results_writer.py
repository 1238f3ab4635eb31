"""The summary line, the results CSV and the ResultsWriter callback; the calibration progress bar."""

import csv
import multiprocessing
import os
import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fqvit_pl.callbacks import QuantCalibration, ResultsWriter
from fqvit_pl.quant import QuantAct, QuantConfig
from fqvit_pl.results import RESULT_COLUMNS, ResultRow, append_result, format_summary

ROW = ResultRow(
    model="deit_small",
    method="minmax",
    ptf=True,
    lis=True,
    bits="8/8/4",
    top1=78.4012,
    top5=94.1,
    calib_seconds=12.34,
    images_per_s=810.25,
    num_images=50000,
)


def test_format_summary():
    assert format_summary(ROW) == (
        "deit_small minmax ptf=True lis=True W/A/Attn=8/8/4 top1=78.40 top5=94.10 "
        "calib=12.3s 810.2 img/s"
    )
    with_fp = ResultRow(
        **{**ROW.__dict__, "fp_top1": 79.85, "fp_agreement": 96.5, "calib_seconds": None}
    )
    assert format_summary(with_fp).endswith(
        "fp_top1=79.85 fp_agreement=96.50 calib=n/a 810.2 img/s"
    )
    # A run that is not the published LayerNorm says so.
    with_eps = ResultRow(**{**ROW.__dict__, "ln_eps": 1e-6})
    assert "W/A/Attn=8/8/4 ln_eps=1e-06 top1=78.40" in format_summary(with_eps)


def test_append_result_writes_header_once_and_rows_in_order(tmp_path):
    path = tmp_path / "new" / "results.csv"
    append_result(path, ROW)
    append_result(path, ResultRow(**{**ROW.__dict__, "method": "omse", "top1": None}))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(RESULT_COLUMNS)
    assert len(rows) == 3
    first = dict(zip(rows[0], rows[1]))
    assert (first["model"], first["ptf"], first["top1"], first["num_images"]) == (
        "deit_small",
        "True",
        "78.4012",
        "50000",
    )
    assert dict(zip(rows[0], rows[2]))["top1"] == ""  # not measured


def test_append_result_refuses_a_foreign_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="has columns"):
        append_result(path, ROW)


class Scaled(pl.LightningModule):
    """Logs fixed metrics under the names QuantViTModule uses; its network is one quantization point."""

    def __init__(self):
        super().__init__()
        self.point = QuantAct(2, QuantConfig("minmax", ptf=False, lis=False).point("activation"))
        self.save_hyperparameters(
            {"model_name": "foreign", "method": "ema", "ptf": False, "lis": False}
        )

    def forward(self, x):
        return self.point(x)

    def validation_step(self, batch, batch_idx):
        self(batch[0])
        self.log("val/top1", 0.25, batch_size=len(batch[0]))
        self.log("val/top5", 0.75, batch_size=len(batch[0]))


def _loader(n=10):
    return DataLoader(TensorDataset(torch.randn(n, 2), torch.zeros(n)), batch_size=4)


def test_results_writer_on_a_foreign_module_uses_hparams_and_logged_metrics(tmp_path):
    path = tmp_path / "r.csv"
    writer, calibration = ResultsWriter(csv_path=str(path)), QuantCalibration()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[calibration, writer],
    )
    with pytest.warns(UserWarning, match="evaluation batches"):
        trainer.validate(Scaled(), dataloaders=_loader())
    row = writer.last_row
    assert (row.model, row.method, row.ptf, row.lis) == ("foreign", "ema", False, False)
    assert row.top1 == pytest.approx(25.0) and row.top5 == pytest.approx(75.0)
    assert row.num_images == 10 and row.images_per_s > 0
    assert row.calib_seconds == calibration.last_calibration_seconds > 0
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_results_writer_is_silent_during_fit_unless_asked(tmp_path):
    class Trainable(Scaled):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.fc(batch[0]).sum()

        def train_dataloader(self):
            return _loader()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    quiet, loud = (
        ResultsWriter(csv_path=str(tmp_path / "q.csv")),
        ResultsWriter(csv_path=None, during_fit=True),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=2,
        num_sanity_val_steps=1,
        callbacks=[QuantCalibration(num_batches=1), quiet, loud],
    )
    trainer.fit(Trainable(), val_dataloaders=_loader())
    assert quiet.last_row is None and not (tmp_path / "q.csv").exists()
    assert loud.last_row is not None and loud.last_row.stage == "fit"


def test_calibration_progress_bar_follows_the_trainer(capsys):
    for enabled in (True, False):
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=enabled,
            callbacks=[QuantCalibration(num_batches=2)],
        )
        with pytest.warns(UserWarning):
            trainer.validate(Scaled(), dataloaders=_loader())
        assert ("Calibration" in capsys.readouterr().err) == enabled


def _slow(function, seconds=0.02):
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slowed


def _append_when_released(path, barrier, index):
    # A slow (e.g. network) file system: every metadata lookup takes 20 ms, which widens any
    # window between "does the file exist?" and writing the header.
    for name in ("exists", "isfile", "getsize"):
        setattr(os.path, name, _slow(getattr(os.path, name)))
    barrier.wait()  # every process appends at the same moment
    append_result(path, ResultRow(**{**ROW.__dict__, "num_images": index}))


def test_processes_appending_to_a_new_csv_at_once_write_one_header(tmp_path):
    # Real processes racing to create the same new file (before: a second header in 60% of trials).
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    writers, trials = 4, 4
    for trial in range(trials):
        path = tmp_path / f"trial{trial}" / "results.csv"
        barrier = context.Barrier(writers)
        processes = [
            context.Process(target=_append_when_released, args=(str(path), barrier, i))
            for i in range(writers)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == list(RESULT_COLUMNS), f"trial {trial}"
        assert len(rows) == 1 + writers, f"trial {trial}: {len(rows) - 1} lines after the header"
        assert sorted(int(dict(zip(rows[0], r))["num_images"]) for r in rows[1:]) == list(
            range(writers)
        )


def test_results_path_that_cannot_take_the_row_is_refused_before_evaluating(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    calibration = QuantCalibration()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[calibration, ResultsWriter(csv_path=str(a_file / "r.csv"))],
    )
    with pytest.raises(NotADirectoryError, match="--results.csv_path .* is a file"):
        trainer.validate(Scaled(), dataloaders=_loader())
    assert calibration.calibration_count == 0
