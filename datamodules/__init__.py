"""LightningDataModules: ImageNet (ImageFolder layout) and the offline sklearn digits demo."""

from datamodules.digits import DigitsDataModule
from datamodules.imagenet import ImageNetDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule"]
