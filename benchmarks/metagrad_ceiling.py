"""The ceiling of a coordinate-wise correction on 16 + 16 batches, 3 seeds, two targets.

    python -m benchmarks.metagrad_ceiling --threads 2

:mod:`benchmarks.metagrad_signal` fits the ceiling's families (:mod:`benchmarks.ceiling`) on 4
batches and scores them on 4 others, at one seed, against the same batch's full-precision
gradient. This benchmark refits them on ``--fit`` batches and scores on ``--held-out`` others,
for each of ``--seeds``, against two targets:

- ``same``: the full-precision gradient of the batch the quantized gradient comes from (what
  the quantizer lost);
- ``next``: the full-precision gradient of the next probe batch at the same weights (what
  MetaGrad's one-step objective pulls the update towards, up to the step itself: the loss it
  differentiates is the next batch's, at the weights after the update).

Fixed in advance: vgg16 at width 0.25, batch 128, full-precision SGD (lr 0.05, momentum 0.9,
Nesterov, weight decay 5e-4) from the seed's initialisation to step ``--step``, then every
quantizer of :data:`QUANTIZERS` on the same probe batches (another shuffle than training's). The
comparison: per quantizer and target, the best family's held-out mean cosine minus the
identity's, paired by seed (:mod:`metagrad.stats`). Writes
``benchmarks/results/metagrad-ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.ceiling import coordinatewise_ceiling
from benchmarks.metagrad_signal import BASE, _loader, gradient_quantizer
from benchmarks.runner import command_line
from metagrad import stats
from metagrad.data import ImageDataset, load_cifar10
from metagrad.meta.diagnostics import paired_gradients
from metagrad.nn.layers import quantized_layers
from metagrad.quant.spec import QuantSpec
from metagrad.training.config import build_config
from metagrad.training.setup import build_model, build_optimizer

QUANTIZERS: dict[str, QuantSpec] = {
    "int4-stochastic-tensor": QuantSpec(4, "stochastic", "tensor"),
    "int4-nearest-sample": QuantSpec(4, "nearest", "sample"),
    "int4-nearest-channel": QuantSpec(4, "nearest", "channel"),
}
TARGETS = ("same", "next")


def trained_model(data: ImageDataset, seed: int, steps: int) -> torch.nn.Module:
    """vgg16 after ``steps`` of full-precision SGD from seed ``seed``."""
    cfg = build_config({**BASE, "seed": seed, "method": "plain", "out": "unused"})
    torch.manual_seed(seed)
    model = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    batches = _loader(data, seed)
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def ceilings(
    model: torch.nn.Module, data: ImageDataset, seed: int, fit: int, held_out: int
) -> dict[str, dict[str, Any]]:
    """Per quantizer and target, the ceiling (``Ceiling.to_dict``) at the model's weights."""
    stream = _loader(data, seed + 1)
    probes = [next(stream) for _ in range(fit + held_out + 1)]  # one more: the last's next
    weights = {name: layer.weight.detach().clone() for name, layer in quantized_layers(model)}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in QUANTIZERS.items():
        with gradient_quantizer(model, spec):
            pairs = [paired_gradients(model, x, y) for x, y in probes]
        out[name] = {}
        for target in TARGETS:
            shift = 1 if target == "next" else 0
            batches = {
                layer: [
                    (pairs[i][layer][1], pairs[i + shift][layer][0], w)
                    for i in range(fit + held_out)
                ]
                for layer, w in weights.items()
            }
            result = coordinatewise_ceiling(
                {k: v[:fit] for k, v in batches.items()},
                {k: v[fit:] for k, v in batches.items()},
            )
            out[name][target] = result.to_dict()
    return out


def gains(runs: dict[str, Any]) -> dict[str, Any]:
    """Per quantizer and target: the identity's held-out cosine, the best shared family's, and
    their difference paired by seed."""
    out: dict[str, Any] = {}
    for name in QUANTIZERS:
        for target in TARGETS:
            identity, best, best_family = {}, {}, {}
            for seed, result in runs.items():
                ceiling = result[name][target]
                identity[seed] = ceiling["identity"]["pooled"]["held_out"]
                families = ceiling["families"]
                top = max(families, key=lambda f: families[f]["shared"]["pooled"]["fit"])
                best[seed] = families[top]["shared"]["pooled"]["held_out"]
                best_family[seed] = top
            c = stats.paired(best, identity)
            out[f"{name}/{target}"] = {
                "identity_held_out": statistics.fmean(identity.values()),
                "best_fit_family_held_out": statistics.fmean(best.values()),
                "best_fit_family": best_family,
                "gain": c.to_dict(digits=4),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--output", default="benchmarks/results/metagrad-ceiling.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step", type=int, default=1000, help="SGD steps before measuring")
    parser.add_argument("--fit", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10(args.data)
    output = Path(args.output)
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        model = trained_model(data, seed, args.step)
        runs[str(seed)] = ceilings(model, data, seed, args.fit, args.held_out)
        record = {
            "benchmark": "metagrad-ceiling",
            "command": command_line(),
            "settings": {**BASE, "step": args.step, "fit": args.fit, "held_out": args.held_out},
            "quantizers": {n: str(s) for n, s in QUANTIZERS.items()},
            "gains": gains(runs),
            "runs": runs,
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=1) + "\n")
        print(f"seed {seed} done", flush=True)
    for key, g in gains(runs).items():
        print(f"{key}: identity {g['identity_held_out']:.4f}, best {g['gain']['words']}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
