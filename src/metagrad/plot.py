"""Learning curves from runs' ``metrics.jsonl`` files (read by
:func:`metagrad.training.run_files.read_metrics`: a bad line is one error naming the file and
line)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from metagrad.training.config import ConfigError
from metagrad.training.run_files import METRICS, is_number, json_kind, read_metrics


def plot_runs(
    runs: Sequence[str | Path],
    output: str | Path,
    metric: str = "test_acc",
    labels: Sequence[str] | None = None,
) -> Path:
    """Plot ``metric`` against epoch for each run into one PNG/PDF/SVG file; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, run in enumerate(runs):
        records = read_metrics(run)
        if any(metric not in r for r in records):
            raise ConfigError(f"{run}: metrics.jsonl has no key {metric!r} in every record")
        for r in records:
            if r[metric] is not None and not is_number(r[metric]):
                raise ConfigError(
                    f"{Path(run) / METRICS}: {metric} of epoch {r['epoch']} is "
                    f"{json_kind(r[metric])}, not a number"
                )
        values = [math.nan if r[metric] is None else r[metric] for r in records]  # a gap
        label = labels[i] if labels else Path(run).name
        ax.plot([r["epoch"] for r in records], values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
