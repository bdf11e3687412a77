"""Reader of the CIFAR-10 python release: ``cifar-10-python.tar.gz`` or its extracted folder.

The tar archive is streamed, member by member, and never extracted; each batch file is read
within its size limit (:data:`MAX_BATCH_BYTES`, :data:`MAX_META_BYTES`) and unpickled by an
unpickler that only builds numpy arrays.
"""

from __future__ import annotations

import codecs
import importlib
import io
import lzma
import pickle
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad.data.errors import DatasetError, dataset_error, describe
from metagrad.data.images import (
    CIFAR10_CHANNELS,
    CIFAR10_MEAN,
    CIFAR10_SIDE,
    CIFAR10_STD,
    ImageDataset,
    checked_dataset,
    too_few_classes,
)
from metagrad.data.safe_read import check_member_name, read_bounded, read_file

__all__ = [
    "ARCHIVE_NAME",
    "BATCHES_DIR",
    "BATCH_FILES",
    "MAX_BATCH_BYTES",
    "MAX_META_BYTES",
    "release_from_dir",
    "release_from_tar",
]

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
"""The files of the release, in the order they are read."""
MAX_BATCH_BYTES = 64 << 20
"""Largest CIFAR-10 python batch file read.

A real batch is a pickle of 10000 images of 3072 bytes plus their labels and file names; twice
that size leaves room for batches re-pickled with other protocols.
"""
MAX_META_BYTES = 1 << 20
"""Largest ``batches.meta`` read: it holds only the class names and two counts."""


# --------------------------------------------------------------------------- restricted unpickling


def _numpy_attr(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that has it (numpy 2 moved ``core`` to ``_core``)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {modules} provides {name}")


def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle may reference: what numpy arrays need."""
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    reconstruct = _numpy_attr("_reconstruct", *multiarray)
    scalar = _numpy_attr("scalar", *multiarray)
    frombuffer = _numpy_attr("_frombuffer", *numeric)  # arrays pickled with protocol 5
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 with protocol < 3
    }
    for module in multiarray:
        allowed[module, "_reconstruct"] = reconstruct
        allowed[module, "scalar"] = scalar
    for module in numeric:
        allowed[module, "_frombuffer"] = frombuffer
    return allowed


_SAFE_GLOBALS = _safe_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays, dicts, lists and strings, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name} (only numpy arrays are allowed)"
            ) from None


def _load_pickle(raw: bytes, where: str) -> Any:
    """Unpickle CIFAR batch bytes (``encoding="bytes"``, as the Python 2 release needs)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # corrupt or hostile pickles raise many exception types
        raise dataset_error(
            where, f"expected a pickled CIFAR-10 batch, cannot unpickle: {exc}"
        ) from exc


# --------------------------------------------------------------------------- batches


def _parse_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images n×3×32×32 uint8, labels int64) from one unpickled data/test batch."""
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise dataset_error(where, "expected a dict with b'data' and b'labels'")
    data, labels = obj[b"data"], obj[b"labels"]
    row = CIFAR10_CHANNELS * CIFAR10_SIDE * CIFAR10_SIDE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise dataset_error(where, f"expected b'data' as uint8 (n, {row}), got {describe(data)}")
    if data.shape[1] != row:
        raise dataset_error(where, f"expected b'data' as uint8 (n, {row}), got {describe(data)}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise dataset_error(where, f"expected b'labels' as a list of ints: {exc}") from exc
    if labels.shape != (len(data),):
        raise dataset_error(where, f"expected {len(data)} labels, got shape {labels.shape}")
    return data.reshape(-1, CIFAR10_CHANNELS, CIFAR10_SIDE, CIFAR10_SIDE), labels


def _parse_meta(obj: Any, where: str) -> list[str]:
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not names:
        raise dataset_error(where, "expected a dict with a non-empty b'label_names' list")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError as exc:
        raise dataset_error(where, f"expected UTF-8 label names: {exc}") from exc


def _batch_limit(name: str) -> tuple[int, str]:
    """(byte limit, kind) of the release file ``name``."""
    if name == _META:
        return MAX_META_BYTES, f"{_META} file"
    return MAX_BATCH_BYTES, "CIFAR-10 batch file"


def _release_dataset(source: Path, files: dict[str, tuple[str, bytes]]) -> ImageDataset:
    """Assemble the dataset from ``{batch file name: (display path, raw bytes)}``."""
    classes = _parse_meta(_load_pickle(files[_META][1], files[_META][0]), files[_META][0])
    if len(classes) < 2:
        raise dataset_error(files[_META][0], too_few_classes(classes))
    splits: dict[str, tuple[Tensor, Tensor]] = {}
    for split, names in (("train", _TRAIN_BATCHES), ("test", (_TEST_BATCH,))):
        images, labels = [], []
        for name in names:
            where, raw = files[name]
            batch_images, batch_labels = _parse_batch(_load_pickle(raw, where), where)
            if ((batch_labels < 0) | (batch_labels >= len(classes))).any():
                raise dataset_error(
                    where, f"expected labels in [0, {len(classes)}) (from batches.meta)"
                )
            images.append(batch_images)
            labels.append(batch_labels)
        splits[split] = (
            torch.from_numpy(np.concatenate(images)),
            torch.from_numpy(np.concatenate(labels)),
        )
    return checked_dataset(
        source, *splits["train"], *splits["test"], classes, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )


def _missing(source: Path, files: Iterable[str]) -> DatasetError:
    return dataset_error(
        source, f"expected the CIFAR-10 python batches, missing {', '.join(files)}"
    )


# --------------------------------------------------------------------------- readers


def release_from_dir(folder: Path) -> ImageDataset:
    """The dataset of an extracted ``cifar-10-batches-py/`` folder."""
    missing = [name for name in BATCH_FILES if not (folder / name).is_file()]
    if missing:
        raise _missing(folder, missing)
    files = {}
    for name in BATCH_FILES:
        path = folder / name
        files[name] = (str(path), read_file(path, *_batch_limit(name)))
    return _release_dataset(folder, files)


def release_from_tar(archive: Path) -> ImageDataset:
    """The dataset of ``cifar-10-python.tar.gz`` (any tar), read in one pass, nothing extracted."""
    files: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # streaming: one pass, nothing extracted
            for member in tar:
                check_member_name(archive, member.name)
                name = PurePosixPath(member.name).name
                if not (member.isfile() and name in BATCH_FILES):
                    continue
                if name in files:
                    raise dataset_error(
                        archive, f"expected one {name}, found a second at {member.name}"
                    )
                stream = tar.extractfile(member)
                assert stream is not None  # regular files always have a stream
                where = f"{archive} (member {member.name})"
                limit, kind = _batch_limit(name)
                files[name] = (where, read_bounded(stream, member.size, limit, where, kind))
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise dataset_error(
            archive, f"expected a readable {ARCHIVE_NAME} (tar) archive: {exc}"
        ) from exc
    missing = [name for name in BATCH_FILES if name not in files]
    if missing:
        raise _missing(archive, missing)
    return _release_dataset(archive, files)
