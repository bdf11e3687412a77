"""Why MetaGrad does not beat plain INT4 training: ablations with gradient diagnostics.

    python -m benchmarks.metagrad_ablations --data ../shared/data/cifar10-jpeg.zip

vgg16 at width 0.25, 3 epochs, INT4 stochastic per-tensor gradients (the quantizer the goal names),
seed 0, every run with ``--diag-every 50``: every 50 steps, on that step's batch, each quantized
layer's gradient is compared with the full-precision one (cosine), before and after the
hypernetwork's correction, and the correction's size is recorded (``|H(g) - g| / |g|``). Runs:
plain (seeds 0, 1 and 2: the spread), and MetaGrad varying one thing at a time from the default
(grad+weight, hidden 8, hypernetwork lr 1e-4): the hypernetwork lr (3e-4, 1e-3), its inputs
(gradient only), its width (32), its kind (LSTM) and the form of its correction (a gain per
element, at lr 1e-4 and 1e-3); full-precision gradients, plain and MetaGrad (does the
hypernetwork improve even an unquantized gradient?); and INT4 nearest per tensor, plain and
MetaGrad with either form. Every plain baseline has seeds 0, 1 and 2. Each run resumes from its
checkpoint; ``benchmarks/results/metagrad-ablations.json`` is rewritten after every run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import training_benchmark
from metagrad.checkpoint import load_checkpoint
from metagrad.meta.forms import HYPERNET_FORMS
from metagrad.meta.hyper import create_hypernet

BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "epochs": 3,
    "batch_size": 128,
    "lr": 0.1,
    "grad_bits": 4,
    "grad_rounding": "stochastic",
    "grad_granularity": "tensor",
    "diag_every": 50,
    "seed": 0,
}
METAGRAD = {"method": "metagrad", "hyper": "grad+weight", "hyper_hidden": 8, "hyper_lr": 1e-4}
RUNS: dict[str, dict[str, Any]] = {
    "plain-seed0": {"method": "plain"},
    "plain-seed1": {"method": "plain", "seed": 1},
    "plain-seed2": {"method": "plain", "seed": 2},
    "metagrad": METAGRAD,
    "metagrad-lr3e-4": {**METAGRAD, "hyper_lr": 3e-4},
    "metagrad-lr1e-3": {**METAGRAD, "hyper_lr": 1e-3},
    "metagrad-grad-only": {**METAGRAD, "hyper": "grad"},
    "metagrad-hidden32": {**METAGRAD, "hyper_hidden": 32},
    "metagrad-lstm": {**METAGRAD, "hyper": "lstm"},
    "fp32": {"method": "plain", "grad_bits": 32},
    "fp32-seed1": {"method": "plain", "grad_bits": 32, "seed": 1},
    "fp32-seed2": {"method": "plain", "grad_bits": 32, "seed": 2},
    "metagrad-fp32": {**METAGRAD, "grad_bits": 32},
    "metagrad-gain": {**METAGRAD, "hyper_form": "gain"},
    "metagrad-gain-lr1e-3": {**METAGRAD, "hyper_form": "gain", "hyper_lr": 1e-3},
    "nearest-plain": {"method": "plain", "grad_rounding": "nearest"},
    "nearest-plain-seed1": {"method": "plain", "grad_rounding": "nearest", "seed": 1},
    "nearest-plain-seed2": {"method": "plain", "grad_rounding": "nearest", "seed": 2},
    "nearest-metagrad": {**METAGRAD, "grad_rounding": "nearest"},
    "nearest-metagrad-gain": {**METAGRAD, "grad_rounding": "nearest", "hyper_form": "gain"},
}


def _correction(record: dict[str, Any]) -> float:
    """Mean correction size over layers; NaN (from ``gradients.jsonl`` files written before
    ``diagnostics`` defined it) is an all-zero quantized gradient, which stays zero: 0."""
    values = [layer["correction"] for layer in record["layers"].values()]
    return statistics.fmean(0.0 if math.isnan(v) else v for v in values)


def diagnostics(path: Path, steps_per_epoch: int) -> dict[str, Any]:
    """Mean cosines (quantized and used gradient vs fp32) and correction size, per epoch."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    per_epoch: list[dict[str, float]] = []
    for epoch in range(max(1, -(-records[-1]["step"] // steps_per_epoch))):
        rows = [r for r in records if (r["step"] - 1) // steps_per_epoch == epoch]
        if rows:
            per_epoch.append(
                {
                    "quantized_cosine": statistics.fmean(
                        r["mean_quantized"]["cosine"] for r in rows
                    ),
                    "used_cosine": statistics.fmean(r["mean_used"]["cosine"] for r in rows),
                    "correction": statistics.fmean(_correction(r) for r in rows),
                }
            )
    return {"reports": len(records), "per_epoch": per_epoch}


RESPONSE_AT = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Gradient elements, in units of the layer's rms, at which the learned correction is read."""


def learned_response(run_dir: Path) -> dict[str, Any]:
    """What the trained hypernetwork does to one element: ``H / g`` before the norm-preserving
    rescale, at ``+-RESPONSE_AT`` rms, and its output for a zero element; at weight 0, or for
    the signed-gain form (which reads the weight's sign) at weight +1 rms."""
    state = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = state["config"]
    form = cfg.get("hyper_form", "residual")
    net = create_hypernet(cfg["hyper"], hidden=cfg["hyper_hidden"], form=form)
    net.load_state_dict(state["optimizer"]["hypernet"])
    g = torch.tensor([-x for x in reversed(RESPONSE_AT)] + [0.0, *RESPONSE_AT])
    weight = torch.full_like(g, 1.0 if form == "signed-gain" else 0.0)
    feature = HYPERNET_FORMS[form].feature(g, weight)
    features = torch.stack([feature, weight])[: net.in_features]
    hidden_state = net.initial_state(g.numel(), features)
    with torch.no_grad():
        delta = net.core(features, *hidden_state)[0]
    corrected = g * (1 + delta) if HYPERNET_FORMS[form].gain else g + delta
    nonzero = g != 0
    return {
        "at_rms": g[nonzero].tolist(),
        "weight_rms": float(weight[0]),
        "gain": (corrected[nonzero] / g[nonzero]).tolist(),
        "output_for_zero": float(corrected[~nonzero]),
    }


def steps_per_epoch(record: dict[str, Any], out: Path) -> int:
    """The steps in one epoch of the run in ``out``: its metrics' first line's step (the run's
    steps if it ended within its first epoch)."""
    metrics = out / "metrics.jsonl"
    first = metrics.read_text().splitlines()[:1] if metrics.is_file() else []
    return json.loads(first[0])["step"] if first else record["steps"]


def with_diagnostics(name: str, record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The run's record plus its settings, gradient diagnostics and learned correction."""
    record = {
        **record,
        "gradients": diagnostics(out / "gradients.jsonl", steps_per_epoch(record, out)),
        "overrides": RUNS[name],
    }
    if record["method"] == "metagrad":
        record["learned_response"] = learned_response(out)
    return record


def main() -> None:
    runs = list(RUNS.items())
    training_benchmark("metagrad-ablations", __doc__.splitlines()[0], runs, BASE, with_diagnostics)


if __name__ == "__main__":
    main()
