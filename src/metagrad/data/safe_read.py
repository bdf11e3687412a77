"""Reading untrusted dataset files and archive members: size limits and safe member names.

A file or member larger than its limit is refused before it is read, and a read stops at the
limit whatever a header claims, so a hostile file cannot make a reader take more memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO

from metagrad.data.errors import dataset_error, format_size

__all__ = ["check_declared_size", "check_member_name", "read_bounded", "read_file"]


def check_declared_size(declared: int, limit: int, where: str, kind: str) -> None:
    """Refuse a file or member whose ``declared`` size (``TarInfo.size``, ``ZipInfo.file_size``,
    ``st_size``) is over ``limit``, before anything of it is read or decompressed."""
    if declared > limit:
        raise dataset_error(
            where,
            f"{format_size(declared)} is larger than the {format_size(limit)} limit for one "
            f"{kind}; refusing to read it",
        )


def read_bounded(stream: IO[bytes], declared: int, limit: int, where: str, kind: str) -> bytes:
    """Read a file or member of ``declared`` size, refusing it unread when over ``limit``.

    At most ``limit + 1`` bytes are read, so a header that understates the size cannot make
    the read exceed the limit either. ``where`` and ``kind`` (``"image file"``) name it in the
    DatasetError.
    """
    check_declared_size(declared, limit, where, kind)
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise dataset_error(
            where,
            f"holds more than the {format_size(limit)} limit for one {kind} although its size is "
            f"given as {format_size(declared)}; refusing to read it",
        )
    return raw


def read_file(path: Path, limit: int, kind: str) -> bytes:
    """A regular file's bytes, refused when its size (or what it holds) exceeds ``limit``."""
    try:
        with path.open("rb") as file:
            return read_bounded(file, os.fstat(file.fileno()).st_size, limit, str(path), kind)
    except OSError as exc:
        raise dataset_error(path, f"expected a readable {kind}: {exc.strerror or exc}") from exc


def check_member_name(archive: Path, name: str) -> None:
    """Refuse archive members that would land outside a target directory if extracted."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise dataset_error(
            archive, f"unsafe archive member {name!r}: expected relative paths only"
        )
