"""Reader of the CIFAR-10 python release: ``cifar-10-python.tar.gz`` or its extracted folder.

The tar archive is streamed, member by member, and never extracted; each batch file is read
within its size limit (:data:`MAX_BATCH_BYTES`, :data:`MAX_META_BYTES`) and unpickled by an
unpickler that only builds numpy arrays.

A stream cannot skip a member without decompressing it, so every member's declared size is
checked before the reader reads or passes it: a member over :data:`MAX_BATCH_BYTES`, members
declaring more than :data:`MAX_ARCHIVE_BYTES` together, more than :data:`MAX_ARCHIVE_MEMBERS`
members, an extended header over :data:`MAX_HEADER_BYTES` or a sparse member are refused with one
line, before their data is decompressed. Decompression (gzip, bzip2, xz) is incremental, so no
single read inflates more than it returns.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import importlib
import io
import lzma
import pickle
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from metagrad.data.errors import DatasetError, dataset_error, describe, format_size
from metagrad.data.images import (
    CIFAR10_CHANNELS,
    CIFAR10_MEAN,
    CIFAR10_SIDE,
    CIFAR10_STD,
    ImageDataset,
    checked_dataset,
    too_few_classes,
)
from metagrad.data.safe_read import (
    check_declared_size,
    check_member_name,
    read_bounded,
    read_file,
)

__all__ = [
    "ARCHIVE_NAME",
    "BATCHES_DIR",
    "BATCH_FILES",
    "MAX_ARCHIVE_BYTES",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_BATCH_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_META_BYTES",
    "is_tar",
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
MAX_ARCHIVE_BYTES = 1 << 30
"""Most bytes all members of a release archive may declare together: the real release holds
about 178 MB (six batches, the meta file and a readme)."""
MAX_ARCHIVE_MEMBERS = 1024
"""Most members of a release archive read: the real release has 9 (a folder and 8 files)."""
MAX_HEADER_BYTES = 1 << 20
"""Largest extended header (pax, GNU long name) of a tar member: a few names and numbers."""
_HEADER_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


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


# --------------------------------------------------------------------------- bounded tar reading


class _Refused(Exception):
    """A tar header that the reader refuses before tarfile reads what it declares."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses, before tarfile reads their data into memory, extended headers
    over :data:`MAX_HEADER_BYTES` and sparse members (which the release never has)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise _Refused(
                f"an extended tar header of {format_size(self.size)}, larger than the "
                f"{format_size(MAX_HEADER_BYTES)} limit; refusing to read it"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"sparse member {self.name!r}: not a CIFAR-10 release file")
        return super()._proc_member(archive)

    def _refuse_sparse(self, *args: Any) -> None:
        raise _Refused("a sparse member: not a CIFAR-10 release file")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def _decompressed(archive: Path) -> IO[bytes]:
    """``archive``'s bytes, decompressed incrementally (gzip, bzip2 or xz by its magic)."""
    with archive.open("rb") as file:
        magic = file.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return archive.open("rb")


@contextmanager
def _open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    """``archive`` as a tar stream (one pass, nothing extracted) of bounded headers."""
    with (
        _decompressed(archive) as stream,
        tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar,
    ):
        yield tar


def is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive (plain or compressed); reads its first header only,
    bounded (``tarfile.is_tarfile`` would read any extended header it declares whole)."""
    try:
        with _open_tar(path):
            return True
    except _Refused:
        return True
    except _TAR_ERRORS:
        return False


def _check_member(archive: Path, member: tarfile.TarInfo, count: int, total: int) -> None:
    """Refuse, by its declared size and before it is read or passed, the ``count``-th member,
    which brings the sizes declared so far to ``total``."""
    where = f"{archive} (member {member.name})"
    if count > MAX_ARCHIVE_MEMBERS:
        raise dataset_error(
            archive, f"holds more than {MAX_ARCHIVE_MEMBERS} members; not a CIFAR-10 release"
        )
    name = PurePosixPath(member.name).name
    if member.isfile() and name in BATCH_FILES:
        limit, kind = _batch_limit(name)
    else:  # passing a member of a stream decompresses it
        limit, kind = MAX_BATCH_BYTES, "member of the release"
    check_declared_size(member.size, limit, where, kind)
    if total > MAX_ARCHIVE_BYTES:
        raise dataset_error(
            where,
            f"the members so far declare {format_size(total)}, more than the "
            f"{format_size(MAX_ARCHIVE_BYTES)} limit for a release; refusing to read on",
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
    """The dataset of ``cifar-10-python.tar.gz`` (any tar), read in one pass, nothing extracted;
    every member is checked by its declared size before it is read or passed."""
    files: dict[str, tuple[str, bytes]] = {}
    count = total = 0
    try:
        with _open_tar(archive) as tar:
            for member in tar:
                check_member_name(archive, member.name)
                count, total = count + 1, total + member.size
                _check_member(archive, member, count, total)
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
    except _Refused as exc:
        raise dataset_error(archive, str(exc)) from None
    except _TAR_ERRORS as exc:
        raise dataset_error(
            archive, f"expected a readable {ARCHIVE_NAME} (tar) archive: {exc}"
        ) from exc
    missing = [name for name in BATCH_FILES if name not in files]
    if missing:
        raise _missing(archive, missing)
    return _release_dataset(archive, files)
