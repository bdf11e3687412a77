"""scikit-learn's 8×8 digits as an :class:`~metagrad.data.images.ImageDataset`: a small offline
demo dataset."""

from __future__ import annotations

import numpy as np
import torch

from metagrad.data.images import ImageDataset

__all__ = ["load_digits_dataset"]


def load_digits_dataset(test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1797 8×8 digits as uint8 N×1×8×8 (0..16 scaled to 0..255).

    The split is stratified and seeded; mean/std come from the train split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    scaled = train_x / 255.0
    return ImageDataset(
        *(torch.from_numpy(np.ascontiguousarray(a)) for a in (train_x, train_y, test_x, test_y)),
        classes=[str(name) for name in digits.target_names],
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
    )
