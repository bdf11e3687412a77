"""Does the hypernetwork get a learning signal? How consistent its meta-gradient is across steps.

    python benchmarks/metagrad_signal.py --data ../shared/data/cifar10-jpeg.zip

vgg16 at width 0.25, batch 128, SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4), seed 0.
For each gradient setting, MetaGrad runs with a frozen identity hypernetwork (hypernetwork lr 0,
so training is plain quantized training) for ``--warm`` steps, then ``--steps`` more during which
the gradient of each step's loss with respect to the hypernetwork's parameters (the meta-gradient
MetaGrad trains it with) is recorded. Per parameter element, over those steps,
``t = mean / (std / sqrt(n))``: a consistent direction to learn gives ``|t|`` well above 2; a
meta-gradient that is noise gives ``|t|`` distributed as ``|N(0, 1)|`` (median 0.67, 4.6% above
2). Adam then moves the hypernetwork by a random walk whatever its learning rate, and a larger
learning rate only makes the walk longer. Writes ``benchmarks/results/metagrad-signal.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.config import build_config
from metagrad.data import BatchLoader, ImageDataset, load_cifar10
from metagrad.diagnostics import paired_gradients
from metagrad.hyper import rms
from metagrad.layers import quantized_layers
from metagrad.train import build_model, build_optimizer

BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "batch_size": 128,
    "lr": 0.05,
    "method": "metagrad",
    "hyper": "grad+weight",
    "hyper_hidden": 8,
    "hyper_lr": 0.0,
    "seed": 0,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"grad_bits": 32},
    "int4-stochastic-tensor": {"grad_bits": 4, "grad_rounding": "stochastic"},
    "int4-stochastic-sample": {
        "grad_bits": 4,
        "grad_rounding": "stochastic",
        "grad_granularity": "sample",
    },
    "int4-nearest-sample": {
        "grad_bits": 4,
        "grad_rounding": "nearest",
        "grad_granularity": "sample",
    },
}


def meta_gradients(
    settings: dict[str, Any], data: ImageDataset, warm: int, steps: int
) -> tuple[dict[str, Tensor], nn.Module, Iterator[tuple[Tensor, Tensor]]]:
    """The hypernetwork's parameter gradients at each of ``steps`` steps after ``warm`` steps.

    Also returns the trained model and the iterator of the batches that follow.
    """
    cfg = build_config({**BASE, **settings, "out": "unused"})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    loader = BatchLoader(
        data.train_images,
        data.train_labels,
        cfg.batch_size,
        mean=data.mean,
        std=data.std,
        shuffle=True,
        augment=True,
        seed=cfg.seed,
    )
    hypernet = optimizer.hypernet
    recorded: dict[str, list[Tensor]] = {name: [] for name, _ in hypernet.named_parameters()}
    batches = (batch for epoch in range(10**6) for batch in loader.epoch(epoch))
    for i, (x, y) in zip(range(warm + steps), batches, strict=False):

        def closure(x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {i}")
        if i >= warm:
            for name, p in hypernet.named_parameters():
                recorded[name].append(p.grad.detach().flatten().clone())
    return {name: torch.stack(g) for name, g in recorded.items()}, model, batches


def _normalised(model: nn.Module, x: Tensor, y: Tensor) -> list[tuple[Tensor, ...]]:
    """Per quantized layer: ``g / rms(g)``, ``W / rms(W)``, ``G / rms(g)`` (g quantized, G fp32)."""
    weights = dict(quantized_layers(model))
    out = []
    for name, (full, quantized) in paired_gradients(model, x, y).items():
        scale = rms(quantized).clamp_min(1e-30)
        w = weights[name].weight.detach()
        out.append((quantized / scale, w / rms(w).clamp_min(1e-30), full / scale))
    return [tuple(t.flatten().double() for t in layer) for layer in out]


def coordinatewise_ceiling(
    model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], fit: int = 4, held_out: int = 4
) -> dict[str, float]:
    """How far could the best coordinate-wise correction ``f(g, W)`` raise the cosine to fp32?

    ``f(g, W) = g + r(g, W)`` with the residual ``r`` fitted without constraint, as the mean of
    ``G - g`` (normalised) in each cell of a 64 x 8 grid of (normalised quantized gradient,
    normalised weight) quantiles, pooled over all layers (one function shared by every layer, like
    the hypernetwork) on ``fit`` batches; the cosines are measured on ``held_out`` other batches,
    averaged over layers and batches.
    """
    layers = [layer for _ in range(fit) for layer in _normalised(model, *next(batches))]
    g, w, target = (torch.cat([layer[i] for layer in layers]) for i in range(3))
    levels = torch.linspace(0, 1, 65, dtype=torch.float64)[1:-1]
    sample = torch.randperm(g.numel())[: 1 << 22]  # torch.quantile's input size limit
    g_edges = torch.quantile(g[sample], levels).unique()
    w_edges = torch.quantile(w[sample], levels[7::8]).unique()

    def cells(g: Tensor, w: Tensor) -> Tensor:
        return torch.bucketize(g, g_edges) * (len(w_edges) + 1) + torch.bucketize(w, w_edges)

    n_cells = (len(g_edges) + 1) * (len(w_edges) + 1)
    index = cells(g, w)
    sums = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, index, target - g)
    counts = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, index, torch.ones_like(g))
    table = sums / counts.clamp_min(1)  # an empty cell gives 0

    before, after = [], []
    for _ in range(held_out):
        for g, w, target in _normalised(model, *next(batches)):
            before.append(float(torch.nn.functional.cosine_similarity(g, target, dim=0)))
            corrected = g + table[cells(g, w)]
            after.append(float(torch.nn.functional.cosine_similarity(corrected, target, dim=0)))
    return {
        "quantized_cosine": statistics.fmean(before),
        "best_coordinatewise_cosine": statistics.fmean(after),
    }


def consistency(grads: Tensor) -> dict[str, float] | None:
    """``|t|`` of each element's mean over the steps (rows): median and share above 2.

    Elements whose gradient is always zero are left out (``None`` if all are): at the identity
    the hidden layers get none, as the zero-initialised head passes none back.
    """
    grads = grads[:, grads.ne(0).any(0)].double()
    if grads.numel() == 0:
        return None
    n = grads.shape[0]
    t = (grads.mean(0) / (grads.std(0) / n**0.5)).abs()
    return {
        "elements": t.numel(),
        "median_abs_t": float(t.median()),
        "share_abs_t_above_2": float((t > 2).float().mean()),
        "max_abs_t": float(t.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--output", default="benchmarks/results/metagrad-signal.json")
    parser.add_argument("--warm", type=int, default=200, help="steps before recording")
    parser.add_argument("--steps", type=int, default=400, help="steps recorded")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10(args.data)
    results = {}
    for name, settings in SETTINGS.items():
        grads, model, batches = meta_gradients(settings, data, args.warm, args.steps)
        every = torch.cat(list(grads.values()), dim=1)
        results[name] = {
            "all": consistency(every),
            "per_parameter": {p: consistency(g) for p, g in grads.items()},
        }
        summary = results[name]["all"]
        line = (
            f"{name}: meta-gradient median |t| {summary['median_abs_t']:.2f}, |t| > 2 for "
            f"{100 * summary['share_abs_t_above_2']:.1f}% of {summary['elements']} parameters"
        )
        if settings["grad_bits"] < 32:
            ceiling = coordinatewise_ceiling(model, batches)
            results[name]["coordinatewise_ceiling"] = ceiling
            line += (
                f"; cosine to fp32 {ceiling['quantized_cosine']:.3f}, best coordinate-wise "
                f"correction {ceiling['best_coordinatewise_cosine']:.3f}"
            )
        print(line, flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "metagrad-signal",
        "command": " ".join(["python", *sys.argv]),
        "settings": {**BASE, "warm_steps": args.warm, "recorded_steps": args.steps},
        "noise_reference": {"median_abs_t": 0.674, "share_abs_t_above_2": 0.0455},
        "torch": torch.__version__,
        "results": results,
    }
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
