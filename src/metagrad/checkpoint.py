"""Atomic checkpoints and JSON files, and the run folder's guards.

A crash mid-write never leaves a torn file behind: files are written to a temporary file beside
them and renamed over. A failed write (full disk, permissions, file size limit) raises
:class:`CheckpointError` with one line and leaves the previous file in place.
:func:`remove_stale_temp_files`, :func:`check_writable_dir` and :class:`RunLock` prepare a run
folder: temporary files orphaned by a killed run, an unusable folder, two runs in one folder.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or from another run, or a file cannot be written."""


def _os_reason(exc: OSError) -> str:
    """A short lower-case reason for an OSError (``"no space left on device"``)."""
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _write_reason(exc: BaseException) -> str:
    """Why a write failed: the OSError behind it (torch.save hides it), else the first line."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return _os_reason(seen)
        seen = seen.__cause__ or seen.__context__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _temp_prefix(name: str) -> str:
    """Prefix of :func:`atomic_write`'s temporary files for the final file ``name``."""
    return f".{name}."


def _make_dir(folder: Path) -> None:
    """``mkdir -p folder``; a file in the way is reported as "not a directory"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder)) from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file beside it, then rename it over.

    Raises:
        CheckpointError: writing failed (``"could not write <path>: <reason>"``); the temporary
            file is removed and a previous file at ``path`` is left as it was. Other exceptions
            from ``write`` propagate unchanged, also after removing the temporary file.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        _make_dir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"could not write {path}: {_write_reason(exc)}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    Raises:
        CheckpointError: no file, an unreadable file, or one that does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__})") from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a metagrad checkpoint (expected a dict, got {type(state).__name__})"
        )
    return state


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _dumps(data: Any, indent: int | None = None) -> str:
    """Strict JSON: non-finite floats are written as ``null``, never as ``NaN``/``Infinity``."""
    return json.dumps(_finite_or_none(data), indent=indent, allow_nan=False)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON (non-finite floats as ``null``), atomically."""
    text = _dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write one JSON object per line (non-finite floats as ``null``), atomically."""
    text = "".join(_dumps(r) + "\n" for r in records)
    atomic_write(Path(path), lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------- run folder guards

# tempfile.mkstemp inserts 8 characters from this alphabet between prefix and suffix.
_MKSTEMP_TAIL = r"[a-z0-9_]{8}"


def remove_stale_temp_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left for the files ``names``.

    Only regular files named like ``.<name>.XXXXXXXX`` (the pattern of ``atomic_write``'s
    temporary files) in ``folder`` itself are removed; call it while holding the folder's
    :class:`RunLock`, since a running writer's temporary file looks the same. Returns the
    removed paths, sorted; a missing folder has none.
    """
    folder = Path(folder)
    patterns = [re.compile(re.escape(_temp_prefix(name)) + _MKSTEMP_TAIL) for name in names]
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not any(p.fullmatch(entry.name) for p in patterns):
            continue
        if entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d stale temporary file(s) in %s", len(removed), folder)
    return removed


def check_writable_dir(path: Path) -> None:
    """Make sure ``path`` is a directory this process can create files in (creating it if needed).

    Raises:
        CheckpointError: ``path`` is a file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a directory for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create directory {path}: {_os_reason(exc)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"directory {path} is not writable: {_os_reason(exc)}") from None


_HELD_LOCKS: set[str] = set()  # real paths of the lock files this process holds


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock file's record, None if it cannot be read or parsed."""
    try:
        return _parse_lock(path.read_bytes())
    except OSError:
        return None


def _parse_lock(raw: bytes) -> dict[str, Any] | None:
    """A lock's ``{pid, host, started}``, None if ``raw`` is not such a JSON record."""
    try:
        record = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("pid"), int)
        and isinstance(record.get("host"), str)
        and isinstance(record.get("started"), str)
    )
    return record if ok else None


class RunLock:
    """``folder/.lock``: at most one run at a time uses a run folder.

    The lock file holds ``{"pid", "host", "started"}`` and is created atomically. A lock held by
    a live process on this host, or by any process on another host (whose liveness cannot be
    checked), is refused with :class:`CheckpointError`; a lock whose process is gone, or an
    unreadable lock file, is stale and replaced with a warning. Use as a context manager, or call
    :meth:`acquire` and :meth:`release`; release removes the lock only while it is still ours.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.record: dict[str, Any] | None = None

    def acquire(self) -> None:
        """Take the lock (creating ``folder``), replacing a stale one.

        Raises:
            CheckpointError: another run holds the lock, or the lock cannot be written.
        """
        if self.record is not None:
            raise CheckpointError(f"{self.folder}: this lock is already held")
        check_writable_dir(self.folder)
        for _ in range(3):  # a racing run may replace a stale lock between our attempts
            if self._try_create():
                return
            self._remove_if_stale()
        raise CheckpointError(f"{self.folder}: could not take {self.path} (it keeps changing)")

    def release(self) -> None:
        """Remove the lock if it is still the one this object wrote."""
        if self.record is not None and _read_lock(self.path) == self.record:
            self.path.unlink(missing_ok=True)
        if self.record is not None:
            _HELD_LOCKS.discard(os.path.realpath(self.path))
        self.record = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _try_create(self) -> bool:
        """Create the lock file if there is none; False when one exists."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise CheckpointError(f"could not write {self.path}: {_os_reason(exc)}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise CheckpointError(f"could not write {self.path}: {_os_reason(exc)}") from None
        self.record = record
        _HELD_LOCKS.add(os.path.realpath(self.path))
        return True

    def _holder_alive(self, pid: int) -> bool:
        """Whether the process ``pid`` of this host still holds the lock.

        Our own pid in a lock this process does not hold is an earlier process that had the same
        pid (a restarted container, say).
        """
        if pid == os.getpid():
            return os.path.realpath(self.path) in _HELD_LOCKS
        return _pid_alive(pid)

    def _remove_if_stale(self) -> None:
        """Remove the existing lock if its run is gone; raise if it is in use."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return  # released meanwhile
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {_os_reason(exc)}") from None
        record = _parse_lock(raw)
        if record is not None:
            self._refuse_if_in_use(record)
            why = f"its run, pid {record['pid']}, has ended"
        else:
            why = "it is unreadable"
        try:
            unchanged = self.path.read_bytes() == raw  # not replaced by a racing run meanwhile
        except FileNotFoundError:
            return
        if unchanged:
            logger.warning("replacing the stale lock %s (%s)", self.path, why)
            self.path.unlink(missing_ok=True)

    def _refuse_if_in_use(self, record: dict[str, Any]) -> None:
        here = record["host"] == socket.gethostname()
        if here and not self._holder_alive(record["pid"]):
            return
        where = "" if here else f" on host {record['host']}"
        raise CheckpointError(
            f"{self.folder} is in use by another run (pid {record['pid']}{where}, started "
            f"{record['started']}); wait for it to finish, use another folder, or delete "
            f"{self.path} if that run is gone"
        )
