"""Loading CIFAR-10, or any 32×32 RGB image folder, from whichever layout a path points at.

:func:`load_cifar10` reads the official python release (``cifar-10-python.tar.gz`` or its
extracted ``cifar-10-batches-py/``) or an image folder (``train/<class>/*``, ``test/<class>/*``)
as a directory or a ``.zip``, decodes it once and caches the uint8 tensors.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from metagrad.data.cache import cache_key, cache_root, read_cache, write_cache
from metagrad.data.errors import dataset_error
from metagrad.data.image_folder import image_folder_from_dir, image_folder_from_zip
from metagrad.data.images import SPLITS, ImageDataset
from metagrad.data.release import (
    ARCHIVE_NAME,
    BATCH_FILES,
    BATCHES_DIR,
    is_tar,
    release_from_dir,
    release_from_tar,
)

__all__ = ["find_source", "load_cifar10"]

logger = logging.getLogger(__name__)

_LAYOUTS = (
    f"expected {ARCHIVE_NAME}, a {BATCHES_DIR} folder, a directory containing one of them, "
    "or an image folder (train/<class>/*, test/<class>/*) as a directory or .zip"
)
_READERS: dict[str, Callable[[Path], ImageDataset]] = {
    "release-tar": release_from_tar,
    "release-dir": release_from_dir,
    "images-zip": image_folder_from_zip,
    "images-dir": image_folder_from_dir,
}


def find_source(path: Path) -> tuple[str, Path]:
    """(layout, the file or directory to read) for what ``path`` points at.

    Raises:
        DatasetError: ``path`` does not exist or holds no known layout.
    """
    if not path.exists():
        raise dataset_error(path, f"no such file or directory; {_LAYOUTS}")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".zip"):
            return "images-zip", path
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            return "release-tar", path
        if zipfile.is_zipfile(path):
            return "images-zip", path
        if is_tar(path):
            return "release-tar", path
        raise dataset_error(path, f"unknown file type; {_LAYOUTS}")
    if any((path / name).is_file() for name in BATCH_FILES):
        return "release-dir", path
    if (path / BATCHES_DIR).is_dir():
        return "release-dir", path / BATCHES_DIR
    if (path / ARCHIVE_NAME).is_file():
        return "release-tar", path / ARCHIVE_NAME
    if all((path / split).is_dir() for split in SPLITS):
        return "images-dir", path
    raise dataset_error(path, f"unknown directory layout; {_LAYOUTS}")


def _source_files(layout: str, source: Path) -> Iterator[Path]:
    """The files the reader of ``layout`` reads at ``source`` (lazily: listing may fail)."""
    if layout in ("release-tar", "images-zip"):
        yield source
    elif layout == "release-dir":
        yield from (source / name for name in BATCH_FILES)
    else:
        yield from sorted(file for split in SPLITS for file in (source / split).rglob("*"))


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
    layout, source = find_source(Path(path).expanduser())
    key = cache_key(layout, source, _source_files(layout, source))
    if key is None:  # something cannot be stat'ed: let the reader report it
        return _READERS[layout](source)
    cache_file = cache_root(cache_dir) / f"cifar10-{key[:32]}.pt"
    cached = read_cache(cache_file, key)
    if cached is not None:
        return cached
    logger.info("decoding %s (%s); this happens once per file version", source, layout)
    dataset = _READERS[layout](source)
    write_cache(cache_file, key, dataset)
    return dataset
