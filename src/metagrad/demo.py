"""``metagrad demo``: full-precision against quantized gradients on a dataset that ships offline.

The data is scikit-learn's built-in handwritten digits (1,797 8x8 images), so the demo needs no
download and no path; each run trains ``small_cnn`` for about a second on the CPU, and every
setting is repeated over a few seeds because the test split is small (450 images).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
from pathlib import Path
from typing import Any

from metagrad.checkpoint import write_json
from metagrad.plot import plot_runs
from metagrad.training.config import ConfigError, build_config
from metagrad.training.trainer import train

DEMO_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("fp32 gradients", {"grad_bits": 32}),
    ("int4 nearest", {"grad_bits": 4, "grad_rounding": "nearest"}),
    ("int3 nearest", {"grad_bits": 3, "grad_rounding": "nearest"}),
    ("int3 nearest + MetaGrad", {"grad_bits": 3, "grad_rounding": "nearest", "method": "metagrad"}),
    ("int3 stochastic", {"grad_bits": 3, "grad_rounding": "stochastic"}),
    (
        "int3 stochastic + MetaGrad",
        {"grad_bits": 3, "grad_rounding": "stochastic", "method": "metagrad"},
    ),
    ("int2 stochastic", {"grad_bits": 2, "grad_rounding": "stochastic"}),
]
DEMO_SETTINGS: dict[str, Any] = {
    "model": "small_cnn",
    "data": "digits",
    "batch_size": 32,
    "lr": 0.05,
    "progress": False,
    "compile": "off",  # 8x8 images: compiling would take longer than the runs it speeds up
}


def _slug(label: str) -> str:
    return label.replace(" + ", "-").replace(" ", "-")


def run_demo(out: str = "runs/demo", epochs: int = 8, seeds: int = 3) -> list[dict[str, Any]]:
    """Train every demo setting, print a side-by-side table, write ``demo.json`` and a plot."""
    for name, value in (("epochs", epochs), ("seeds", seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"demo: {name} must be an integer >= 1, got {value!r}")
    root = Path(out)
    results: list[dict[str, Any]] = []
    print(f"metagrad demo: small_cnn on scikit-learn digits, {epochs} epochs, {seeds} seeds each")
    for label, overrides in DEMO_RUNS:
        accs, losses, step_ms = [], [], []
        for seed in range(seeds):
            run_dir = root / _slug(label) / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = {**DEMO_SETTINGS, **overrides, "epochs": epochs, "seed": seed}
            with contextlib.redirect_stdout(io.StringIO()):  # the table says it all
                summary = train(build_config({**cfg, "out": str(run_dir)}))
            accs.append(summary["final_test_acc"])
            losses.append(summary["final_train_loss"])
            step_ms.append(1000 * summary["mean_step_seconds"])
        results.append(
            {
                "run": label,
                "settings": overrides,
                "test_acc": accs,
                "mean_test_acc": statistics.mean(accs),
                "mean_train_loss": statistics.mean(losses),
                "mean_step_ms": statistics.mean(step_ms),
            }
        )
        print(f"  {label:<26} test acc {statistics.mean(accs):6.2f}%", flush=True)
    _print_table(results)
    write_json(
        {"epochs": epochs, "seeds": seeds, "settings": DEMO_SETTINGS, "runs": results},
        root / "demo.json",
    )
    plot = plot_runs(
        [root / _slug(r["run"]) / "seed0" for r in results],
        root / "demo.png",
        metric="train_loss",
        labels=[r["run"] for r in results],
    )
    print(f"\nwrote {root / 'demo.json'} and {plot} (train loss per epoch, seed 0)")
    return results


def _print_table(results: list[dict[str, Any]]) -> None:
    reference = results[0]["mean_test_acc"]
    print(
        f"\n{'backward pass':<26} {'test acc':>9} {'vs fp32':>8} {'train loss':>11} {'step ms':>8}"
    )
    for r in results:
        print(
            f"{r['run']:<26} {r['mean_test_acc']:>8.2f}% {r['mean_test_acc'] - reference:>+8.2f} "
            f"{r['mean_train_loss']:>11.4f} {r['mean_step_ms']:>8.2f}"
        )
