"""The ``metagrad`` command's start-up: Ctrl-C while the package (and torch) still loads ends
the command with one line instead of an import traceback.

Imported first by the package, for this side effect, which applies only to the command."""

from __future__ import annotations

import os
import sys
from types import TracebackType


def run_as_command() -> bool:
    """Whether this process is the ``metagrad`` command (``metagrad ...`` or ``python -m
    metagrad``; while ``-m`` locates the package, ``sys.argv[0]`` is ``"-m"``)."""
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or os.path.basename(first) == "metagrad"


def _excepthook(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        print("metagrad: interrupted while starting; nothing was written", file=sys.stderr)
        return
    sys.__excepthook__(kind, value, traceback)


def quiet_interrupts() -> None:
    """In the command, report a Ctrl-C during start-up as one line."""
    if run_as_command():
        sys.excepthook = _excepthook


quiet_interrupts()
