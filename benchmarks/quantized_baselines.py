"""Plain quantized-gradient baselines on CIFAR-10: vgg16 at width 0.25, 4 epochs, seed 0.

    python -m benchmarks.quantized_baselines --data ../shared/data/cifar10-jpeg.zip

Trains full-precision gradients, INT8 nearest, INT4 nearest, INT4 stochastic (per tensor) and
INT4 stochastic per sample, each in its own process (so peak memory is per run), and writes one
record per run to ``benchmarks/results/quantized-baselines.json``. It then times the training
steps of every setting side by side, interleaved on the same batches, and reports each quantized
step's cost relative to the full-precision one.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line, step_memory, time_steps, train_runs
from metagrad.data import load_cifar10

RUNS: dict[str, dict[str, Any]] = {
    "fp32": {"grad_bits": 32},
    "int8-nearest-tensor": {"grad_bits": 8, "grad_rounding": "nearest"},
    "int4-nearest-tensor": {"grad_bits": 4, "grad_rounding": "nearest"},
    "int4-stochastic-tensor": {"grad_bits": 4, "grad_rounding": "stochastic"},
    "int4-stochastic-sample": {
        "grad_bits": 4,
        "grad_rounding": "stochastic",
        "grad_granularity": "sample",
    },
}
BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "epochs": 4,
    "batch_size": 128,
    "lr": 0.1,
    "seed": 0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default="runs/quantized-baselines")
    parser.add_argument("--output", default="benchmarks/results/quantized-baselines.json")
    parser.add_argument("--epochs", type=int, default=BASE["epochs"])
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    args = parser.parse_args()

    base = {**BASE, "epochs": args.epochs, "threads": args.threads}
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(name, {**base, **settings}) for name, settings in RUNS.items()]
    trained = train_runs(runs, args.data, Path(args.runs_dir))
    records = [trained[name] for name in RUNS]
    print("== side-by-side step timing", flush=True)
    medians = time_steps(
        RUNS, load_cifar10(args.data), {**base, "data": args.data}, steps=args.timing_steps
    )
    # Peak memory, comparable across settings: each in a fresh process on synthetic data, the
    # growth of tensor memory over training steps.
    for r in records:
        r["peak_memory_mb"] = step_memory({**base, **RUNS[r["run"]], "threads": 0})["growth_mb"]
        r["peak_memory_kind"] = "training-step tensor memory growth, fresh process"
    reference = medians["fp32"]
    timing = {
        name: {"median_step_seconds": t, "ratio_to_fp32": t / reference}
        for name, t in medians.items()
    }
    result = {
        "benchmark": "quantized-baselines",
        "command": command_line(),
        "settings": base,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "runs": records,
        "side_by_side_step_time": timing,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'run':<24} {'test acc':>9} {'step s':>8} {'x fp32':>7} {'peak MB':>8}")
    for r in records:
        ratio = timing[r["run"]]["ratio_to_fp32"]
        print(
            f"{r['run']:<24} {r['final_test_acc']:>8.2f}% {r['mean_step_seconds']:>8.3f} "
            f"{ratio:>7.3f} {r['peak_memory_mb']:>8.0f}"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
