"""Does a longer horizon help? MetaGrad trained through its last K updates, K = 1 to 4.

    python -m benchmarks.metagrad_horizon --data ../shared/data/cifar10-jpeg.zip \\
        --threads 1 --parallel 2

The ablation setting (``metagrad_ablations.py``): vgg16 at width 0.25, 3 epochs, batch 128, lr
0.1, gradient diagnostics every 50 steps, for INT4 stochastic per-tensor and INT8 nearest
per-tensor gradients, seeds 0, 1 and 2: plain training, and MetaGrad (grad+weight, hidden 8,
hypernetwork lr 1e-4) with ``--hyper-horizon`` 1 (today's one-step method), 2, 3 and 4; the gain
form at hypernetwork lr 1e-3 (which damps the largest elements at K = 1) at K = 1 and 4; and the
signed-gain form at K = 1 (INT4). ``--only`` picks runs. The one-step objective rewards
whatever lowers the very next loss; if that short horizon is why the hypernetwork damps the
largest elements and does not move the cosine to the full-precision gradient, a longer one
should change both. Per run: final
accuracy, cosine of the used and of the quantized gradient to the full-precision one (per epoch),
the learned response ``H / g`` at +-0.5..8 rms, and the step time. Resumable; writes
``benchmarks/results/metagrad-horizon.json`` after every run.

    python -m benchmarks.metagrad_horizon --cost --data ../shared/data/cifar10-jpeg.zip

measures the cost instead, on an idle machine: median step time of plain INT4 training and of
MetaGrad at each K, interleaved on the same batches in one process (eager kernels, 2 threads),
into ``benchmarks/results/metagrad-horizon-cost.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.metagrad_ablations import BASE, METAGRAD, diagnostics, learned_response
from benchmarks.runner import command_line, training_benchmark

GRADIENTS: dict[str, dict[str, Any]] = {
    "int4-stochastic-tensor": {"grad_bits": 4, "grad_rounding": "stochastic"},
    "int8-nearest-tensor": {"grad_bits": 8, "grad_rounding": "nearest"},
}
HORIZONS = (1, 2, 3, 4)
SEEDS = (0, 1, 2)


def plan() -> list[tuple[str, dict[str, Any]]]:
    """Every run, seed by seed, INT4 first (the setting of the ablations)."""
    runs = []
    for gradients, quant in GRADIENTS.items():
        for seed in SEEDS:
            runs.append((f"{gradients}-plain-seed{seed}", {**quant, "seed": seed}))
            for k in HORIZONS:
                settings = {**quant, **METAGRAD, "hyper_horizon": k, "seed": seed}
                runs.append((f"{gradients}-metagrad-k{k}-seed{seed}", settings))
    # The gain form at hypernetwork lr 1e-3 learns to damp the largest elements at K = 1
    # (metagrad_ablations.py): does a longer horizon undo that?
    gain = {**GRADIENTS["int4-stochastic-tensor"], **METAGRAD, "hyper_form": "gain"}
    for k in (1, 4):
        settings = {**gain, "hyper_lr": 1e-3, "hyper_horizon": k, "seed": 0}
        runs.append((f"int4-stochastic-tensor-gain-lr1e-3-k{k}-seed0", settings))
    signed = {**GRADIENTS["int4-stochastic-tensor"], **METAGRAD, "hyper_form": "signed-gain"}
    runs += [(f"int4-stochastic-tensor-signed-gain-seed{s}", {**signed, "seed": s}) for s in SEEDS]
    return runs


RUNS = plan()


def with_diagnostics(name: str, record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The run's record with its overrides, gradient diagnostics and learned correction."""
    import json

    first = (out / "metrics.jsonl").read_text().splitlines()[:1]
    steps_per_epoch = json.loads(first[0])["step"] if first else record["steps"]
    record = {
        **record,
        "overrides": dict(RUNS)[name],
        "gradients": diagnostics(out / "gradients.jsonl", steps_per_epoch),
    }
    if record["method"] == "metagrad":
        record["learned_response"] = learned_response(out)
    return record


def cost(data_path: str, steps: int = 20) -> None:
    """Step time of each K against plain INT4 training, side by side (see the module docs)."""
    import json

    import torch

    from benchmarks.runner import time_steps
    from metagrad.data import load_cifar10

    torch.set_num_threads(2)
    base = {**BASE, **GRADIENTS["int4-stochastic-tensor"], "compile": "off", "diag_every": 0}
    settings = {"plain": {}} | {
        f"metagrad-k{k}": {**METAGRAD, "hyper_horizon": k} for k in HORIZONS
    }
    seconds = time_steps(settings, load_cifar10(data_path), base, steps=steps)
    result = {
        "benchmark": "metagrad-horizon-cost",
        "command": command_line(),
        "settings": base,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_step_seconds": seconds,
        "ratio_to_plain": {name: t / seconds["plain"] for name, t in seconds.items()},
        "ratio_to_k1": {name: t / seconds["metagrad-k1"] for name, t in seconds.items()},
    }
    out = Path("benchmarks/results/metagrad-horizon-cost.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_to_plain"], indent=2))


def main() -> None:
    if "--cost" in sys.argv:
        data = sys.argv[sys.argv.index("--data") + 1] if "--data" in sys.argv else None
        cost(data or "../shared/data/cifar10-jpeg.zip")
        return
    training_benchmark("metagrad-horizon", __doc__.splitlines()[0], RUNS, BASE, with_diagnostics)


if __name__ == "__main__":
    main()
