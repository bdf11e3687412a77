"""Learning curves from runs' ``metrics.jsonl`` files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from metagrad.training.config import ConfigError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run directory (partial-epoch records left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics.jsonl in {run_dir}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({type(err).__name__})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}, line {number}: not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int | float):
            raise ConfigError(f"{path}, line {number}: not an epoch record") from None
        records.append(record)
    return [r for r in records if not r.get("partial")]


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
        label = labels[i] if labels else Path(run).name
        ax.plot(
            [r["epoch"] for r in records], [r[metric] for r in records], marker="o", label=label
        )
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
