"""The files a training run writes into its ``--out`` directory, and reading them back.

``checkpoint.pt`` (the state to resume from), ``metrics.jsonl`` (one record per epoch),
``gradients.jsonl`` (the ``--diag-every`` diagnostics) and ``summary.json`` (what the run
reached; ``in_progress`` while it trains). A run is *finished* when its summary is final and
counts the requested epochs, *diverged* when its summary records the step where it stopped on a
non-finite loss.

The JSON files are read here only (:func:`read_json`, :func:`read_summary`,
:func:`read_metrics`), by ``reproduce``, ``plot`` and the launcher alike: a missing, oversized,
non-UTF-8 or malformed file raises :class:`RunFileError` with one line naming the file (and the
line of a ``.jsonl`` file) and the problem.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metagrad.checkpoint import CheckpointError, load_checkpoint
from metagrad.training.config import ConfigError

__all__ = [
    "CHECKPOINT",
    "GRADIENTS",
    "MAX_RUN_FILE_BYTES",
    "METRICS",
    "OUTPUT_FILES",
    "SUMMARY",
    "RunFileError",
    "is_diverged",
    "is_finished",
    "is_number",
    "json_kind",
    "read_json",
    "read_metrics",
    "read_summary",
    "saved_config",
    "warn",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
GRADIENTS = "gradients.jsonl"
SUMMARY = "summary.json"
OUTPUT_FILES = (CHECKPOINT, METRICS, GRADIENTS, SUMMARY)
MAX_RUN_FILE_BYTES = 256 << 20
"""Largest JSON file read (``summary.json``, ``metrics.jsonl``, a ``results.json``): a run
writes a few KiB per epoch, so this is far above any real file and bounds a hostile one."""


class RunFileError(ConfigError):
    """A run's file (or a results file) is missing, unreadable or malformed; the message is one
    line naming the file and the problem."""


def warn(message: str) -> None:
    """Print ``metagrad: warning: <message>`` as one line on stderr."""
    line = re.sub(r"\s*\n\s*", " ", message)
    print(f"metagrad: warning: {line}", file=sys.stderr, flush=True)


def json_kind(value: Any) -> str:
    """What ``value`` is, in JSON's words: ``"the string 'abc'"``, ``"NaN"``, ``"a list"``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value).replace("nan", "NaN").replace("inf", "Infinity")
    if isinstance(value, int | float):
        text = repr(value) if isinstance(value, float) or abs(value) < 10**40 else "1e40+"
        return f"the number {text}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool, NaN, infinity or an int too large
    for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``, refused past :data:`MAX_RUN_FILE_BYTES`."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_RUN_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except OSError as err:
        raise RunFileError(f"{path}: unreadable ({err.strerror or type(err).__name__})") from None
    if len(raw) > MAX_RUN_FILE_BYTES:
        limit = MAX_RUN_FILE_BYTES >> 20
        raise RunFileError(f"{path}: unreadable (larger than the {limit} MiB limit)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path}: unreadable (not UTF-8 at byte {err.start})") from None


def _loads(text: str) -> Any:
    """``json.loads``, with a nesting too deep for the parser raised as a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """The JSON value of the file ``path``; RunFileError (one line) if it has none."""
    path = Path(path)
    try:
        return _loads(_read_text(path))
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise RunFileError(f"{path}: not valid JSON: {err.msg} ({where})") from None
    except ValueError as err:
        raise RunFileError(f"{path}: not valid JSON: {err}") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a ``.jsonl`` file."""
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield number, _loads(line)
            except ValueError:
                raise RunFileError(f"{path}, line {number}: not a JSON record") from None


def saved_config(out: str | Path) -> dict[str, Any]:
    """The settings saved with the run in ``out`` (for ``--resume``)."""
    path = Path(out) / CHECKPOINT
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no run settings; not a metagrad run")
    return config


def read_summary(out: str | Path) -> dict[str, Any] | None:
    """The summary of the run in ``out``, or None when it has none yet.

    Raises:
        RunFileError: the file is unreadable, not JSON (a run killed mid-write by an earlier
            version, a hand edit) or not a JSON object.
    """
    path = Path(out) / SUMMARY
    if not path.exists():
        return None
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {json_kind(summary)}")
    return summary


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of the run in ``out`` (partial-epoch records left out).

    Raises:
        RunFileError: no ``metrics.jsonl``, or one with a line that is not JSON or not an epoch
            record (an object with a numeric ``epoch``); the message names the file and line.
    """
    path = Path(out) / METRICS
    if not path.is_file():
        raise RunFileError(f"no {METRICS} in {out}")
    records = []
    for number, record in _json_lines(path):
        if not isinstance(record, dict) or not is_number(record.get("epoch")):
            raise RunFileError(f"{path}, line {number}: not an epoch record")
        records.append(record)
    return [r for r in records if not r.get("partial")]


def is_finished(summary: dict[str, Any] | None, epochs: int) -> bool:
    """Whether ``summary`` is that of a run that trained all of its ``epochs``."""
    if summary is None or summary.get("in_progress") or is_diverged(summary):
        return False
    done = summary.get("epochs_completed", 0)
    return is_number(done) and done >= epochs


def is_diverged(summary: dict[str, Any] | None) -> bool:
    """Whether ``summary`` says the run stopped on a non-finite loss (its result, not a failure)."""
    return summary is not None and summary.get("diverged_at_step") is not None
