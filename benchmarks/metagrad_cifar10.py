"""MetaGrad against plain quantized gradients on CIFAR-10: vgg16 at width 0.25, 6 epochs.

    python benchmarks/metagrad_cifar10.py --data ../shared/data/cifar10-jpeg.zip

Runs (seed 0 of every setting first, then seed 1): full precision; INT4 stochastic per tensor and
per sample, plain and MetaGrad, seeds 0 and 1; INT4 nearest per tensor and INT8 nearest per
tensor, plain and MetaGrad, seed 0. Each run is its own process and resumes from its checkpoint, so
the benchmark can be stopped and started again; ``benchmarks/results/metagrad-cifar10.json`` is
rewritten after every run with all the runs finished so far.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import train_run

BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "epochs": 6,
    "batch_size": 128,
    "lr": 0.1,
    "hyper": "grad+weight",
    "hyper_hidden": 8,
    "hyper_lr": 1e-4,
}
INT4_STOCHASTIC = {"grad_bits": 4, "grad_rounding": "stochastic"}
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"grad_bits": 32},
    "int4-stochastic-tensor": {**INT4_STOCHASTIC, "grad_granularity": "tensor"},
    "int4-stochastic-sample": {**INT4_STOCHASTIC, "grad_granularity": "sample"},
    "int4-nearest-tensor": {"grad_bits": 4, "grad_rounding": "nearest"},
    "int8-nearest-tensor": {"grad_bits": 8, "grad_rounding": "nearest"},
}
TWO_SEEDS = ("fp32", "int4-stochastic-tensor", "int4-stochastic-sample")


def plan() -> list[tuple[str, dict[str, Any]]]:
    """Every (run name, settings) pair, all seed-0 runs first."""
    runs = []
    for seed in (0, 1):
        for name, settings in SETTINGS.items():
            if seed == 1 and name not in TWO_SEEDS:
                continue
            methods = ["plain"] if name == "fp32" else ["plain", "metagrad"]
            for method in methods:
                label = name if name == "fp32" else f"{name}-{method}"
                runs.append((f"{label}-seed{seed}", {**settings, "method": method, "seed": seed}))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default="runs/metagrad-cifar10")
    parser.add_argument("--output", default="benchmarks/results/metagrad-cifar10.json")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    args = parser.parse_args()
    base = {**BASE, "threads": args.threads}

    output = Path(args.output)
    done: dict[str, dict[str, Any]] = {}
    if output.is_file():
        done = {r["run"]: r for r in json.loads(output.read_text())["runs"]}
    for name, settings in plan():
        if args.only and name not in args.only:
            continue
        done[name] = train_run(name, {**base, **settings}, args.data, Path(args.runs_dir))
        result = {
            "benchmark": "metagrad-cifar10",
            "command": " ".join(["python", *sys.argv]),
            "settings": base,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "runs": [done[n] for n, _ in plan() if n in done],
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        acc = done[name]["final_test_acc"]
        print(f"   {name}: " + (f"final test acc {acc:.2f}%" if acc is not None else "diverged"))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
