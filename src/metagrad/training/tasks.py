"""What ``metagrad train`` trains a model on, per task of the model registry.

A :class:`Task` loads the run's data, checks the model against it, gives the training batches
(a loader with ``epoch(e, start)``, ``len`` and ``global_batch_size(i)``), the loss and the count
of correct predictions of a batch, evaluates the model on the held-out split, names the metrics
and says what a resumed run's data must match. :func:`task_for_model` picks the task that the
registry records for a model (:func:`metagrad.models.model_task`):

- ``"image"`` (:class:`ImageClassification`): CIFAR-10 or the built-in digits; cross-entropy,
  accuracy in %.
- ``"charlm"`` (:class:`CharLanguageModel`): next-character prediction on a local text (the
  text of Python's documentation by default, see :mod:`metagrad.data.corpus`); cross-entropy over
  every position of a window, in nats per character (``*_loss``) and bits per character
  (``*_bpc``: loss / ln 2), and next-character accuracy (``*_char_acc``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.data import (
    BatchLoader,
    ImageDataset,
    download_cifar10,
    load_cifar10,
    needs_download,
    normalize,
)
from metagrad.data import load_digits_dataset as _load_digits
from metagrad.data.corpus import PYDOC, CharCorpus, WindowLoader, load_char_corpus
from metagrad.models import model_task
from metagrad.parallel import distributed
from metagrad.training.config import ConfigError

if TYPE_CHECKING:
    from metagrad.training.config import TrainConfig

__all__ = [
    "CROP_PADDING",
    "EVAL_BATCH",
    "EVAL_WINDOWS",
    "CharLanguageModel",
    "ImageClassification",
    "Loader",
    "Task",
    "dataset_signature",
    "evaluate",
    "evaluate_windows",
    "load_dataset",
    "task_for_model",
]

EVAL_BATCH = 1000
"""Images per forward pass of the evaluation."""
EVAL_WINDOWS = 64
"""Windows per forward pass of the language model's evaluation."""
CROP_PADDING = 4


class Loader(Protocol):
    """The training batches of one process: what the :class:`~metagrad.training.trainer.Trainer`
    iterates."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...

    def global_batch_size(self, i: int) -> int: ...


class Task(ABC):
    """One kind of training: its data, batches, loss, evaluation and metrics."""

    name: ClassVar[str]

    @abstractmethod
    def load_data(self, cfg: TrainConfig) -> Any:
        """The run's dataset, as ``cfg.data`` says."""

    @abstractmethod
    def model_kwargs(self, data: Any) -> dict[str, int]:
        """``num_classes`` and ``in_channels`` for :func:`~metagrad.models.create_model`."""

    @abstractmethod
    def check_model(self, cfg: TrainConfig, model: nn.Module, data: Any) -> None:
        """Refuse (``ConfigError`` or ``DatasetError``) a model that cannot take the data."""

    @abstractmethod
    def train_loader(
        self,
        cfg: TrainConfig,
        data: Any,
        model: nn.Module,
        device: torch.device,
        shard: tuple[int, int],
    ) -> Loader:
        """This process's training batches (``shard=(rank, world_size)``)."""

    @abstractmethod
    def eval_split(self, data: Any, model: nn.Module, device: torch.device) -> Any:
        """The held-out split, ready for :meth:`evaluate` (on ``device``)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        split: Any,
        amp: torch.dtype | None,
        dist_run: distributed.Distributed | None,
    ) -> tuple[float, float]:
        """Mean loss per target and accuracy (%) over the whole held-out split."""

    @abstractmethod
    def loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the model's outputs ``out`` for targets ``y`` (in float32)."""

    @abstractmethod
    def correct(self, out: Tensor, y: Tensor) -> Tensor:
        """Number of targets predicted right (argmax)."""

    @abstractmethod
    def signature(self, data: Any) -> dict[str, Any]:
        """What a resumed run's dataset must match."""

    @abstractmethod
    def metrics(
        self, train_loss: float, train_acc: float, test_loss: float, test_acc: float
    ) -> dict[str, float]:
        """The metrics of an epoch record (``metrics.jsonl``)."""

    def summary(self, records: list[dict[str, Any]], diverged: bool, data: Any) -> dict[str, Any]:
        """Keys the task adds to ``summary.json``."""
        return {}

    @abstractmethod
    def describe(self, record: dict[str, Any]) -> str:
        """An epoch record in a few words, for the log."""


# --------------------------------------------------------------------------- image classification


def load_dataset(cfg: TrainConfig) -> ImageDataset:
    """``digits`` (built in) or CIFAR-10 from ``cfg.data``, downloading it if asked to."""
    if cfg.data is None:
        raise ConfigError("no dataset: pass --data PATH (CIFAR-10) or --data digits (built in)")
    if cfg.data == "digits":
        return _load_digits(seed=cfg.seed)
    path = Path(cfg.data)
    if cfg.download and needs_download(path):
        path = download_cifar10(path)
    return load_cifar10(path)


def dataset_signature(data: ImageDataset) -> dict[str, Any]:
    """What a resumed run's dataset must match: classes, image shape and split sizes."""
    return {
        "classes": len(data.classes),
        "image_shape": list(data.train_images.shape[1:]),
        "train": len(data.train_images),
        "test": len(data.test_images),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean,
    std,
    amp: torch.dtype | None = None,
    dist_run: distributed.Distributed | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over a whole split (under autocast to ``amp``).

    With ``dist_run`` each rank evaluates its part of the split and the sums are all-reduced.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = len(images)
    spare = images[:1]
    if dist_run is not None:
        lo, hi = distributed.shard_bounds(total, dist_run.rank, dist_run.world_size)
        images, labels = images[lo:hi], labels[lo:hi]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct
    for i in range(0, _calls(total, EVAL_BATCH, dist_run) * EVAL_BATCH, EVAL_BATCH):
        if i >= len(images):  # a call that only keeps the ranks in step
            model(normalize(spare.to(device), mean, std))
            continue
        x = normalize(images[i : i + EVAL_BATCH].to(device), mean, std)
        y = labels[i : i + EVAL_BATCH].to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
    if dist_run is not None:
        sums = distributed.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, correct = sums.tolist()
    return loss_sum / total, 100.0 * correct / total


def _calls(total: int, size: int, dist_run: distributed.Distributed | None) -> int:
    """Forward calls of a rank's evaluation of ``total`` items in batches of ``size``: rank 0's
    (its part is the largest) on every rank, since a sharded model's forward is a collective."""
    if dist_run is not None:
        lo, hi = distributed.shard_bounds(total, 0, dist_run.world_size)
        total = hi - lo
    return -(-total // size)


@dataclass
class _ImageSplit:
    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ImageClassification(Task):
    """Images (CIFAR-10 or digits): random crops and flips, cross-entropy, accuracy."""

    name = "image"

    def load_data(self, cfg: TrainConfig) -> ImageDataset:
        return load_dataset(cfg)

    def model_kwargs(self, data: ImageDataset) -> dict[str, int]:
        return {"num_classes": len(data.classes), "in_channels": data.train_images.shape[1]}

    def check_model(self, cfg: TrainConfig, model: nn.Module, data: ImageDataset) -> None:
        channels, height, width = data.train_images.shape[1:]
        device = next(model.parameters()).device
        probe = torch.zeros(2, channels, height, width, device=device)
        try:
            with torch.no_grad():
                model.eval()(probe)
        except RuntimeError as err:
            raise ConfigError(
                f"model {cfg.model!r} does not accept {channels}x{height}x{width} images "
                f"(from {cfg.data}): {str(err).splitlines()[0]}"
            ) from None

    def train_loader(
        self,
        cfg: TrainConfig,
        data: ImageDataset,
        model: nn.Module,
        device: torch.device,
        shard: tuple[int, int],
    ) -> BatchLoader:
        # On CUDA the uint8 images live on the GPU and are augmented there.
        return BatchLoader(
            data.train_images,
            data.train_labels,
            cfg.batch_size,
            mean=data.mean,
            std=data.std,
            shuffle=True,
            augment=data.train_images.shape[-1] >= 4 * CROP_PADDING,
            seed=cfg.seed,
            device=device if device.type == "cuda" else None,
            shard=shard,
        )

    def eval_split(self, data: ImageDataset, model: nn.Module, device: torch.device) -> _ImageSplit:
        return _ImageSplit(
            data.test_images.to(device), data.test_labels.to(device), data.mean, data.std
        )

    def evaluate(
        self,
        model: nn.Module,
        split: _ImageSplit,
        amp: torch.dtype | None,
        dist_run: distributed.Distributed | None,
    ) -> tuple[float, float]:
        return evaluate(model, split.images, split.labels, split.mean, split.std, amp, dist_run)

    def loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(out.float(), y, reduction=reduction)

    def correct(self, out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(1) == y).sum()

    def signature(self, data: ImageDataset) -> dict[str, Any]:
        return dataset_signature(data)

    def metrics(
        self, train_loss: float, train_acc: float, test_loss: float, test_acc: float
    ) -> dict[str, float]:
        return {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }

    def describe(self, record: dict[str, Any]) -> str:
        return (
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% "
            f"| test acc {record['test_acc']:.2f}%"
        )


# --------------------------------------------------------------------------- character LM


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    amp: torch.dtype | None = None,
    dist_run: distributed.Distributed | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy per target (nats) and accuracy (%) of a language model over N×T
    windows ``inputs`` and their next tokens ``targets``.

    With ``dist_run`` each rank evaluates its part of the windows and the sums are all-reduced.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, spare = targets.numel(), inputs[:1]
    calls = _calls(len(inputs), EVAL_WINDOWS, dist_run)
    if dist_run is not None:
        lo, hi = distributed.shard_bounds(len(inputs), dist_run.rank, dist_run.world_size)
        inputs, targets = inputs[lo:hi], targets[lo:hi]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct
    for i in range(0, calls * EVAL_WINDOWS, EVAL_WINDOWS):
        if i >= len(inputs):  # a call that only keeps the ranks in step
            model(spare.to(device))
            continue
        x = inputs[i : i + EVAL_WINDOWS].to(device)
        y = targets[i : i + EVAL_WINDOWS].to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        sums[0] += F.cross_entropy(out.float().flatten(0, -2), y.flatten(), reduction="sum")
        sums[1] += (out.argmax(-1) == y).sum()
    if dist_run is not None:
        sums = distributed.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, correct = sums.tolist()
    return loss_sum / total, 100.0 * correct / total


def _context(model: nn.Module) -> int:
    context = getattr(model, "context", None)
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"{type(model).__name__} has no context length (a 'context' attribute)")
    return context


def _bpc(nats: float) -> float:
    return nats / math.log(2)


class CharLanguageModel(Task):
    """Next-character prediction on a :class:`~metagrad.data.corpus.CharCorpus`.

    ``--data``: a UTF-8 text file, or ``pydoc`` / nothing for the built-in corpus. Training
    batches are random windows of the model's context (:class:`~metagrad.data.corpus.WindowLoader`);
    the validation split is evaluated in consecutive windows.
    """

    name = "charlm"

    def load_data(self, cfg: TrainConfig) -> CharCorpus:
        if cfg.download:
            raise ConfigError(
                "--download fetches CIFAR-10; a language model reads a local text file "
                f"(--data PATH) or the built-in '{PYDOC}' corpus"
            )
        return load_char_corpus(cfg.data)

    def model_kwargs(self, data: CharCorpus) -> dict[str, int]:
        return {"num_classes": data.vocab_size, "in_channels": data.vocab_size}

    def check_model(self, cfg: TrainConfig, model: nn.Module, data: CharCorpus) -> None:
        data.check_context(_context(model))

    def train_loader(
        self,
        cfg: TrainConfig,
        data: CharCorpus,
        model: nn.Module,
        device: torch.device,
        shard: tuple[int, int],
    ) -> WindowLoader:
        return WindowLoader(
            data.train,
            _context(model),
            cfg.batch_size,
            seed=cfg.seed,
            device=device if device.type == "cuda" else None,
            shard=shard,
        )

    def eval_split(
        self, data: CharCorpus, model: nn.Module, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        x, y = data.eval_windows(_context(model))
        return x.to(device), y.to(device)

    def evaluate(
        self,
        model: nn.Module,
        split: tuple[Tensor, Tensor],
        amp: torch.dtype | None,
        dist_run: distributed.Distributed | None,
    ) -> tuple[float, float]:
        return evaluate_windows(model, *split, amp, dist_run)

    def loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten(), reduction=reduction)

    def correct(self, out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(-1) == y).sum()

    def signature(self, data: CharCorpus) -> dict[str, Any]:
        return data.signature()

    def metrics(
        self, train_loss: float, train_acc: float, test_loss: float, test_acc: float
    ) -> dict[str, float]:
        return {
            "train_loss": train_loss,
            "train_bpc": _bpc(train_loss),
            "train_char_acc": train_acc,
            "test_loss": test_loss,
            "test_bpc": _bpc(test_loss),
            "test_char_acc": test_acc,
        }

    def summary(
        self, records: list[dict[str, Any]], diverged: bool, data: CharCorpus
    ) -> dict[str, Any]:
        bpcs = [r["test_bpc"] for r in records]
        return {
            "final_test_bpc": None if diverged or not bpcs else bpcs[-1],
            "best_test_bpc": min(bpcs) if bpcs else None,
            "corpus": {
                "source": data.source,
                "sha256": data.sha256,
                "train_chars": len(data.train),
                "test_chars": len(data.test),
                "vocab_size": data.vocab_size,
            },
        }

    def describe(self, record: dict[str, Any]) -> str:
        return f"train bpc {record['train_bpc']:.3f} | test bpc {record['test_bpc']:.3f}"


TASKS: dict[str, Task] = {task.name: task for task in (ImageClassification(), CharLanguageModel())}
"""The task of each name of :data:`metagrad.models.TASKS`."""


def task_for_model(name: str) -> Task:
    """The task the registered model ``name`` is trained on."""
    return TASKS[model_task(name)]
