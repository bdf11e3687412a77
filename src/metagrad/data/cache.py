"""The decoded-dataset cache: an :class:`~metagrad.data.images.ImageDataset` as a ``.pt`` file.

A cache file is keyed by what was decoded (format version, layout, resolved path, and the size
and mtime of every file read); a stale, damaged or unwritable cache only costs decoding again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from metagrad.checkpoint import CheckpointError, atomic_write
from metagrad.data.images import ImageDataset

__all__ = ["CACHE_FORMAT", "cache_key", "cache_root", "read_cache", "write_cache"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when the decoded content or the cache layout changes."""
_CACHE_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_key(layout: str, source: Path, files: Iterable[Path]) -> str | None:
    """Digest of format version, layout, resolved path, and size + mtime of every file read.

    ``files`` may be lazy; None when listing or stat'ing them fails (the reader then reports
    the problem).
    """
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{layout}|{source.resolve()}".encode())
    try:
        for file in files:
            stat = file.stat()
            digest.update(
                f"|{file.relative_to(source.parent)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
            )
    except OSError:
        return None
    return digest.hexdigest()


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir``, else ``$METAGRAD_CACHE``, else ``~/.cache/metagrad``."""
    if cache_dir is None:
        cache_dir = os.environ.get("METAGRAD_CACHE") or "~/.cache/metagrad"
    return Path(cache_dir).expanduser()


def read_cache(path: Path, key: str) -> ImageDataset | None:
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


def write_cache(path: Path, key: str, dataset: ImageDataset) -> None:
    """Save ``dataset`` under ``key`` atomically; a cache that cannot be written is a warning."""
    state = {field: getattr(dataset, field) for field in _CACHE_FIELDS}
    state.update(key=key, classes=dataset.classes, mean=dataset.mean, std=dataset.std)
    try:
        atomic_write(path, lambda file: torch.save(state, file))
    except CheckpointError as exc:  # a cache we cannot write is not fatal
        logger.warning("dataset cache not saved: %s", exc)
