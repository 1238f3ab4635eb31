"""ImageNet (ImageFolder layout) for calibration and evaluation of FQ-ViT models."""

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from fqvit_pl.checks import check_int
from fqvit_pl.distributed import eval_sampler
from fqvit_pl.models.preprocess import create_eval_transform, resolve_data_config

__all__ = ["ImageNetDataModule", "calibration_subset", "strict_pil_loader", "to_rgb"]

_TRAIN_TRANSFORMS = ("eval", "augment")


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    """``image`` as 8-bit RGB, with 16-bit grey images scaled (``round(v * 255 / 65535)``).

    ``convert("RGB")`` alone clips 16-bit grey values above 255, which turns such images white.
    (Pillow reads 16-bit RGB PNGs as 8-bit RGB itself, keeping each value's high byte.)

    Raises:
        RuntimeError: 32-bit integer or floating-point pixels (no defined 8-bit scale), naming ``path``.
    """
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image, dtype=np.int64)
        # (v + 128) // 257 == round(v / 257) == round(v * 255 / 65535); exact ties cannot occur.
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        raise RuntimeError(
            f"cannot use image {path}: its pixels are 32-bit {'integers' if image.mode == 'I' else 'floats'}, "
            "which have no defined 8-bit scale; convert it to an 8- or 16-bit image"
        )
    return image.convert("RGB")


def strict_pil_loader(path: str) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image (see :func:`to_rgb`); any decode failure names the file.

    Module-level (not a lambda) so that datasets using it pickle into worker processes.

    Raises:
        RuntimeError: ``"cannot decode image {path}: {err}"`` for unreadable, truncated
            or non-image files; ``"cannot use image {path}: ..."`` for 32-bit pixels.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            # load() forces the full decode inside the try: Image.open is lazy.
            image.load()
            return to_rgb(image, path)
    except OSError as err:  # UnidentifiedImageError is an OSError
        raise RuntimeError(f"cannot decode image {path}: {err}") from err


def calibration_subset(
    dataset: Dataset, num_batches: int, batch_size: int, seed: int, source: str
) -> Subset:
    """The first ``num_batches * batch_size`` items of a seeded permutation of ``dataset``.

    The permutation is ``torch.randperm(len(dataset), generator=Generator().manual_seed(seed))``,
    the same order a ``DataLoader(shuffle=True)`` with that generator yields in its first
    epoch; it depends only on the seed and the dataset size, not on worker count or global RNG.

    Raises:
        ValueError: the dataset holds fewer items than requested (``source`` names it).
    """
    needed = num_batches * batch_size
    if len(dataset) < needed:
        raise ValueError(
            f"calibration needs {num_batches} batches of {batch_size} = {needed} images, "
            f"but {source} has only {len(dataset)}"
        )
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:needed]
    return Subset(dataset, indices.tolist())


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet-style ``root/{train,val}/<class>/<image>`` data for FQ-ViT.

    Every loader yields ``(images, labels)`` with images float32 ``(B, 3, img_size, img_size)``
    normalized with the §10 mean/std of ``model_name`` and labels int64 ``(B,)`` (class index
    in sorted folder-name order, as ``ImageFolder``).

    - ``val_dataloader`` / ``test_dataloader``: the val split, eval transform, in order,
      every image once (``drop_last=False``).
    - ``train_dataloader``: the train split, shuffled by a generator seeded with ``seed``;
      transform ``"eval"`` (§10) or ``"augment"`` (timm's training transform, same mean/std).
    - ``calibration_dataloader``: §9 -- ``num_calib_batches`` batches of ``calib_batch_size``
      train images with the eval transform, order fixed by ``seed``, ``drop_last``.

    ``setup`` checks the splits its stage needs (fit: train and val; validate/test/predict:
    val only, so a calibrated checkpoint can be evaluated without the train split); the train
    split for calibration is checked when ``calibration_dataloader`` is first called. A train
    split smaller than ``num_calib_batches * calib_batch_size`` is an error rather than a
    silently smaller calibration set, since that would change the published protocol.
    Undecodable images raise ``RuntimeError`` naming the file when the loader reaches them.

    Args:
        root: folder holding ``train/`` and ``val/``.
        model_name: selects the preprocessing, see ``fqvit_pl.models.preprocess``.
        img_size: network input side.
        batch_size: batch size of the train/val/test loaders.
        num_workers: loader worker processes.
        calib_batch_size: batch size of the calibration loader.
        num_calib_batches: number of calibration batches.
        seed: seeds the calibration order and the train shuffle.
        train_transform: ``"eval"`` or ``"augment"``.
        pin_memory: pin batches (only takes effect when CUDA is available).
    """

    def __init__(
        self,
        root: str,
        model_name: str = "deit_small",
        img_size: int = 224,
        batch_size: int = 100,
        num_workers: int = 8,
        calib_batch_size: int = 100,
        num_calib_batches: int = 10,
        seed: int = 0,
        train_transform: str = "eval",
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        check_int("img_size", img_size)
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        check_int("calib_batch_size", calib_batch_size)
        check_int("num_calib_batches", num_calib_batches)
        if train_transform not in _TRAIN_TRANSFORMS:
            raise ValueError(
                f"train_transform must be one of {_TRAIN_TRANSFORMS}, got {train_transform!r}"
            )
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.model_name = model_name
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.calib_batch_size = calib_batch_size
        self.num_calib_batches = num_calib_batches
        self.seed = seed
        self.train_transform = train_transform
        self.pin_memory = pin_memory
        # Resolved now so that an unknown model name fails at construction, not mid-run.
        self.data_config = resolve_data_config(model_name, img_size)
        self._datasets: Dict[Tuple[str, str], ImageFolder] = {}

    # -- datasets -------------------------------------------------------------------------

    def _transform(self, kind: str) -> Callable:
        if kind == "eval":
            return create_eval_transform(self.data_config)
        return create_transform(
            input_size=self.data_config["input_size"],
            is_training=True,
            interpolation=self.data_config["interpolation"],
            mean=self.data_config["mean"],
            std=self.data_config["std"],
        )

    def _dataset(self, split: str, kind: str) -> ImageFolder:
        """The ``split`` ImageFolder with transform ``kind``, built and checked once."""
        key = (split, kind)
        if key not in self._datasets:
            if not os.path.isdir(self.root):
                raise FileNotFoundError(
                    f"dataset root {self.root!r} does not exist or is not a folder"
                )
            split_dir = os.path.join(self.root, split)
            if not os.path.isdir(split_dir):
                raise FileNotFoundError(f"split folder {split_dir!r} does not exist")
            try:
                dataset = ImageFolder(
                    split_dir, transform=self._transform(kind), loader=strict_pil_loader
                )
            except FileNotFoundError as err:  # no class folders, or a class folder without images
                raise FileNotFoundError(
                    f"split folder {split_dir!r} has no usable images: {err}"
                ) from err
            self._check_same_classes(split, dataset)
            self._datasets[key] = dataset
        return self._datasets[key]

    def _check_same_classes(self, split: str, dataset: ImageFolder) -> None:
        # Labels are folder indices, so train and val must list the same class folders.
        for (other_split, _), other in self._datasets.items():
            if other_split != split and other.classes != dataset.classes:
                only_here = sorted(set(dataset.classes) - set(other.classes))
                only_there = sorted(set(other.classes) - set(dataset.classes))
                raise ValueError(
                    f"class folders differ between {os.path.join(self.root, split)!r} and "
                    f"{os.path.join(self.root, other_split)!r}: only in {split}: {only_here[:10]}, "
                    f"only in {other_split}: {only_there[:10]}"
                )

    @property
    def num_classes(self) -> int:
        """Number of class folders of the val split (train, when used, has the same ones)."""
        return len(self._dataset("val", "eval").classes)

    def setup(self, stage: Optional[str] = None) -> None:
        """Index and check the splits the stage needs (see the class docstring)."""
        if stage in (None, "fit"):
            self._dataset("train", self.train_transform)
        self._dataset("val", "eval")

    # -- loaders --------------------------------------------------------------------------

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        persistent: bool = True,
        evaluation: bool = False,
    ) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=eval_sampler(dataset) if evaluation else None,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Train split, shuffled (seeded), batches of ``batch_size``."""
        return self._loader(
            self._dataset("train", self.train_transform), self.batch_size, True, False
        )

    def val_dataloader(self) -> DataLoader:
        """Val split, eval transform, in order, every image exactly once (also over several processes)."""
        return self._loader(
            self._dataset("val", "eval"), self.batch_size, False, False, evaluation=True
        )

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (ImageNet's test labels are not public)."""
        return self.val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """§9 calibration images: exactly ``num_calib_batches`` batches of ``calib_batch_size``.

        Train split with the eval transform; the images and their order depend only on
        ``seed``. Raises ``ValueError`` when the train split is too small.
        """
        dataset = self._dataset("train", "eval")
        source = f"train split {os.path.join(self.root, 'train')!r}"
        subset = calibration_subset(
            dataset, self.num_calib_batches, self.calib_batch_size, self.seed, source
        )
        # Iterated once per calibration, so worker processes need not outlive it.
        return self._loader(subset, self.calib_batch_size, False, True, persistent=False)
