"""Datasets and a tensor batch pipeline.

- :func:`load_cifar10` reads CIFAR-10 from the official python release (``cifar-10-python.tar.gz``
  or its extracted ``cifar-10-batches-py/``) or from an image-folder layout
  (``train/<class>/*``, ``test/<class>/*``) as a directory or a ``.zip``. It decodes once into
  uint8 tensors and caches them as a ``.pt`` file.
- :func:`download_cifar10` fetches the official release and checks its md5.
- :func:`load_digits_dataset` is scikit-learn's 8x8 digits: a small offline demo dataset.
- :func:`augment_batch`, :func:`normalize` and :class:`BatchLoader` work on whole batches of
  tensors (no per-image Python), reproducibly and resumably.

Safety: archives are read in memory, member by member, and never extracted (members with absolute
paths or ``..`` are refused anyway); a member or file larger than its format allows
(:data:`MAX_BATCH_BYTES`, :data:`MAX_META_BYTES`, :data:`MAX_IMAGE_BYTES`) is refused before it is
read, and reads stop at the limit whatever a header claims; pickled batches go through an
unpickler that only builds numpy arrays. Every problem with a dataset raises :class:`DatasetError`
with one line that names the path and what was expected.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import importlib
import io
import logging
import lzma
import os
import pickle
import re
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from metagrad.checkpoint import CheckpointError, atomic_write
from metagrad.parallel.distributed import shard_bounds

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "MAX_BATCH_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_META_BYTES",
    "BatchLoader",
    "DatasetError",
    "ImageDataset",
    "augment_batch",
    "download_cifar10",
    "load_cifar10",
    "load_digits_dataset",
    "needs_download",
    "normalize",
]

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
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

_ARCHIVE_NAME = "cifar-10-python.tar.gz"
_BATCHES_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
_SIDE = 32  # CIFAR images are 32x32 RGB
_CHANNELS = 3
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_SPLITS = ("train", "test")
_CACHE_FORMAT = 1  # bump when the decoded content or the cache layout changes
MAX_BATCH_BYTES = 64 << 20
"""Largest CIFAR-10 python batch file read.

A real batch is a pickle of 10000 images of 3072 bytes plus their labels and file names; twice
that size leaves room for batches re-pickled with other protocols.
"""
MAX_META_BYTES = 1 << 20
"""Largest ``batches.meta`` read: it holds only the class names and two counts."""
MAX_IMAGE_BYTES = 4 << 20
"""Largest image file of an image folder read.

Images must be 32x32, whose pixels take 3 KiB; the rest of the allowance is for the metadata
(ICC profiles, EXIF thumbnails) that cameras and editors embed. Images are read and decoded one
at a time, so this also bounds the memory a hostile file can take. No total cap is needed: the
python release is a fixed set of files, and an image costs 3 KiB of decoded pixels, a small
multiple of its own entry in a directory or zip.
"""
_LAYOUTS = (
    f"expected {_ARCHIVE_NAME}, a {_BATCHES_DIR} folder, a directory containing one of them, "
    "or an image folder (train/<class>/*, test/<class>/*) as a directory or .zip"
)


class DatasetError(ValueError):
    """A dataset could not be read; the message is one line naming the path and the expectation."""


def _error(where: object, message: str) -> DatasetError:
    """A DatasetError whose message is ``"<where>: <message>"`` on a single line."""
    return DatasetError(re.sub(r"\s*\n\s*", " ", f"{where}: {message}"))


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
        for split in _SPLITS:
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{split}_images must be uint8 N×C×H×W, got {_describe(images)}")
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
            raise DatasetError(_too_few_classes(self.classes))
        for split in _SPLITS:
            if len(getattr(self, f"{split}_images")) == 0:
                raise DatasetError(f"the {split} split is empty; expected at least one image")
        present = [self.classes[i] for i in self.train_labels.unique().tolist()]
        if len(present) < 2:
            raise DatasetError(f"the train split {_too_few_classes(present)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _too_few_classes(classes: Sequence[str]) -> str:
    """``"has only 1 class (cat); classification needs at least 2"``."""
    noun = "class" if len(classes) == 1 else "classes"
    return f"has only {len(classes)} {noun} ({', '.join(classes)}); classification needs at least 2"


def _dataset(source: object, *args: Any, **kwargs: Any) -> ImageDataset:
    """``ImageDataset(*args, **kwargs)``, its content errors prefixed with ``source``."""
    try:
        return ImageDataset(*args, **kwargs)
    except DatasetError as exc:
        raise _error(source, str(exc)) from None


def _size(n: int) -> str:
    """``n`` bytes in binary units: ``"4 MiB"``, ``"1.5 GiB"``, ``"812 bytes"``."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.3g} {unit}"


def _read_bounded(stream: IO[bytes], declared: int, limit: int, where: str, kind: str) -> bytes:
    """Read a file or member of ``declared`` size, refusing it unread when over ``limit``.

    At most ``limit + 1`` bytes are read, so a header that understates the size cannot make
    the read exceed the limit either.
    """
    if declared > limit:
        raise _error(
            where,
            f"{_size(declared)} is larger than the {_size(limit)} limit for one {kind}; "
            "refusing to read it",
        )
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise _error(
            where,
            f"holds more than the {_size(limit)} limit for one {kind} although its size is "
            f"given as {_size(declared)}; refusing to read it",
        )
    return raw


def _read_file(path: Path, limit: int, kind: str) -> bytes:
    """A regular file's bytes, refused when its size (or what it holds) exceeds ``limit``."""
    try:
        with path.open("rb") as file:
            return _read_bounded(file, os.fstat(file.fileno()).st_size, limit, str(path), kind)
    except OSError as exc:
        raise _error(path, f"expected a readable {kind}: {exc.strerror or exc}") from exc


def _describe(array: Tensor | np.ndarray | object) -> str:
    if isinstance(array, (Tensor, np.ndarray)):
        return f"{array.dtype} of shape {tuple(array.shape)}"
    return type(array).__name__


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
        raise _error(where, f"expected a pickled CIFAR-10 batch, cannot unpickle: {exc}") from exc


# --------------------------------------------------------------------------- python release


def _parse_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images n×3×32×32 uint8, labels int64) from one unpickled data/test batch."""
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise _error(where, "expected a dict with b'data' and b'labels'")
    data, labels = obj[b"data"], obj[b"labels"]
    row = _CHANNELS * _SIDE * _SIDE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise _error(where, f"expected b'data' as uint8 (n, {row}), got {_describe(data)}")
    if data.shape[1] != row:
        raise _error(where, f"expected b'data' as uint8 (n, {row}), got {_describe(data)}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise _error(where, f"expected b'labels' as a list of ints: {exc}") from exc
    if labels.shape != (len(data),):
        raise _error(where, f"expected {len(data)} labels, got shape {labels.shape}")
    return data.reshape(-1, _CHANNELS, _SIDE, _SIDE), labels


def _parse_meta(obj: Any, where: str) -> list[str]:
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not names:
        raise _error(where, "expected a dict with a non-empty b'label_names' list")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError as exc:
        raise _error(where, f"expected UTF-8 label names: {exc}") from exc


def _batch_limit(name: str) -> tuple[int, str]:
    """(byte limit, kind) of the release file ``name``."""
    if name == _META:
        return MAX_META_BYTES, f"{_META} file"
    return MAX_BATCH_BYTES, "CIFAR-10 batch file"


def _release_dataset(source: Path, files: dict[str, tuple[str, bytes]]) -> ImageDataset:
    """Assemble the dataset from ``{batch file name: (display path, raw bytes)}``."""
    classes = _parse_meta(_load_pickle(files[_META][1], files[_META][0]), files[_META][0])
    if len(classes) < 2:
        raise _error(files[_META][0], _too_few_classes(classes))
    splits: dict[str, tuple[Tensor, Tensor]] = {}
    for split, names in (("train", _TRAIN_BATCHES), ("test", (_TEST_BATCH,))):
        images, labels = [], []
        for name in names:
            where, raw = files[name]
            batch_images, batch_labels = _parse_batch(_load_pickle(raw, where), where)
            if ((batch_labels < 0) | (batch_labels >= len(classes))).any():
                raise _error(where, f"expected labels in [0, {len(classes)}) (from batches.meta)")
            images.append(batch_images)
            labels.append(batch_labels)
        splits[split] = (
            torch.from_numpy(np.concatenate(images)),
            torch.from_numpy(np.concatenate(labels)),
        )
    return _dataset(
        source, *splits["train"], *splits["test"], classes, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse archive members that would land outside a target directory if extracted."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise _error(archive, f"unsafe archive member {name!r}: expected relative paths only")


def _missing(source: Path, files: Iterable[str]) -> DatasetError:
    return _error(source, f"expected the CIFAR-10 python batches, missing {', '.join(files)}")


def _release_from_dir(folder: Path) -> ImageDataset:
    missing = [name for name in _BATCH_FILES if not (folder / name).is_file()]
    if missing:
        raise _missing(folder, missing)
    files = {}
    for name in _BATCH_FILES:
        path = folder / name
        files[name] = (str(path), _read_file(path, *_batch_limit(name)))
    return _release_dataset(folder, files)


def _release_from_tar(archive: Path) -> ImageDataset:
    files: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # streaming: one pass, nothing extracted
            for member in tar:
                _check_member_name(archive, member.name)
                name = PurePosixPath(member.name).name
                if not (member.isfile() and name in _BATCH_FILES):
                    continue
                if name in files:
                    raise _error(archive, f"expected one {name}, found a second at {member.name}")
                stream = tar.extractfile(member)
                assert stream is not None  # regular files always have a stream
                where = f"{archive} (member {member.name})"
                limit, kind = _batch_limit(name)
                files[name] = (where, _read_bounded(stream, member.size, limit, where, kind))
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise _error(archive, f"expected a readable {_ARCHIVE_NAME} (tar) archive: {exc}") from exc
    missing = [name for name in _BATCH_FILES if name not in files]
    if missing:
        raise _missing(archive, missing)
    return _release_dataset(archive, files)


# --------------------------------------------------------------------------- image folders


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    """One encoded image -> 32×32×3 uint8 (RGB); the size is checked before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except _DECODE_ERRORS as exc:
        raise _error(where, f"expected a JPEG or PNG image, cannot decode: {exc}") from exc
    with image:
        if image.size != (_SIDE, _SIDE):
            width, height = image.size
            raise _error(where, f"expected a {_SIDE}x{_SIDE} image, got {width}x{height}")
        try:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except _DECODE_ERRORS as exc:
            raise _error(where, f"expected a JPEG or PNG image, cannot decode: {exc}") from exc


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "__MACOSX")) for part in rel.split("/"))


def _index_images(rels: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [relative paths]}}`` from paths like ``train/cat/0001.jpg``."""
    index: dict[str, dict[str, list[str]]] = {split: {} for split in _SPLITS}
    for rel in rels:
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in index or _is_hidden(rel):
            continue
        if PurePosixPath(rel).suffix.lower() in _IMAGE_SUFFIXES:
            index[parts[0]].setdefault(parts[1], []).append(rel)
    return index


def _image_folder_dataset(
    root: Path, rels: Iterable[str], read: Callable[[str], bytes], where: Callable[[str], str]
) -> ImageDataset:
    """Decode an image-folder layout given its relative paths and a reader for them."""
    index = _index_images(rels)
    for split in _SPLITS:
        if not index[split]:
            raise _error(root, f"expected images (.jpg/.png) at {split}/<class>/<file>")
    train_classes, test_classes = sorted(index["train"]), sorted(index["test"])
    if len(train_classes) < 2:
        raise _error(root, _too_few_classes(train_classes))
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise _error(
            root,
            f"expected the same classes in train/ and test/; only in train: {only_train}, "
            f"only in test: {only_test}",
        )
    arrays = [_decode_split(index[split], train_classes, read, where) for split in _SPLITS]
    return _dataset(root, *arrays[0], *arrays[1], train_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def _decode_split(
    by_class: dict[str, list[str]],
    classes: list[str],
    read: Callable[[str], bytes],
    where: Callable[[str], str],
) -> tuple[Tensor, Tensor]:
    items = [(rel, label) for label, name in enumerate(classes) for rel in sorted(by_class[name])]
    pixels = np.empty((len(items), _SIDE, _SIDE, _CHANNELS), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (rel, label) in enumerate(items):
        pixels[i] = _decode_image(read(rel), where(rel))
        labels[i] = label
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels)


def _image_folder_from_dir(root: Path) -> ImageDataset:
    def read(rel: str) -> bytes:
        return _read_file(root / rel, MAX_IMAGE_BYTES, "image file")

    try:
        rels = [
            f"{split}/{class_dir.name}/{file.name}"
            for split in _SPLITS
            for class_dir in (root / split).iterdir()
            if class_dir.is_dir()
            for file in class_dir.iterdir()
            if file.is_file()
        ]
    except OSError as exc:
        raise _error(root, f"expected a readable image folder: {exc}") from exc
    return _image_folder_dataset(root, rels, read, where=lambda rel: str(root / rel))


def _zip_prefix(archive: Path, names: list[str]) -> str:
    """ "" when train/ and test/ are at the top of the zip, else the one folder holding them."""
    images = [
        name.split("/")
        for name in names
        if not _is_hidden(name) and PurePosixPath(name).suffix.lower() in _IMAGE_SUFFIXES
    ]
    if any(len(parts) == 3 and parts[0] in _SPLITS for parts in images):
        return ""
    tops = sorted({parts[0] for parts in images if len(parts) == 4 and parts[1] in _SPLITS})
    if len(tops) == 1:
        return f"{tops[0]}/"
    found = f"found several: {tops}" if tops else "found none"
    raise _error(
        archive,
        "expected train/<class>/* and test/<class>/* at the top of the zip or inside one "
        f"top-level folder; {found}",
    )


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError)


def _image_folder_from_zip(archive: Path) -> ImageDataset:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(archive, info.filename)
            names = [info.filename for info in infos if not info.is_dir()]
            prefix = _zip_prefix(archive, names)

            def read(rel: str) -> bytes:
                try:
                    info = zf.getinfo(prefix + rel)
                    with zf.open(info) as member:
                        return _read_bounded(
                            member, info.file_size, MAX_IMAGE_BYTES, where(rel), "image file"
                        )
                except _ZIP_ERRORS as exc:
                    raise _error(where(rel), f"expected a readable zip member: {exc}") from exc

            def where(rel: str) -> str:
                return f"{archive} (member {prefix}{rel})"

            rels = [name[len(prefix) :] for name in names if name.startswith(prefix)]
            return _image_folder_dataset(archive, rels, read, where)
    except _ZIP_ERRORS as exc:
        raise _error(archive, f"expected a readable .zip image folder: {exc}") from exc


# --------------------------------------------------------------------------- sources and cache

_READERS: dict[str, Callable[[Path], ImageDataset]] = {
    "release-tar": _release_from_tar,
    "release-dir": _release_from_dir,
    "images-zip": _image_folder_from_zip,
    "images-dir": _image_folder_from_dir,
}


def _find_source(path: Path) -> tuple[str, Path]:
    """(layout, the file or directory to read) for what ``path`` points at."""
    if not path.exists():
        raise _error(path, f"no such file or directory; {_LAYOUTS}")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".zip"):
            return "images-zip", path
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            return "release-tar", path
        if zipfile.is_zipfile(path):
            return "images-zip", path
        if tarfile.is_tarfile(path):
            return "release-tar", path
        raise _error(path, f"unknown file type; {_LAYOUTS}")
    if any((path / name).is_file() for name in _BATCH_FILES):
        return "release-dir", path
    if (path / _BATCHES_DIR).is_dir():
        return "release-dir", path / _BATCHES_DIR
    if (path / _ARCHIVE_NAME).is_file():
        return "release-tar", path / _ARCHIVE_NAME
    if all((path / split).is_dir() for split in _SPLITS):
        return "images-dir", path
    raise _error(path, f"unknown directory layout; {_LAYOUTS}")


def _source_files(layout: str, source: Path) -> list[Path]:
    if layout in ("release-tar", "images-zip"):
        return [source]
    if layout == "release-dir":
        return [source / name for name in _BATCH_FILES]
    return sorted(file for split in _SPLITS for file in (source / split).rglob("*"))


def _cache_key(layout: str, source: Path) -> str | None:
    """Digest of format version, resolved path, and size + mtime of every file read.

    None when something cannot be stat'ed (the reader then reports the problem).
    """
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{layout}|{source.resolve()}".encode())
    try:
        for file in _source_files(layout, source):
            stat = file.stat()
            digest.update(
                f"|{file.relative_to(source.parent)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
            )
    except OSError:
        return None
    return digest.hexdigest()


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("METAGRAD_CACHE") or "~/.cache/metagrad"
    return Path(cache_dir).expanduser()


_CACHE_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(path: Path, key: str) -> ImageDataset | None:
    """The cached dataset, or None when absent, stale or unreadable (it is then rewritten)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["key"] != key:
            raise ValueError("key mismatch")
        return ImageDataset(
            *(state[field] for field in _CACHE_FIELDS),
            classes=[str(name) for name in state["classes"]],
            mean=tuple(float(v) for v in state["mean"]),
            std=tuple(float(v) for v in state["std"]),
        )
    except Exception as exc:  # any damage to the cache just means decoding again
        reason = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run many lines
        logger.warning(
            "ignoring unreadable dataset cache %s (%s: %s); rebuilding it",
            path,
            type(exc).__name__,
            reason,
        )
        return None


def _write_cache(path: Path, key: str, dataset: ImageDataset) -> None:
    state = {field: getattr(dataset, field) for field in _CACHE_FIELDS}
    state.update(key=key, classes=dataset.classes, mean=dataset.mean, std=dataset.std)
    try:
        atomic_write(path, lambda file: torch.save(state, file))
    except CheckpointError as exc:  # a cache we cannot write is not fatal
        logger.warning("dataset cache not saved: %s", exc)


def load_cifar10(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> ImageDataset:
    """Load CIFAR-10 (or any 32×32 RGB image folder) as uint8 tensors, decoding at most once.

    ``path`` is ``cifar-10-python.tar.gz``, its extracted ``cifar-10-batches-py/``, a directory
    containing either, or an image folder ``train/<class>/*``, ``test/<class>/*`` as a directory
    or a ``.zip`` (optionally inside one top-level folder; sorted class names = label index).
    The decoded tensors are cached in ``cache_dir`` (default: ``$METAGRAD_CACHE``, else
    ``~/.cache/metagrad``), keyed by resolved path, size, mtime and format version.

    Raises:
        DatasetError: missing path, unknown layout, or an unreadable/invalid/unsafe dataset.
    """
    layout, source = _find_source(Path(path).expanduser())
    key = _cache_key(layout, source)
    if key is None:  # something cannot be stat'ed: let the reader report it
        return _READERS[layout](source)
    cache_file = _cache_root(cache_dir) / f"cifar10-{key[:32]}.pt"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        return cached
    logger.info("decoding %s (%s); this happens once per file version", source, layout)
    dataset = _READERS[layout](source)
    _write_cache(cache_file, key, dataset)
    return dataset


# --------------------------------------------------------------------------- download


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def needs_download(path: str | os.PathLike[str]) -> bool:
    """Whether ``--download`` should fetch the release into ``path``.

    True when ``path`` does not exist or is a directory in which :func:`load_cifar10` finds no
    dataset (an empty one, say); False for a file or a directory holding a dataset.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    try:
        _find_source(path)
    except DatasetError:
        return True
    return False


def _url_chunks(url: str, dest: Path) -> Iterator[bytes]:
    """The body of ``url`` in chunks; network failures raise DatasetError."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                yield chunk
    except (OSError, http.client.HTTPException) as exc:  # OSError includes URLError
        raise _error(url, f"expected to download it to {dest}: {exc}") from exc


def download_cifar10(
    root: str | os.PathLike[str], url: str = CIFAR10_URL, md5: str = CIFAR10_MD5
) -> Path:
    """Download the official release to ``root/cifar-10-python.tar.gz`` and check its md5.

    Skipped when a file with the right checksum is already there; an existing empty ``root``
    is fine. The file is written atomically: on any failure (network, checksum, disk) nothing
    is left behind and DatasetError is raised. :func:`needs_download` says whether to call it.
    """
    dest = Path(root).expanduser() / _ARCHIVE_NAME
    if dest.is_file():
        if _file_md5(dest) == md5:
            logger.info("%s already present with the right checksum", dest)
            return dest
        logger.warning("%s has the wrong checksum; downloading it again", dest)

    def fetch(file: IO[bytes]) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        for chunk in _url_chunks(url, dest):
            digest.update(chunk)
            file.write(chunk)
        if digest.hexdigest() != md5:
            raise _error(url, f"expected md5 {md5}, downloaded {digest.hexdigest()}")

    logger.info("downloading %s to %s", url, dest)
    try:
        atomic_write(dest, fetch)
    except CheckpointError as exc:  # the disk side: "could not write <dest>: <reason>"
        raise DatasetError(str(exc)) from exc
    return dest


# --------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------------- batch pipeline


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


_PERMUTATION_STREAM, _AUGMENT_STREAM = 1, 2  # distinct, non-zero: SeedSequence pads with zeros


def _seeded_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (mixed with numpy's SeedSequence)."""
    state = np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


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
            raise ValueError(f"images must be uint8 N×C×H×W, got {_describe(images)}")
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
            generator = _seeded_generator(self.seed, epoch, _PERMUTATION_STREAM)
            order = torch.randperm(len(self.images), generator=generator)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            index = slice(lo, hi) if order is None else order[lo:hi].to(self.images.device)
            x, y = self.images[index], self.labels[index]
            if self.augment:
                x = augment_batch(x, _seeded_generator(self.seed, epoch, _AUGMENT_STREAM, i))
            if self.shard[1] > 1:
                lo, hi = shard_bounds(len(x), *self.shard)
                x, y = x[lo:hi], y[lo:hi]
            yield normalize(x, self.mean, self.std), y
