"""Offline demo data: scikit-learn's 8x8 handwritten digits, upsampled for a small ViT."""

from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules.imagenet import calibration_subset
from fqvit_pl.checks import check_int
from fqvit_pl.distributed import eval_sampler

__all__ = ["DigitsDataModule"]

_MAX_PIXEL = 16.0  # load_digits pixels are integers 0..16


def _three_channels(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 3, H, W)`` view; stores one channel, collate stacks real copies."""
    return images.expand(-1, 3, -1, -1)


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 scikit-learn digits (10 classes) as a tiny in-memory image dataset.

    Each 8x8 image is scaled to [0, 1] (``x / 16``), upsampled bilinearly to
    ``img_size x img_size``, normalized with mean 0.5 / std 0.5 and replicated to 3 channels.
    Loaders yield ``(images, labels)``: float32 ``(B, 3, img_size, img_size)`` and int64 ``(B,)``
    in 0..9. The train/val split is a permutation seeded by ``seed``; val gets
    ``round(n * val_fraction)`` images, train the rest. ``calibration_dataloader`` yields
    ``num_calib_batches`` batches of ``calib_batch_size`` train images in a seeded order.

    Args:
        img_size: output image side (>= 8).
        batch_size: batch size of the train/val/test loaders.
        num_workers: loader worker processes.
        val_fraction: share of images in the val split, in (0, 1).
        calib_batch_size: batch size of the calibration loader.
        num_calib_batches: number of calibration batches.
        seed: seeds the split, the train shuffle and the calibration order.
        limit: keep only the first ``limit`` images (quick tests); ``None`` keeps all.
    """

    num_classes: int = 10

    def __init__(
        self,
        img_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        calib_batch_size: int = 32,
        num_calib_batches: int = 4,
        seed: int = 0,
        limit: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_int("img_size", img_size, 8)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("calib_batch_size", calib_batch_size, 1)
        check_int("num_calib_batches", num_calib_batches, 1)
        if limit is not None:
            check_int("limit", limit, 2)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(
                f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}"
            )
        self.save_hyperparameters()
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.calib_batch_size = calib_batch_size
        self.num_calib_batches = num_calib_batches
        self.seed = seed
        self.limit = limit
        self.train_dataset: Optional[TensorDataset] = None
        self.val_dataset: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, preprocess and split the digits once (idempotent)."""
        if self.train_dataset is not None:
            return
        digits = load_digits()
        pixels = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        if self.limit is not None:
            pixels, labels = pixels[: self.limit], labels[: self.limit]
        n = len(labels)
        n_val = round(n * self.val_fraction)
        if not 0 < n_val < n:
            raise ValueError(
                f"val_fraction={self.val_fraction} of {n} images leaves an empty split ({n_val} val images)"
            )
        images = F.interpolate(
            pixels.unsqueeze(1) / _MAX_PIXEL,
            size=(self.img_size, self.img_size),
            mode="bilinear",
            align_corners=False,
        )
        images = (images - 0.5) / 0.5
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.val_dataset = TensorDataset(_three_channels(images[val_idx]), labels[val_idx])
        self.train_dataset = TensorDataset(_three_channels(images[train_idx]), labels[train_idx])

    def _loader(
        self, split: str, batch_size: int, shuffle: bool, drop_last: bool, calibration: bool = False
    ) -> DataLoader:
        self.setup()  # lets a loader be requested without a prior setup(), e.g. by a callback
        dataset: Dataset = self.train_dataset if split == "train" else self.val_dataset
        if calibration:
            dataset = calibration_subset(
                dataset,
                self.num_calib_batches,
                self.calib_batch_size,
                self.seed,
                source="the digits train split",
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=eval_sampler(dataset) if split == "val" else None,
            drop_last=drop_last,
            num_workers=self.num_workers,
            # The calibration loader is iterated once; its workers need not persist.
            persistent_workers=self.num_workers > 0 and not calibration,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Train split, shuffled by a generator seeded with ``seed``."""
        return self._loader("train", self.batch_size, True, False)

    def val_dataloader(self) -> DataLoader:
        """Val split in order, every image once."""
        return self._loader("val", self.batch_size, False, False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """``num_calib_batches`` batches of ``calib_batch_size`` train images, seeded order."""
        return self._loader("train", self.calib_batch_size, False, True, calibration=True)
