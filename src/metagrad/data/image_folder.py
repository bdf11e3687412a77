"""Reader of image folders (``train/<class>/*``, ``test/<class>/*``) as a directory or a zip.

Sorted class names give the label indices. Every image must be a 32×32 JPEG or PNG; each is
read within :data:`MAX_IMAGE_BYTES` and its size checked before any pixel is decoded. Zips are
read member by member and never extracted: a member's declared size is checked before it is
opened, and members that are not images of the layout are never read.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metagrad.data.errors import dataset_error
from metagrad.data.images import (
    CIFAR10_CHANNELS,
    CIFAR10_MEAN,
    CIFAR10_SIDE,
    CIFAR10_STD,
    SPLITS,
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

__all__ = ["MAX_IMAGE_BYTES", "image_folder_from_dir", "image_folder_from_zip"]

MAX_IMAGE_BYTES = 4 << 20
"""Largest image file of an image folder read.

Images must be 32x32, whose pixels take 3 KiB; the rest of the allowance is for the metadata
(ICC profiles, EXIF thumbnails) that cameras and editors embed. Images are read and decoded one
at a time, so this also bounds the memory a hostile file can take. No total cap is needed: an
image costs 3 KiB of decoded pixels, a small multiple of its own entry in a directory or zip.
"""
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError)


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    """One encoded image -> 32×32×3 uint8 (RGB); the size is checked before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except _DECODE_ERRORS as exc:
        raise dataset_error(where, f"expected a JPEG or PNG image, cannot decode: {exc}") from exc
    with image:
        if image.size != (CIFAR10_SIDE, CIFAR10_SIDE):
            width, height = image.size
            raise dataset_error(
                where, f"expected a {CIFAR10_SIDE}x{CIFAR10_SIDE} image, got {width}x{height}"
            )
        try:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except _DECODE_ERRORS as exc:
            raise dataset_error(
                where, f"expected a JPEG or PNG image, cannot decode: {exc}"
            ) from exc


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "__MACOSX")) for part in rel.split("/"))


def _index_images(rels: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [relative paths]}}`` from paths like ``train/cat/0001.jpg``."""
    index: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
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
    for split in SPLITS:
        if not index[split]:
            raise dataset_error(root, f"expected images (.jpg/.png) at {split}/<class>/<file>")
    train_classes, test_classes = sorted(index["train"]), sorted(index["test"])
    if len(train_classes) < 2:
        raise dataset_error(root, too_few_classes(train_classes))
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise dataset_error(
            root,
            f"expected the same classes in train/ and test/; only in train: {only_train}, "
            f"only in test: {only_test}",
        )
    arrays = [_decode_split(index[split], train_classes, read, where) for split in SPLITS]
    return checked_dataset(
        root, *arrays[0], *arrays[1], train_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )


def _decode_split(
    by_class: dict[str, list[str]],
    classes: list[str],
    read: Callable[[str], bytes],
    where: Callable[[str], str],
) -> tuple[Tensor, Tensor]:
    items = [(rel, label) for label, name in enumerate(classes) for rel in sorted(by_class[name])]
    pixels = np.empty((len(items), CIFAR10_SIDE, CIFAR10_SIDE, CIFAR10_CHANNELS), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (rel, label) in enumerate(items):
        pixels[i] = _decode_image(read(rel), where(rel))
        labels[i] = label
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels)


def image_folder_from_dir(root: Path) -> ImageDataset:
    """The dataset of a directory holding ``train/<class>/*`` and ``test/<class>/*``."""

    def read(rel: str) -> bytes:
        return read_file(root / rel, MAX_IMAGE_BYTES, "image file")

    try:
        rels = [
            f"{split}/{class_dir.name}/{file.name}"
            for split in SPLITS
            for class_dir in (root / split).iterdir()
            if class_dir.is_dir()
            for file in class_dir.iterdir()
            if file.is_file()
        ]
    except OSError as exc:
        raise dataset_error(root, f"expected a readable image folder: {exc}") from exc
    return _image_folder_dataset(root, rels, read, where=lambda rel: str(root / rel))


def _zip_prefix(archive: Path, names: list[str]) -> str:
    """ "" when train/ and test/ are at the top of the zip, else the one folder holding them."""
    images = [
        name.split("/")
        for name in names
        if not _is_hidden(name) and PurePosixPath(name).suffix.lower() in _IMAGE_SUFFIXES
    ]
    if any(len(parts) == 3 and parts[0] in SPLITS for parts in images):
        return ""
    tops = sorted({parts[0] for parts in images if len(parts) == 4 and parts[1] in SPLITS})
    if len(tops) == 1:
        return f"{tops[0]}/"
    found = f"found several: {tops}" if tops else "found none"
    raise dataset_error(
        archive,
        "expected train/<class>/* and test/<class>/* at the top of the zip or inside one "
        f"top-level folder; {found}",
    )


def image_folder_from_zip(archive: Path) -> ImageDataset:
    """The dataset of a zip holding the image folder, at its top or inside one folder."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                check_member_name(archive, info.filename)
            names = [info.filename for info in infos if not info.is_dir()]
            prefix = _zip_prefix(archive, names)

            def read(rel: str) -> bytes:
                try:
                    info = zf.getinfo(prefix + rel)
                    check_declared_size(info.file_size, MAX_IMAGE_BYTES, where(rel), "image file")
                    with zf.open(info) as member:
                        return read_bounded(
                            member, info.file_size, MAX_IMAGE_BYTES, where(rel), "image file"
                        )
                except _ZIP_ERRORS as exc:
                    raise dataset_error(
                        where(rel), f"expected a readable zip member: {exc}"
                    ) from exc

            def where(rel: str) -> str:
                return f"{archive} (member {prefix}{rel})"

            rels = [name[len(prefix) :] for name in names if name.startswith(prefix)]
            return _image_folder_dataset(archive, rels, read, where)
    except _ZIP_ERRORS as exc:
        raise dataset_error(archive, f"expected a readable .zip image folder: {exc}") from exc
