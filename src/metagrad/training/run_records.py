"""The run records of ``metagrad reproduce`` (the ``runs`` of a ``results.json``): their
fields, and checking them field by field before any is used.

A record comes from a run folder's ``summary.json`` or from a ``--merge`` file; either way a
missing field, an unknown setting or a value of the wrong type (a string or NaN accuracy) is a
:class:`~metagrad.training.run_files.RunFileError` with one line naming the file, the record and
the field.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from metagrad.training.run_files import RunFileError, is_number, json_kind

__all__ = ["RECORD_FIELDS", "check_fields", "check_record", "completed"]

RECORD_FIELDS = (
    "run",
    "setting",
    "method",
    "seed",
    "model",
    "width",
    "epochs",
    "epochs_completed",
    "final_test_acc",
    "best_test_acc",
)
"""The fields every run record (``results.json``'s ``runs``) has; the others may be absent."""
_DEFAULTS: dict[str, Any] = {
    "diverged_at_step": None,
    "mean_step_seconds": None,
    "peak_memory_mb": None,
    "amp": "off",
    "compile": "off",
    "provenance": None,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size_or_null(value: Any) -> bool:
    return value is None or (is_number(value) and value >= 0)


def _accuracy(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 100


def _accuracy_or_null(value: Any) -> bool:
    return value is None or _accuracy(value)


_CHECKS: dict[str, tuple[Any, str]] = {
    "run": (lambda v: isinstance(v, str) and v != "", "a run name"),
    "method": (lambda v: v in ("plain", "metagrad"), "plain or metagrad"),
    "seed": (_is_int, "an integer"),
    "model": (lambda v: isinstance(v, str), "a model name"),
    "width": (lambda v: is_number(v) and v > 0, "a positive number"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "epochs_completed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "final_test_acc": (_accuracy_or_null, "a percentage in [0, 100] or null"),
    "best_test_acc": (_accuracy_or_null, "a percentage in [0, 100] or null"),
    "diverged_at_step": (lambda v: v is None or _is_int(v), "a step number or null"),
    "test_acc_per_epoch": (
        lambda v: isinstance(v, list) and all(map(_accuracy, v)),
        "a list of percentages in [0, 100]",
    ),
    "mean_step_seconds": (_size_or_null, "a number >= 0 or null"),
    "peak_memory_mb": (_size_or_null, "a number >= 0 or null"),
    "amp": (lambda v: isinstance(v, str), "a string"),
    "compile": (lambda v: isinstance(v, str), "a string"),
    "provenance": (
        lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("commit"), str | None)),
        "an object (with a string or null commit) or null",
    ),
}


def check_fields(record: dict[str, Any], where: str, settings: Collection[str]) -> dict[str, Any]:
    """``record`` with its absent optional fields at their defaults, every field checked
    (``settings``: the known settings); RunFileError naming ``where`` if one is wrong."""
    missing = [key for key in RECORD_FIELDS if key not in record]
    if missing:
        raise RunFileError(f"{where}: the record lacks {', '.join(missing)}")
    record = {**_DEFAULTS, "test_acc_per_epoch": [], **record}
    setting = record["setting"]
    if not (isinstance(setting, str) and setting in settings):
        choices = ", ".join(settings)
        raise RunFileError(f"{where}: unknown setting {json_kind(setting)} (one of {choices})")
    for key, (ok, expected) in _CHECKS.items():
        if not ok(record[key]):
            raise RunFileError(f"{where}: {key} is {json_kind(record[key])}, expected {expected}")
    if completed(record) and record["final_test_acc"] is None:
        raise RunFileError(
            f"{where}: final_test_acc is null, although the run completed its "
            f"{record['epochs']} epochs without diverging"
        )
    return record


def check_record(record: Any, where: str, settings: Collection[str]) -> dict[str, Any]:
    """``record`` (a ``results.json`` run record) checked field by field, with its absent
    optional fields at their defaults.

    Raises:
        RunFileError: one line naming ``where``, the run and the problem: not an object, a
            missing field, an unknown setting, a field of the wrong type (a string, NaN...).
    """
    if not isinstance(record, dict):
        raise RunFileError(f"{where}: expected a run record (an object), got {json_kind(record)}")
    if isinstance(record.get("run"), str):
        where = f"{where} (run {record['run']!r})"
    return check_fields(record, where, settings)


def completed(record: dict[str, Any]) -> bool:
    """Whether the run trained all its epochs without diverging."""
    return record["diverged_at_step"] is None and record["epochs_completed"] >= record["epochs"]
