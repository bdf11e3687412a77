"""Side-by-side step timing: several training settings, interleaved on the same batches.

Interleaving (one step of each setting in turn, repeated) makes the ratios robust to the machine's
background load, which shifts all settings alike. Used by the benchmark scripts in this folder.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from metagrad.config import build_config
from metagrad.data import BatchLoader, ImageDataset
from metagrad.train import build_model, build_optimizer, resolve_device


def time_steps(
    settings: dict[str, dict[str, Any]],
    data: ImageDataset,
    base: dict[str, Any],
    steps: int = 30,
    warmup: int = 3,
) -> dict[str, float]:
    """Median seconds per training step for each named setting (``base`` plus its overrides)."""
    loader = BatchLoader(
        data.train_images,
        data.train_labels,
        base["batch_size"],
        mean=data.mean,
        std=data.std,
        shuffle=True,
        augment=True,
        seed=0,
    )
    batches = list(zip(range(warmup + steps), loader.epoch(0), strict=False))
    runs = {}
    for name, overrides in settings.items():
        cfg = build_config({**base, **overrides, "out": "unused"})
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data, resolve_device(cfg.device))
        runs[name] = (model, build_optimizer(cfg, model))
    times: dict[str, list[float]] = {name: [] for name in settings}
    for i, (x, y) in batches:
        for name, (model, optimizer) in runs.items():

            def closure(model=model, optimizer=optimizer, x=x, y=y):
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            optimizer.step(closure)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
