"""The ``metagrad`` command's start-up: Ctrl-C while the package (and torch) still loads ends
the command with one line instead of an import traceback.

Imported first by the package, for this side effect, which applies only to the command: while
the package's imports run, a Ctrl-C is held (an interrupt inside a compiled library's import can
leave it half-loaded and fail later with an unrelated error) and acted on by :func:`started`;
later, an interrupt that escapes the command's own handling is printed as one line."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType, TracebackType

INTERRUPTED = "metagrad: interrupted while starting; nothing was written"
_held: list[int] = []


def run_as_command() -> bool:
    """Whether this process is the ``metagrad`` command (``metagrad ...`` or ``python -m
    metagrad``; while ``-m`` locates the package, ``sys.argv[0]`` is ``"-m"``)."""
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or os.path.basename(first) == "metagrad"


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def _interrupted(error: BaseException | None) -> bool:
    """Whether ``error`` is a Ctrl-C, or an error a Ctrl-C caused (its context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _excepthook(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if _interrupted(value):
        print(INTERRUPTED, file=sys.stderr)
        return
    sys.__excepthook__(kind, value, traceback)


def quiet_interrupts() -> None:
    """In the command: hold Ctrl-C until :func:`started`, then report any as one line."""
    if run_as_command():
        signal.signal(signal.SIGINT, _hold)
        sys.excepthook = _excepthook


def started() -> None:
    """The package is loaded: Ctrl-C interrupts again, and one held meanwhile ends the command."""
    if not run_as_command() or signal.getsignal(signal.SIGINT) is not _hold:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _held:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)


quiet_interrupts()
