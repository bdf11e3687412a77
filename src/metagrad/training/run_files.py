"""The files a training run writes into its ``--out`` directory, and reading them back.

``checkpoint.pt`` (the state to resume from), ``metrics.jsonl`` (one record per epoch),
``gradients.jsonl`` (the ``--diag-every`` diagnostics) and ``summary.json`` (what the run
reached; ``in_progress`` while it trains). A run is *finished* when its summary is final and
counts the requested epochs, *diverged* when its summary records the step where it stopped on a
non-finite loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metagrad.checkpoint import CheckpointError, load_checkpoint

__all__ = [
    "CHECKPOINT",
    "GRADIENTS",
    "METRICS",
    "OUTPUT_FILES",
    "SUMMARY",
    "is_diverged",
    "is_finished",
    "read_summary",
    "saved_config",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
GRADIENTS = "gradients.jsonl"
SUMMARY = "summary.json"
OUTPUT_FILES = (CHECKPOINT, METRICS, GRADIENTS, SUMMARY)


def saved_config(out: str | Path) -> dict[str, Any]:
    """The settings saved with the run in ``out`` (for ``--resume``)."""
    path = Path(out) / CHECKPOINT
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no run settings; not a metagrad run")
    return config


def read_summary(out: str | Path) -> dict[str, Any] | None:
    """The summary of the run in ``out``, or None when it has none yet."""
    path = Path(out) / SUMMARY
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_finished(summary: dict[str, Any] | None, epochs: int) -> bool:
    """Whether ``summary`` is that of a run that trained all of its ``epochs``."""
    if summary is None or summary.get("in_progress") or is_diverged(summary):
        return False
    return summary.get("epochs_completed", 0) >= epochs


def is_diverged(summary: dict[str, Any] | None) -> bool:
    """Whether ``summary`` says the run stopped on a non-finite loss (its result, not a failure)."""
    return summary is not None and summary.get("diverged_at_step") is not None
