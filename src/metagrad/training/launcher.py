"""Launching ``metagrad train`` runs, each in its own process, ``parallel`` at a time.

A :class:`Launch` is a run's name, its settings and its ``--out`` directory. A finished run (its
summary final, with the requested epochs) is read, not trained again; a diverged one is recorded,
not restarted (its divergence is its result); any other is started, and resumed from its
checkpoint when it has one; a run whose summary cannot be read counts as not finished. Ctrl-C
or SIGTERM stops the runs too, each keeping its last completed epoch, and waits for them; on
Linux a run also ends when its launcher is killed outright (``PR_SET_PDEATHSIG``), so no run
outlives it holding its folder's lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metagrad.training.config import TrainConfig
from metagrad.training.run_files import (
    CHECKPOINT,
    RunFileError,
    is_diverged,
    is_finished,
    read_summary,
    warn,
)

__all__ = ["LOG", "Launch", "has_result", "launch_runs", "train_command", "train_flags"]

LOG = "log.txt"
"""A launched run's output, in its directory (when the launcher logs to files)."""
_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


class Terminated(SystemExit):
    """SIGTERM, raised where the launcher waits, so that it stops its runs before it exits."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@dataclass(frozen=True)
class Launch:
    """One ``metagrad train`` run: its name, its settings (``TrainConfig`` keys) and ``--out``."""

    name: str
    settings: dict[str, Any]
    out: Path

    @property
    def epochs(self) -> int:
        return self.settings.get("epochs", TrainConfig.defaults()["epochs"])


def train_flags(settings: dict[str, Any]) -> list[str]:
    """``{"grad_bits": 4, "recipe": True}`` -> ``["--grad-bits", "4", "--recipe"]`` (a false
    switch: ``--no-NAME``)."""
    flags = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def train_command(
    launch: Launch, data: str, threads: int | None = None, nproc: int | None = None
) -> list[str]:
    """The command that trains ``launch``: ``--resume`` when its directory holds a checkpoint,
    ``--threads`` when given (else as its settings say), and under ``torchrun`` with ``nproc``
    processes when given."""
    cmd = [sys.executable, "-m"]
    if nproc is not None:
        cmd += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd += ["metagrad", "train", *train_flags(launch.settings)]
    cmd += ["--data", data, "--out", str(launch.out), "--no-progress"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if (launch.out / CHECKPOINT).exists():
        cmd.append("--resume")
    return cmd


def has_result(launch: Launch) -> bool:
    """Whether ``launch`` is finished or diverged: there is nothing left to train.

    An unreadable or malformed ``summary.json`` (a torn or hand-edited file) is no result: the
    run is trained again (resumed from its checkpoint when it has one, which rewrites the
    summary), with a one-line warning naming the file.
    """
    try:
        summary = read_summary(launch.out)
    except RunFileError as err:
        warn(f"{err}; {launch.name} counts as not finished")
        return False
    return is_finished(summary, launch.epochs) or is_diverged(summary)


def _summary_or_none(out: Path) -> dict[str, Any] | None:
    """The run's summary, None if it has none or it cannot be read."""
    try:
        return read_summary(out)
    except RunFileError:
        return None


def launch_runs(
    runs: Sequence[Launch],
    data: str,
    *,
    parallel: int = 1,
    threads: int | None = None,
    nproc: int | None = None,
    log: bool = True,
    label: str = "launcher",
    on_result: Callable[[Launch], None] | None = None,
) -> dict[str, int]:
    """Train every run that has no result yet, ``parallel`` at a time; the exit status of each
    run trained (0 for one that diverged: its divergence is its result).

    Each run takes ``threads`` torch threads (when given), and runs under ``torchrun`` with
    ``nproc`` processes when that is given.

    ``log``: each run's output is appended to ``LOG`` in its directory, else it goes to this
    process's. ``on_result(run)`` is called, in this thread, for every run with a result: found
    finished or diverged, or trained with exit status 0 or to its divergence. Ctrl-C, SIGTERM
    (raised as :class:`Terminated`) or any error stops the runs with SIGINT, each keeping its
    last completed epoch, waits for them, and is raised.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    todo = []
    for run in runs:
        if not has_result(run):
            todo.append(run)
        elif on_result is not None:
            on_result(run)
    print(f"{label}: {len(todo)} runs to train, {len(runs) - len(todo)} finished", flush=True)
    status: dict[str, int] = {}
    active: dict[str, tuple[Launch, subprocess.Popen, IO[str] | None]] = {}
    previous = _on_sigterm()
    try:
        while todo or active:
            while todo and len(active) < parallel:
                run = todo.pop(0)
                active[run.name] = (run, *_start(run, data, threads, nproc, log))
            time.sleep(_POLL_SECONDS)
            for name, (run, proc, log_file) in list(active.items()):
                code = proc.poll()
                if code is not None:
                    if log_file is not None:
                        log_file.close()
                    del active[name]
                    status[name] = _outcome(run, code, log)
                    if status[name] == 0 and on_result is not None:
                        on_result(run)
    except BaseException:
        for _, proc, _ in active.values():
            proc.send_signal(signal.SIGINT)
        for _, proc, log_file in active.values():
            proc.wait()
            if log_file is not None:
                log_file.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return status


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` (main thread only); the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _die_with_parent() -> None:
    """In a child, before it runs: SIGTERM when the launcher dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(
    run: Launch, data: str, threads: int | None, nproc: int | None, log: bool
) -> tuple[subprocess.Popen, IO[str] | None]:
    """Start ``run``'s process: (the process, its open log file or None)."""
    run.out.mkdir(parents=True, exist_ok=True)
    cmd = train_command(run, data, threads, nproc)
    print(f"  start {run.name}", flush=True)
    if not log:
        return subprocess.Popen(cmd, preexec_fn=_die_with_parent), None
    log_file = (run.out / LOG).open("a")
    proc = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )
    return proc, log_file


def _outcome(run: Launch, code: int, log: bool) -> int:
    """Report how ``run`` ended; its status (0 for done or diverged)."""
    diverged = code != 0 and is_diverged(_summary_or_none(run.out))
    failed = f"exited with {code}" + (f" (see {run.name}/{LOG})" if log else "")
    note = "done" if code == 0 else failed
    print(f"  {run.name}: {'diverged (recorded)' if diverged else note}", flush=True)
    return 0 if diverged else code
