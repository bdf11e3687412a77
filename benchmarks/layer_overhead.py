"""The fixed cost of a quantized layer: a stack of Linear layers, quantized and not, at a few
token counts.

    python -m benchmarks.layer_overhead   # -> results/layer-overhead-cpu-<cpu model>.json

A stack of ``--layers`` Linear layers (``--features`` in and out) takes one training step
(forward under bf16 autocast, backward) as plain ``nn.Linear`` layers (the bf16 reference) and
as the same layers quantized by :func:`metagrad.quantize` under each setting (``--settings``,
names of the step matrix's settings, with compiled kernels as ``metagrad train`` runs them).
Every setting's steps and the reference's are timed in turn, ``--rounds`` rounds after
``--warmup``, at each token count (``--tokens``). A row gives the medians per layer, the extra
time per layer (the median over rounds of the difference over the reference, divided by the
layers), the ratio to the reference (the geometric mean of the per-round ratios with its 95%
interval) and how many calls of compiled code one layer's step makes (``Torch-Compiled Region``
events under ``torch.profiler``, each one a call through ``torch.compile``'s dispatch).

At one token the products cost next to nothing, so the extra time is what a quantized layer
costs whatever its size: Python, small eager operations and the dispatch of its compiled
kernels. A model with many small layers, or a small batch, pays it on every layer.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import metagrad as mg
from benchmarks.speed import cpu_record, interleaved_times, write_record
from benchmarks.step_matrix import SETTINGS
from metagrad import kernels
from metagrad.stats import paired_ratio
from metagrad.training.config import build_config

DEFAULT_SETTINGS = ["plain", "int8 backend", "rht-mxfp4"]
COMPILED_CALL = "Torch-Compiled Region"


def stack(features: int, layers: int, seed: int = 0) -> nn.Sequential:
    """``layers`` Linear layers of ``features`` in and out (the same weights for a seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(features, features) for _ in range(layers)])


def quantized_stack(setting: str, features: int, layers: int) -> nn.Sequential:
    """:func:`stack` quantized as the step matrix's ``setting`` quantizes a model."""
    config = build_config({**SETTINGS[setting], "out": "unused"}).quant_config()
    return mg.quantize(stack(features, layers), config)


def step_fn(model: nn.Module, x: torch.Tensor):
    """One training step of ``model`` on ``x``: forward under bf16 autocast, backward."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()

    return step


def compiled_calls(step, layers: int) -> float:
    """Calls of compiled code per layer in one ``step`` (profiled)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith(COMPILED_CALL)]
    return len(events) / layers


def measure(
    settings: list[str], tokens: int, features: int, layers: int, rounds: int, warmup: int
) -> list[dict[str, Any]]:
    """One row per setting at ``tokens`` tokens, timed in turn with the bf16 reference."""
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(1))
    steps = {"bf16": step_fn(stack(features, layers), x)}
    for name in settings:
        steps[name] = step_fn(quantized_stack(name, features, layers), x)
    with kernels.compiled():
        times = interleaved_times(steps, rounds, warmup, torch.device("cpu"))
        calls = {name: compiled_calls(step, layers) for name, step in steps.items()}
    ref = times["bf16"]
    rows = []
    for name in settings:
        ts = times[name]
        extra = [(t - r) / layers for t, r in zip(ts, ref, strict=True)]
        rows.append(
            {
                "setting": name,
                "tokens": tokens,
                "bf16_us": round(statistics.median(ref) / layers * 1e6, 1),
                "us": round(statistics.median(ts) / layers * 1e6, 1),
                "extra_us": round(statistics.median(extra) * 1e6, 1),
                "x_bf16": paired_ratio(ts, ref),
                "compiled_calls": round(calls[name], 2),
                "bf16_compiled_calls": round(calls["bf16"], 2),
            }
        )
        print(
            f"{tokens:6d} tokens {name:14s} {rows[-1]['us']:9.1f} us/layer, "
            f"+{rows[-1]['extra_us']:.1f} us over bf16, {rows[-1]['compiled_calls']:g} "
            "compiled calls/layer",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 64, 8192])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens) or args.features < 1 or args.layers < 1:
        parser.error("--tokens, --features and --layers must be positive")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (an interval needs two rounds)")
    torch.set_num_threads(args.threads)
    out, record = cpu_record("layer_overhead", args.out)
    record.update(
        {
            "features": args.features,
            "layers": args.layers,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "step_settings": {name: SETTINGS[name] for name in args.settings},
            "rows": [
                row
                for tokens in args.tokens
                for row in measure(
                    args.settings, tokens, args.features, args.layers, args.rounds, args.warmup
                )
            ],
        }
    )
    return write_record(out, record)


if __name__ == "__main__":
    main()
