"""A launcher stopped by SIGTERM or SIGKILL leaves no run behind holding its folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metagrad.checkpoint import RunLock

SRC = Path(__file__).resolve().parents[1] / "src"
LAUNCH = """
import sys
from pathlib import Path
from metagrad.training.launcher import Launch, launch_runs
settings = {"model": "small_cnn", "epochs": 200, "batch_size": 32, "compile": "off",
            "threads": 1}
launch_runs([Launch("long", settings, Path(sys.argv[1]))], "digits", log=False)
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _start(out: Path) -> tuple[subprocess.Popen, int]:
    """The launcher, and its run's pid once the run holds its folder's lock."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(out)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() or not _children(launcher.pid):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    return launcher, _children(launcher.pid)[0]


def _gone(pid: int, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_launcher_leaves_no_run_holding_the_folder(tmp_path, how):
    out = tmp_path / "run"
    launcher, run = _start(out)
    try:
        os.kill(launcher.pid, how)
        launcher.wait(timeout=120)
        assert _gone(run), "the run outlived its launcher"
        if how == signal.SIGTERM:
            assert launcher.returncode == 128 + signal.SIGTERM
    finally:
        for pid in (run, launcher.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    with RunLock(out):  # an immediate rerun can take the folder
        pass
