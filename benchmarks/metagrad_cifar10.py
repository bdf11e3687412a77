"""MetaGrad against plain quantized gradients on CIFAR-10: vgg16 at width 0.25, 6 epochs.

    python -m benchmarks.metagrad_cifar10 --data ../shared/data/cifar10-jpeg.zip

Runs (seed 0 of every setting first, then seed 1): full precision; INT4 stochastic per tensor and
per sample, plain and MetaGrad, seeds 0 and 1; INT4 nearest per tensor and INT8 nearest per
tensor, plain and MetaGrad, seed 0. Each run is its own process and resumes from its checkpoint, so
the benchmark can be stopped and started again; ``benchmarks/results/metagrad-cifar10.json`` is
rewritten after every run with all the runs finished so far.
"""

from __future__ import annotations

from typing import Any

from benchmarks.runner import training_benchmark

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
    training_benchmark("metagrad-cifar10", __doc__.splitlines()[0], plan(), BASE)


if __name__ == "__main__":
    main()
