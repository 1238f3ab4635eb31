"""QuantCalibration in a LightningModule and DataModules that are not fqvit_pl's.

The network is two quantization points around a QuantLinear. Its input point is uint8 minmax
per tensor, so after calibration its scale is (max - min) / 255 of exactly the images it
observed (§4, §5): train images lie in [0, 1], calibration images in [0, 3], validation images in
[-5, 5], which tells from the scale where the calibration batches came from.
"""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fqvit_pl.callbacks import QuantCalibration
from fqvit_pl.quant import QuantAct, QuantConfig, QuantLinear, is_calibrated

CFG = QuantConfig("minmax", ptf=False, lis=False)
FEATURES, CLASSES = 4, 3


def _data(n, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, FEATURES, generator=g)
    x[0].fill_(low)  # the range is then exactly [low, high]
    x[1].fill_(high)
    y = x[:, :CLASSES].argmax(dim=1)
    return TensorDataset(x, y)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = QuantAct(FEATURES, CFG.point("activation"))
        self.fc = QuantLinear(FEATURES, CLASSES, config=CFG.point("weight"))
        self.out = QuantAct(CLASSES, CFG.point("activation"))

    def forward(self, x):
        return self.out(self.fc(self.inp(x)))


class ForeignModule(pl.LightningModule):
    """Records, per step, whether the network was calibrated and quantized."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet()
        self.train_states, self.val_states = [], []

    def forward(self, x):
        return self.body(x)

    def _state(self):
        return is_calibrated(self), bool(self.body.inp.quant_enabled)

    def training_step(self, batch, batch_idx):
        self.train_states.append(self._state())
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.val_states.append(self._state())
        x, y = batch
        self.log("acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ForeignData(pl.LightningDataModule):
    """Train loader of 12 batches in [0, 1]; validation in [-5, 5]; no calibration loader."""

    def __init__(self):
        super().__init__()
        self.train = _data(48, 0.0, 1.0, 0)
        self.val = _data(16, -5.0, 5.0, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)


class ForeignDataWithCalibration(ForeignData):
    def calibration_dataloader(self):
        return DataLoader(_data(12, 0.0, 3.0, 2), batch_size=4)


class ValOnlyData(pl.LightningDataModule):
    def val_dataloader(self):
        return DataLoader(_data(16, -5.0, 5.0, 1), batch_size=8)


def _trainer(**kwargs):
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        **kwargs,
    }
    return pl.Trainer(**kwargs)


def _input_range_scale(low, high):
    return torch.tensor((high - low) / 255)


def test_validate_calibrates_on_the_calibration_loader_and_quantizes():
    model, callback = ForeignModule(), QuantCalibration()
    results = _trainer(callbacks=[callback]).validate(
        model, datamodule=ForeignDataWithCalibration()
    )
    assert callback.calibration_count == 1
    assert model.body.inp.observer.num_batches == 3  # every batch of the calibration loader
    torch.testing.assert_close(model.body.inp.scale, _input_range_scale(0.0, 3.0))
    assert model.val_states == [(True, True)] * 2  # both validation batches ran quantized
    assert callback.last_calibration_images == 12
    assert callback.last_calibration_seconds > 0
    assert results[0]["calibration/seconds"] == pytest.approx(callback.last_calibration_seconds)
    assert "ForeignDataWithCalibration.calibration_dataloader()" in callback.last_calibration_source


def test_without_calibration_loader_uses_train_loader_limited_to_num_batches():
    model, callback = ForeignModule(), QuantCalibration(num_batches=5)
    _trainer(callbacks=[callback]).validate(model, datamodule=ForeignData())
    assert model.body.inp.observer.num_batches == 5
    assert "train_dataloader" in callback.last_calibration_source
    assert callback.last_calibration_images == 20
    # Train images lie in [0, 1] (validation ones in [-5, 5]).
    assert 0 < model.body.inp.scale <= _input_range_scale(0.0, 1.0)


def test_train_loader_default_is_ten_batches():
    model = ForeignModule()
    _trainer(callbacks=[QuantCalibration()]).validate(model, datamodule=ForeignData())
    assert model.body.inp.observer.num_batches == 10


def test_falls_back_to_validation_batches_with_a_warning():
    model, callback = ForeignModule(), QuantCalibration()
    with pytest.warns(UserWarning, match="calibrating on the evaluation batches"):
        _trainer(callbacks=[callback]).validate(model, datamodule=ValOnlyData())
    torch.testing.assert_close(model.body.inp.scale, _input_range_scale(-5.0, 5.0))
    assert callback.last_calibration_source == "the validate loader"


def test_plain_dataloaders_without_datamodule_fall_back_to_them():
    model = ForeignModule()
    loader = DataLoader(_data(16, -5.0, 5.0, 1), batch_size=8)
    with pytest.warns(UserWarning, match="calibrating on the evaluation batches"):
        _trainer(callbacks=[QuantCalibration()]).validate(model, dataloaders=loader)
    assert is_calibrated(model)


def test_batch_to_input_extracts_from_dict_batches():
    class DictData(pl.LightningDataModule):
        def calibration_dataloader(self):
            return [
                {"image": torch.full((2, FEATURES), 2.0), "label": None},
                {"image": torch.full((2, FEATURES), -2.0), "label": None},
            ]

        def val_dataloader(self):
            return DataLoader(_data(8, 0.0, 1.0, 3), batch_size=8)

    model = ForeignModule()
    callback = QuantCalibration(batch_to_input=lambda batch: batch["image"])
    _trainer(callbacks=[callback]).validate(model, datamodule=DictData())
    torch.testing.assert_close(model.body.inp.scale, _input_range_scale(-2.0, 2.0))


def test_already_calibrated_model_is_not_recalibrated_unless_asked():
    model = ForeignModule()
    first = QuantCalibration()
    _trainer(callbacks=[first]).validate(model, datamodule=ForeignDataWithCalibration())
    scale = model.body.inp.scale.clone()
    second = QuantCalibration()
    data = ForeignData()  # its train loader would give another scale
    _trainer(callbacks=[second]).validate(model, datamodule=data)
    assert second.calibration_count == 0 and second.last_calibration_seconds is None
    torch.testing.assert_close(model.body.inp.scale, scale)
    again = QuantCalibration(recalibrate=True)
    _trainer(callbacks=[again]).validate(model, datamodule=data)
    assert again.calibration_count == 1
    assert model.body.inp.scale < scale


def test_fit_recalibrates_each_validation_epoch_and_trains_in_float(tmp_path):
    model, callback = ForeignModule(), QuantCalibration(num_batches=2)
    trainer = _trainer(
        callbacks=[callback], max_epochs=3, limit_train_batches=3, num_sanity_val_steps=1
    )
    trainer.fit(model, datamodule=ForeignData())
    assert callback.calibration_count == 3  # one per validation epoch, none for the sanity check
    assert len(model.train_states) == 9
    assert set(model.train_states) == {(False, False)}  # float, and no stale calibration
    assert model.val_states == [(True, True)] * 6
    # After fit: calibrated for the final weights, quantization off again.
    assert is_calibrated(model) and not bool(model.body.inp.quant_enabled)


def test_checkpoint_of_calibrated_model_validates_identically_without_calibration(tmp_path):
    model = ForeignModule()
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="last", enable_version_counter=False
    )
    trainer = _trainer(
        callbacks=[QuantCalibration(num_batches=2), checkpoint],
        enable_checkpointing=True,
        max_epochs=2,
        limit_train_batches=3,
    )
    trainer.fit(model, datamodule=ForeignData())
    fit_acc = float(trainer.callback_metrics["acc"])

    restored, callback = ForeignModule(), QuantCalibration()
    results = _trainer(callbacks=[callback]).validate(
        restored, datamodule=ForeignData(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert callback.calibration_count == 0
    assert results[0]["acc"] == fit_acc
    for name, tensor in model.state_dict().items():  # weights and every calibration buffer
        if not name.endswith("quant_enabled"):  # fit switched quantization off again, validate on
            torch.testing.assert_close(restored.state_dict()[name], tensor, msg=name)


def test_save_path_checkpoint_evaluates_without_calibration_data(tmp_path):
    path = tmp_path / "calibrated.ckpt"
    model = ForeignModule()
    first = _trainer(callbacks=[QuantCalibration(save_path=str(path))]).validate(
        model, datamodule=ForeignDataWithCalibration()
    )
    callback = QuantCalibration()
    again = _trainer(callbacks=[callback]).validate(
        ForeignModule(), datamodule=ValOnlyData(), ckpt_path=str(path)
    )
    assert callback.calibration_count == 0  # no calibration data needed, no fallback warning
    assert again[0]["acc"] == first[0]["acc"]


def test_checkpoint_saved_after_training_steps_is_not_calibrated(tmp_path):
    model, callback = ForeignModule(), QuantCalibration(num_batches=2)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path,
        filename="last",
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    # Validation after the 2nd of 3 training steps; the checkpoint is written after the 3rd.
    trainer = _trainer(
        callbacks=[callback, checkpoint],
        enable_checkpointing=True,
        max_epochs=1,
        limit_train_batches=3,
        val_check_interval=2,
    )
    trainer.fit(model, datamodule=ForeignData())
    assert callback.calibration_count == 1 and len(model.train_states) == 3
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not bool(state["body.inp.calibrated"])


def test_module_without_quant_layers_is_an_error():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(FEATURES, CLASSES)

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(ValueError, match="Plain contains no fqvit_pl.quant layers"):
        _trainer(callbacks=[QuantCalibration()]).validate(Plain(), datamodule=ForeignData())


def test_num_batches_must_be_positive():
    with pytest.raises(ValueError, match="num_batches"):
        QuantCalibration(num_batches=0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true"])
def test_precisions_other_than_float32_are_refused_before_calibrating(precision):
    callback = QuantCalibration(num_batches=1)
    with pytest.raises(
        ValueError, match="--trainer.precision .* fake quantization is defined in float32"
    ):
        _trainer(callbacks=[callback], precision=precision).validate(
            ForeignModule(), datamodule=ForeignData()
        )
    assert callback.calibration_count == 0


def test_save_path_into_a_folder_is_refused_before_calibrating(tmp_path):
    callback = QuantCalibration(num_batches=1, save_path=str(tmp_path))
    with pytest.raises(IsADirectoryError, match="--calibration.save_path"):
        _trainer(callbacks=[callback]).validate(ForeignModule(), datamodule=ForeignData())
    assert callback.calibration_count == 0 and list(tmp_path.iterdir()) == []
