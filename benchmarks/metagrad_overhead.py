"""MetaGrad's cost next to a plain quantized step: time and peak memory, side by side.

    python -m benchmarks.metagrad_overhead --data ../shared/data/cifar10-jpeg.zip

vgg16 at width 0.25, batch 128, INT4 stochastic per-tensor gradients, float32, compiled kernels.
Step time: every setting's steps interleaved in one process on the same CIFAR-10 batches
(median). Memory: each setting in a fresh process on synthetic CIFAR-shaped data; the figure is
the growth of tensor memory over training steps (optimizer state, gradients, activations,
hypernetwork), from :func:`benchmarks.runner.probe_memory`. Full width and bf16:
:mod:`benchmarks.speed`. Writes ``benchmarks/results/metagrad-overhead.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line, step_memory, time_steps
from metagrad.data import load_cifar10

BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "batch_size": 128,
    "grad_bits": 4,
    "grad_rounding": "stochastic",
}
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {"method": "plain"},
    "metagrad grad+weight h8": {"method": "metagrad", "hyper": "grad+weight", "hyper_hidden": 8},
    "metagrad grad+weight h16": {"method": "metagrad", "hyper": "grad+weight", "hyper_hidden": 16},
    "metagrad grad h8": {"method": "metagrad", "hyper": "grad", "hyper_hidden": 8},
    "metagrad lstm h8": {"method": "metagrad", "hyper": "lstm", "hyper_hidden": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--output", default="benchmarks/results/metagrad-overhead.json")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    settings = {name: {**BASE, **s} for name, s in SETTINGS.items()}
    memory = {name: step_memory(s)["growth_mb"] for name, s in settings.items()}
    data = load_cifar10(args.data)
    seconds = time_steps(settings, data, {**BASE, "data": args.data}, steps=args.steps)
    rows = {
        name: {
            "median_step_seconds": seconds[name],
            "time_ratio_to_plain": seconds[name] / seconds["plain"],
            "step_memory_mb": memory[name],
            "memory_ratio_to_plain": memory[name] / memory["plain"],
        }
        for name in settings
    }
    result = {
        "benchmark": "metagrad-overhead",
        "command": command_line(),
        "settings": BASE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'setting':<26} {'step s':>8} {'x plain':>8} {'mem MB':>8} {'x plain':>8}")
    for name, r in rows.items():
        print(
            f"{name:<26} {r['median_step_seconds']:>8.3f} {r['time_ratio_to_plain']:>8.2f} "
            f"{r['step_memory_mb']:>8.0f} {r['memory_ratio_to_plain']:>8.2f}"
        )


if __name__ == "__main__":
    main()
