"""The image dataset every image reader returns, and the CIFAR-10 image format.

:class:`ImageDataset` holds train and test uint8 images with their labels, the class names and
the per-channel statistics that :func:`~metagrad.data.loader.normalize` uses; it refuses content
no classifier can learn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metagrad.data.errors import DatasetError, dataset_error, describe

__all__ = [
    "CIFAR10_CHANNELS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_SIDE",
    "CIFAR10_STD",
    "SPLITS",
    "ImageDataset",
    "checked_dataset",
    "too_few_classes",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
CIFAR10_SIDE = 32
"""CIFAR images are 32x32 RGB."""
CIFAR10_CHANNELS = 3
SPLITS = ("train", "test")


@dataclass
class ImageDataset:
    """Train/test uint8 N×C×H×W images with int64 labels; per-channel mean/std in [0, 1] units."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split in SPLITS:
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{split}_images must be uint8 N×C×H×W, got {describe(images)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int64 of shape ({len(images)},)")
            if ((labels < 0) | (labels >= self.num_classes)).any():
                raise ValueError(f"{split}_labels must lie in [0, {self.num_classes})")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError("train and test images must have the same C×H×W")
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels})")
        self._check_trainable()

    def _check_trainable(self) -> None:
        """Refuse content no classifier can learn from: fewer than 2 classes, an empty split."""
        if self.num_classes < 2:
            raise DatasetError(too_few_classes(self.classes))
        for split in SPLITS:
            if len(getattr(self, f"{split}_images")) == 0:
                raise DatasetError(f"the {split} split is empty; expected at least one image")
        present = [self.classes[i] for i in self.train_labels.unique().tolist()]
        if len(present) < 2:
            raise DatasetError(f"the train split {too_few_classes(present)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def too_few_classes(classes: Sequence[str]) -> str:
    """``"has only 1 class (cat); classification needs at least 2"``."""
    noun = "class" if len(classes) == 1 else "classes"
    return f"has only {len(classes)} {noun} ({', '.join(classes)}); classification needs at least 2"


def checked_dataset(source: object, *args: Any, **kwargs: Any) -> ImageDataset:
    """``ImageDataset(*args, **kwargs)``, its content errors prefixed with ``source``."""
    try:
        return ImageDataset(*args, **kwargs)
    except DatasetError as exc:
        raise dataset_error(source, str(exc)) from None
