"""DigitsDataModule: split sizes, preprocessing, loaders and determinism."""

import pytest
import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentParser
from sklearn.datasets import load_digits

from datamodules import DigitsDataModule

N_DIGITS = 1797


def _rows(dataset):
    """Multiset of (pixels of channel 0, label) rows of a TensorDataset, sorted."""
    images, labels = dataset.tensors
    return sorted(tuple(img[0].flatten().tolist()) + (int(y),) for img, y in zip(images, labels))


@pytest.fixture(scope="module")
def digits8():
    """img_size 8 (no resampling), so expected images are (x / 16 - 0.5) / 0.5 exactly."""
    dm = DigitsDataModule(img_size=8)
    dm.setup()
    return dm


def test_split_sizes_and_partition(digits8):
    n_val = round(N_DIGITS * 0.2)
    assert len(digits8.val_dataset) == n_val
    assert len(digits8.train_dataset) == N_DIGITS - n_val
    raw = load_digits()
    expected = sorted(
        tuple(((torch.as_tensor(img, dtype=torch.float32) / 16 - 0.5) / 0.5).flatten().tolist())
        + (int(y),)
        for img, y in zip(raw.images, raw.target)
    )
    assert sorted(_rows(digits8.train_dataset) + _rows(digits8.val_dataset)) == expected


def test_batches(digits8):
    x, y = next(iter(digits8.train_dataloader()))
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    labels = torch.cat([y for _, y in digits8.val_dataloader()])
    assert len(labels) == round(N_DIGITS * 0.2)  # every val image once
    assert labels.min() >= 0 and labels.max() <= 9
    assert set(labels.tolist()) == set(range(10))
    assert digits8.num_classes == 10


def test_upsampled_images():
    dm = DigitsDataModule(img_size=32, limit=50, val_fraction=0.2)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (10, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    # A 4x bilinear upsample (half-pixel centres) samples each source pixel i at offsets
    # -3/8, -1/8, +1/8, +3/8, so the mean of its 4x4 block is the 1-D filter
    # [1/8, 3/4, 1/8] along each axis, with the border pixel repeated.
    source = (torch.as_tensor(load_digits().images[:50], dtype=torch.float32) / 16 - 0.5) / 0.5
    padded = torch.nn.functional.pad(source.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
    rows = padded[:, :-2] / 8 + padded[:, 1:-1] * 3 / 4 + padded[:, 2:] / 8
    expected = rows[:, :, :-2] / 8 + rows[:, :, 1:-1] * 3 / 4 + rows[:, :, 2:] / 8  # (50, 8, 8)
    blocks = torch.nn.functional.avg_pool2d(x[:, :1], 4)[:, 0]  # (10, 8, 8)
    targets = load_digits().target[:50]
    for block, label in zip(blocks, y):
        distance = (expected - block).abs().amax(dim=(1, 2))
        assert distance.min() < 1e-5
        assert int(targets[distance.argmin()]) == label


def test_determinism_and_seed():
    a, b, c = (
        DigitsDataModule(limit=200),
        DigitsDataModule(limit=200),
        DigitsDataModule(limit=200, seed=1),
    )
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_dataset.tensors[1], b.val_dataset.tensors[1])
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])
    assert not torch.equal(a.val_dataset.tensors[1], c.val_dataset.tensors[1])


def test_calibration_loader(digits8):
    batches = list(digits8.calibration_dataloader())
    assert len(batches) == 4
    assert all(x.shape == (32, 3, 8, 8) for x, _ in batches)
    again = list(DigitsDataModule(img_size=8).calibration_dataloader())  # no explicit setup needed
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(batches, again))
    other = list(DigitsDataModule(img_size=8, seed=5).calibration_dataloader())
    assert not torch.equal(batches[0][0], other[0][0])
    train_rows = set(_rows(digits8.train_dataset))
    for x, y in batches:
        for img, label in zip(x, y):
            assert tuple(img[0].flatten().tolist()) + (int(label),) in train_rows


def test_limit():
    dm = DigitsDataModule(limit=100, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_dataset) == 75 and len(dm.val_dataset) == 25
    assert torch.equal(
        torch.sort(torch.cat([dm.train_dataset.tensors[1], dm.val_dataset.tensors[1]]))[0],
        torch.sort(torch.as_tensor(load_digits().target[:100]))[0],
    )


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"img_size": 4}, "img_size"),
        ({"limit": 0}, "limit"),
        ({"calib_batch_size": 0}, "calib_batch_size"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DigitsDataModule(**kwargs)


def test_too_few_calibration_images():
    dm = DigitsDataModule(limit=20, calib_batch_size=8, num_calib_batches=3)  # 16 train < 24
    with pytest.raises(ValueError, match="24"):
        dm.calibration_dataloader()


def test_trainer_smoke():
    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self.fc(x.flatten(1)).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Linear(), datamodule=DigitsDataModule(img_size=8, limit=300))
    assert "val_acc" in trainer.callback_metrics


def test_arguments_are_cli_configurable():
    parser = ArgumentParser()
    parser.add_class_arguments(DigitsDataModule, "data")
    cfg = parser.parse_args(["--data.limit=100", "--data.val_fraction=0.5"])
    assert cfg.data.limit == 100 and cfg.data.val_fraction == 0.5 and cfg.data.img_size == 32
    assert parser.parse_args([]).data.limit is None
