"""Downloading the official CIFAR-10 python release, checked against its md5."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from metagrad.checkpoint import CheckpointError, atomic_write
from metagrad.data.cifar10 import find_source
from metagrad.data.errors import DatasetError, dataset_error
from metagrad.data.release import ARCHIVE_NAME

__all__ = ["CIFAR10_MD5", "CIFAR10_URL", "download_cifar10", "needs_download"]

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def needs_download(path: str | os.PathLike[str]) -> bool:
    """Whether ``--download`` should fetch the release into ``path``.

    True when ``path`` does not exist or is a directory in which
    :func:`~metagrad.data.cifar10.load_cifar10` finds no dataset (an empty one, say); False for a
    file or a directory holding a dataset.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    try:
        find_source(path)
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
        raise dataset_error(url, f"expected to download it to {dest}: {exc}") from exc


def download_cifar10(
    root: str | os.PathLike[str], url: str = CIFAR10_URL, md5: str = CIFAR10_MD5
) -> Path:
    """Download the official release to ``root/cifar-10-python.tar.gz`` and check its md5.

    Skipped when a file with the right checksum is already there; an existing empty ``root``
    is fine. The file is written atomically: on any failure (network, checksum, disk) nothing
    is left behind and DatasetError is raised. :func:`needs_download` says whether to call it.
    """
    dest = Path(root).expanduser() / ARCHIVE_NAME
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
            raise dataset_error(url, f"expected md5 {md5}, downloaded {digest.hexdigest()}")

    logger.info("downloading %s to %s", url, dest)
    try:
        atomic_write(dest, fetch)
    except CheckpointError as exc:  # the disk side: "could not write <dest>: <reason>"
        raise DatasetError(str(exc)) from exc
    return dest
