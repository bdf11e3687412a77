"""Atomic checkpoints and JSON files, and the run folder's guards.

A crash mid-write never leaves a torn file behind: files are written to a temporary file beside
them and renamed over, with the permissions the process umask gives a new file. A failed write
(full disk, permissions, file size limit) raises :class:`CheckpointError` with one line and leaves
the previous file in place. A checkpoint carries a SHA-256 of its payload, checked on load, so a
damaged file is refused with one line instead of loading wrong numbers.
:func:`remove_stale_temp_files`, :func:`check_writable_dir` and :class:`RunLock` prepare a run
folder: temporary files orphaned by a killed run, an unusable folder, two runs in one folder.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import io
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
CHECKPOINT_FORMAT = "metagrad-checkpoint/1"
"""The container a checkpoint file holds: ``{"format", "sha256", "payload"}`` (``torch.save``
bytes of the state)."""

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


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it 0600)
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
    """``torch.save`` ``state`` with a SHA-256 of its bytes, atomically (:func:`atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    container = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": payload,
    }
    atomic_write(Path(path), lambda f: torch.save(container, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    Its payload's SHA-256 is checked; a file written by ``torch.save`` alone (an earlier
    version's checkpoint) loads without one.

    Raises:
        CheckpointError: no file, an unreadable or damaged file, or one that does not hold a
            dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            payload = state.get("payload")
            if not isinstance(payload, bytes):
                raise CheckpointError(f"{path}: damaged checkpoint (no payload)")
            if hashlib.sha256(payload).hexdigest() != state.get("sha256"):
                raise CheckpointError(
                    f"{path}: damaged checkpoint (its checksum does not match its contents); "
                    "resume from a copy or start the run again"
                )
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class RunLock:
    """``folder/.lock``: at most one run at a time uses a run folder.

    The lock is an OS lock (``flock``) on the lock file, which the kernel releases when its
    process dies, so taking it is atomic and a killed run's lock is free at once. The file holds
    ``{"pid", "host", "started"}`` for the messages, and as a second guard: a record naming a
    live process of this host other than the holder, or any process of another host (whose lock
    this host may not see), is refused with :class:`CheckpointError`. A lock left by a run that
    has ended is taken over with a warning. Use as a context manager, or call :meth:`acquire`
    and :meth:`release`.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.record: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating ``folder``), taking over one whose run has ended.

        Raises:
            CheckpointError: another run holds the lock, or the lock cannot be written.
        """
        if self._fd is not None:
            raise CheckpointError(f"{self.folder}: this lock is already held")
        check_writable_dir(self.folder)
        for _ in range(8):  # a holder may remove the file between our open and our lock
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse_in_use(_read_lock(self.path))
            except OSError as exc:
                os.close(fd)
                raise CheckpointError(f"could not lock {self.path}: {_os_reason(exc)}") from None
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            try:
                self._take(fd, created)
            except BaseException:
                os.close(fd)
                raise
            return
        raise CheckpointError(f"{self.folder}: could not take {self.path} (it keeps changing)")

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)  # while still holding it: no one can take it now
        os.close(self._fd)
        self._fd = None
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

    def _open(self) -> tuple[int, bool]:
        """The lock file, open, and whether this call created it."""
        try:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                return os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:
            return self._open()  # removed between the two calls
        except OSError as exc:
            raise CheckpointError(f"could not write {self.path}: {_os_reason(exc)}") from None

    def _take(self, fd: int, created: bool) -> None:
        """Holding the OS lock on ``fd``: check the record left in it, then write ours."""
        raw = os.pread(fd, 1 << 16, 0)
        previous = _parse_lock(raw)
        if previous is not None:
            here = previous["host"] == socket.gethostname()
            if not here or (previous["pid"] != os.getpid() and _pid_alive(previous["pid"])):
                self._refuse_in_use(previous)
            logger.warning(
                "replacing the stale lock %s (its run, pid %s, has ended)",
                self.path,
                previous["pid"],
            )
        elif not created:  # a run that died before writing its record, or a damaged file
            logger.warning("replacing the stale lock %s (it is unreadable)", self.path)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:
            raise CheckpointError(f"could not write {self.path}: {_os_reason(exc)}") from None
        self._fd, self.record = fd, record

    def _refuse_in_use(self, record: dict[str, Any] | None) -> None:
        if record is None:
            raise CheckpointError(
                f"{self.folder} is in use by another run; wait for it to finish or use "
                "another folder"
            )
        here = record["host"] == socket.gethostname()
        where = "" if here else f" on host {record['host']}"
        raise CheckpointError(
            f"{self.folder} is in use by another run (pid {record['pid']}{where}, started "
            f"{record['started']}); wait for it to finish, use another folder, or delete "
            f"{self.path} if that run is gone"
        )
