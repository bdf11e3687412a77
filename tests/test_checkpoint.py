"""Tests for metagrad.checkpoint: failed writes, strict JSON, temp files, folder checks, lock."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from metagrad.checkpoint import (
    CheckpointError,
    RunLock,
    atomic_write,
    check_writable_dir,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
    write_jsonl,
)

SRC = Path(__file__).resolve().parents[1] / "src"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(AS_ROOT, reason="root ignores directory permissions")


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``python -c code args`` with this checkout's package importable."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


# --------------------------------------------------------------------------- failed writes

_FILE_SIZE_LIMIT = """
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from metagrad.checkpoint import CheckpointError, save_checkpoint, write_json

    folder = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit now fail with EFBIG
    save_checkpoint({"step": 1, "x": torch.zeros(10)}, folder / "checkpoint.pt")
    write_json({"step": 1}, folder / "summary.json")
    errors = []
    for write in (
        lambda: save_checkpoint({"step": 2, "x": torch.zeros(100_000)}, folder / "checkpoint.pt"),
        lambda: write_json({"step": 2, "pad": "x" * 200_000}, folder / "summary.json"),
    ):
        try:
            write()
            errors.append(None)
        except CheckpointError as err:
            errors.append(str(err))
    print(json.dumps(errors))
"""


def test_a_write_past_the_file_size_limit_keeps_the_previous_file(tmp_path: Path) -> None:
    """The real failure of a full disk: the OS refuses the write (here EFBIG, via RLIMIT_FSIZE)."""
    process = _python(_FILE_SIZE_LIMIT, str(tmp_path))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    errors = json.loads(out)
    assert errors == [
        f"could not write {tmp_path / 'checkpoint.pt'}: file size limit exceeded",
        f"could not write {tmp_path / 'summary.json'}: file size limit exceeded",
    ]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 1 and torch.equal(state["x"], torch.zeros(10))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "summary.json"]


@needs_non_root
def test_a_write_into_a_read_only_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    save_checkpoint({"step": 1}, folder / "checkpoint.pt")
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt: permission denied$"):
            save_checkpoint({"step": 2}, folder / "checkpoint.pt")
        with pytest.raises(CheckpointError, match="permission denied"):
            write_jsonl([{"a": 1}], folder / "metrics.jsonl")
    finally:
        folder.chmod(0o755)
    assert load_checkpoint(folder / "checkpoint.pt") == {"step": 1}
    assert [p.name for p in folder.iterdir()] == ["checkpoint.pt"]


def test_other_errors_of_the_writer_pass_through_and_leave_no_temp_file(tmp_path: Path) -> None:
    def broken(file: object) -> None:
        raise ValueError("not a write error")

    with pytest.raises(ValueError, match="not a write error"):
        atomic_write(tmp_path / "out.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"expected a dict, got list"):
        load_checkpoint(tmp_path / "checkpoint.pt")


# --------------------------------------------------------------------------- strict JSON


def _strict_loads(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_files_never_hold_nan_or_infinity(tmp_path: Path) -> None:
    nan, inf = math.nan, math.inf
    record = {"loss": nan, "curve": [1.0, inf, {"deep": -inf}], "pair": (nan, 2), "ok": 0.5}
    expected = {"loss": None, "curve": [1.0, None, {"deep": None}], "pair": [None, 2], "ok": 0.5}
    write_json(record, tmp_path / "summary.json")
    assert _strict_loads((tmp_path / "summary.json").read_text()) == expected
    write_jsonl([record, {"step": 1}], tmp_path / "metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict_loads(line) for line in lines] == [expected, {"step": 1}]
    assert record["loss"] is nan  # the caller's data is left alone


# --------------------------------------------------------------------------- stale temporary files

_KILLED_MID_WRITE = """
    import sys, time
    from pathlib import Path
    from metagrad.checkpoint import atomic_write

    def write(file):
        file.write(b"half a checkpoint")
        file.flush()
        print("writing", flush=True)
        time.sleep(60)

    atomic_write(Path(sys.argv[1]) / "checkpoint.pt", write)
"""


def _orphan_of_a_killed_writer(folder: Path) -> Path:
    """Kill a process in the middle of atomic_write; returns the temporary file it leaves."""
    process = _python(_KILLED_MID_WRITE, str(folder))
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "writing\n", process.stderr
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    (orphan,) = folder.glob(".checkpoint.pt.*")
    return orphan


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    orphan = _orphan_of_a_killed_writer(tmp_path)
    keep = [
        tmp_path / "checkpoint.pt",
        tmp_path / ".lock",
        tmp_path / ".checkpoint.pt.bak",  # not mkstemp's 8-character tail
        tmp_path / ".other.json.abcd1234",  # a name that was not asked for
        tmp_path / "metrics.jsonl",
    ]
    for path in keep:
        path.write_text("keep")
    (tmp_path / ".metrics.jsonl.dir_1234").mkdir()  # the pattern, but a directory
    jsonl_orphan = tmp_path / ".metrics.jsonl.x_9z0a1b"
    jsonl_orphan.write_text("{")
    removed = remove_stale_temp_files(tmp_path, ["checkpoint.pt", "metrics.jsonl"])
    assert removed == sorted([orphan, jsonl_orphan])
    assert not orphan.exists() and not jsonl_orphan.exists()
    assert all(path.exists() for path in keep) and (tmp_path / ".metrics.jsonl.dir_1234").is_dir()
    assert remove_stale_temp_files(tmp_path / "missing", ["checkpoint.pt"]) == []


# --------------------------------------------------------------------------- writable folders


def test_check_writable_dir(tmp_path: Path) -> None:
    check_writable_dir(tmp_path / "new" / "run")  # created
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file is a file; expected a directory"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"cannot create directory .*file/run: not a dir"):
        check_writable_dir(tmp_path / "file" / "run")


@needs_non_root
def test_check_writable_dir_refuses_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    try:
        with pytest.raises(CheckpointError, match="ro is not writable: permission denied"):
            check_writable_dir(folder)
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- run lock


def _write_lock(folder: Path, pid: int, host: str | None = None) -> dict[str, object]:
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-02T03:04:05"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(record))
    return record


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another process that stays alive during the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=60)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=60)
    return process.pid


def test_the_lock_is_held_and_released(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run") as lock:
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert record == lock.record and record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(CheckpointError, match="in use by another run"):
            RunLock(tmp_path / "run").acquire()  # a second run of this very process
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_lock_of_a_live_process_is_refused(tmp_path: Path, live_pid: int) -> None:
    record = _write_lock(tmp_path, live_pid)
    with pytest.raises(CheckpointError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert message.startswith(f"{tmp_path} is in use by another run (pid {live_pid}, started ")
    assert "\n" not in message
    assert json.loads((tmp_path / ".lock").read_text()) == record


def test_a_lock_from_another_host_is_refused(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid(), host="elsewhere.example")
    with pytest.raises(CheckpointError, match=r"on host elsewhere\.example"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("content", ["dead-pid", "own-pid", "garbage", "binary", "empty"])
def test_a_stale_lock_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    if content == "dead-pid":
        _write_lock(tmp_path, _dead_pid())
    elif content == "own-pid":  # left by an earlier process that had this pid
        _write_lock(tmp_path, os.getpid())
    else:
        garbage = {"garbage": b"{not json", "binary": b"\xff\xfe\x00", "empty": b""}[content]
        (tmp_path / ".lock").write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="metagrad.checkpoint"), RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "replacing the stale lock" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_release_leaves_a_lock_file_that_is_no_longer_ours(tmp_path: Path, live_pid: int) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / ".lock").unlink()  # removed by hand, and another run took the folder
    record = _write_lock(tmp_path, live_pid)
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text()) == record


def _contend(folder: str, rounds: int, barrier, overlaps) -> None:
    """Take the lock ``rounds`` times at once with the other processes; count overlaps."""
    marker = Path(folder) / "holder"
    for _ in range(rounds):
        barrier.wait()
        try:
            lock = RunLock(folder)
            lock.acquire()
        except CheckpointError:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with overlaps.get_lock():
                overlaps.value += 1
        else:
            os.close(fd)
            time.sleep(0.002)
            marker.unlink()
        lock.release()


def test_processes_racing_for_the_lock_never_hold_it_together(tmp_path: Path) -> None:
    """Four processes take one lock at the same moment, over and over: one holder at a time."""
    context = multiprocessing.get_context("spawn")
    processes, rounds = 4, 60
    barrier, overlaps = context.Barrier(processes), context.Value("i", 0)
    workers = [
        context.Process(target=_contend, args=(str(tmp_path), rounds, barrier, overlaps))
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    assert overlaps.value == 0
    assert not (tmp_path / ".lock").exists()


def test_a_lock_held_by_a_killed_process_is_free(tmp_path: Path) -> None:
    """The OS drops a killed holder's lock: the next run takes over with a warning."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metagrad.checkpoint import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with RunLock(tmp_path) as lock:
        assert lock.record["pid"] == os.getpid()


def test_files_are_created_with_the_process_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        write_json({"a": 1}, tmp_path / "group-readable.json")
        save_checkpoint({"a": torch.ones(1)}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(old)
    for name in ("group-readable.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o664


def test_every_bit_flip_in_a_checkpoint_is_refused_or_harmless(tmp_path: Path) -> None:
    """40 single-bit flips spread over the file: each is refused with one line, or loads the
    very same state (a flip in bytes the reader ignores)."""
    state = {"model": {"w": torch.randn(64, 64)}, "step": 7, "history": [{"loss": 0.5}]}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state, path)
    raw = path.read_bytes()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(raw) * 8, (40,), generator=generator).tolist()
    refused = 0
    for bit in positions:
        damaged = bytearray(raw)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            refused += 1
            continue
        assert torch.equal(loaded["model"]["w"], state["model"]["w"])
        assert loaded["step"] == 7 and loaded["history"] == state["history"]
    assert refused >= 30


def test_a_checkpoint_of_an_earlier_version_still_loads(tmp_path: Path) -> None:
    torch.save({"step": 3}, tmp_path / "old.pt")  # no checksum container
    assert load_checkpoint(tmp_path / "old.pt") == {"step": 3}
