"""The tensor batch pipeline: whole batches augmented and normalized, reproducibly and resumably.

:func:`augment_batch` and :func:`normalize` work on whole batches of tensors (no per-image
Python); :class:`BatchLoader` draws shuffled, augmented, normalized batches from uint8 images
with generators seeded per epoch and batch (:func:`seeded_generator`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad.data.errors import describe
from metagrad.parallel.distributed import shard_bounds

__all__ = ["BatchLoader", "augment_batch", "normalize", "seeded_generator"]

_PERMUTATION_STREAM, _AUGMENT_STREAM = 1, 2  # distinct, non-zero: SeedSequence pads with zeros


def seeded_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (mixed with numpy's SeedSequence).

    Loaders draw each stream of randomness from its own tuple, e.g. ``(seed, epoch, stream,
    batch)`` with a stream number of their own (non-zero: SeedSequence pads with zeros).
    """
    state = np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def augment_batch(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop (zero padding ``padding`` on each side) and random horizontal flip.

    Vectorised: the batch is padded once and gathered with index tensors. Returns the same
    shape and dtype, in channels_last memory format.
    """
    if images.dim() != 4:
        raise ValueError(f"expected B×C×H×W images, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch, _, height, width = images.shape
    device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    rows = offsets[0, :, None] + torch.arange(height, device=device)
    cols = offsets[1, :, None] + torch.arange(width, device=device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=device)[:, None, None]
    rows, cols, index = (t.to(images.device) for t in (rows, cols, index))
    padded = F.pad(images, (padding, padding, padding, padding))
    # Advanced indices around a slice put their dims first: B×H×W×C, viewed as B×C×H×W.
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` as float32 in channels_last memory format.

    uint8 images are scaled to [0, 1] first; floating images are taken to be in [0, 1] already.
    """
    if images.dim() != 4 or len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"expected B×C×H×W images and C means/stds, got shape {tuple(images.shape)}, "
            f"{len(mean)} means, {len(std)} stds"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    x = images.to(dtype=torch.float32, memory_format=torch.channels_last, copy=True)
    if images.dtype == torch.uint8:
        x.div_(255)
    shape = (1, -1, 1, 1)
    x.sub_(torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape))
    return x.div_(torch.tensor(std, dtype=torch.float32, device=x.device).view(shape))


class BatchLoader:
    """Normalized (and optionally augmented) batches from uint8 image and label tensors.

    ``epoch(e)`` shuffles with a generator seeded from ``(seed, e)`` and augments batch ``i``
    with one seeded from ``(seed, e, i)``, so ``epoch(e, start=k)`` yields exactly the batches
    ``k, k+1, ...`` of an uninterrupted ``epoch(e)``.

    ``device`` (e.g. ``"cuda"``): the uint8 images are moved there once, and batches are
    gathered, cropped, flipped and normalized there; the random draws stay on the CPU
    generators, so the batches are the same as on the CPU.

    ``shard=(rank, world_size)``: each batch of ``batch_size`` (the global batch) is drawn and
    augmented exactly as for one process, and this rank gets its ``rank``-th contiguous part
    (``torch.tensor_split``), so N processes together see the batches of one.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 N×C×H×W, got {describe(images)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"expected {len(images)} labels, got shape {tuple(labels.shape)}")
        self.images = images if device is None else images.to(device)
        self.labels = labels.to(device=self.images.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed = seed
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"shard must be (rank, world_size), 0 <= rank < world_size: {shard}")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {world_size} shards")
        self.shard = (rank, world_size)

    def global_batch_size(self, i: int) -> int:
        """Number of samples in batch ``i`` over all shards."""
        return min(self.batch_size, len(self.images) - i * self.batch_size)

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        # A last batch too small to give every shard a sample is dropped.
        return full + (1 if rest >= self.shard[1] and not self.drop_last else 0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x float32 normalized channels_last, y int64)`` from batch ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}], got {start}")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = None
        if self.shuffle:
            generator = seeded_generator(self.seed, epoch, _PERMUTATION_STREAM)
            order = torch.randperm(len(self.images), generator=generator)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            index = slice(lo, hi) if order is None else order[lo:hi].to(self.images.device)
            x, y = self.images[index], self.labels[index]
            if self.augment:
                x = augment_batch(x, seeded_generator(self.seed, epoch, _AUGMENT_STREAM, i))
            if self.shard[1] > 1:
                lo, hi = shard_bounds(len(x), *self.shard)
                x, y = x[lo:hi], y[lo:hi]
            yield normalize(x, self.mean, self.std), y
