"""Quantized training steps of the transformers, eager against ``torch.compile(model)``.

    python -m benchmarks.compile_step                # CPU  -> results/compile-step-cpu.json
    python -m benchmarks.compile_step --device cuda  # CUDA -> results/compile-step-cuda.json
    python -m benchmarks.compile_step --quick        # few repetitions (a smoke run)

Whole training steps (forward, backward, Adam) of ``vit_tiny`` and ``gpt_char`` as
``benchmarks/transformers.py`` runs them, under bf16 autocast, for each gradient quantizer
(``--grads``: INT4 stochastic, on the integer-codes path, and the ``rht-nvfp4`` preset, emulated
per product) and for plain bf16 as the reference: the eager step as ``metagrad train`` runs it
(compiled kernels) against the step of ``torch.compile(model, fullgraph=True)``, whose backward
is compiled too. The settings of one model are timed side by side in one process, one step of
each in turn, after ``--warmup`` steps; medians kept. The first steps, which compile, are timed
apart: ``compile_seconds`` is their time less that many median steps. ``graph_breaks`` is
dynamo's count on the model's forward (0: one graph for the forward, one for the backward).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from benchmarks.runner import command_line, step_batches, synthetic_data, training_step
from metagrad import kernels
from metagrad.data import load_cifar10
from metagrad.data.corpus import load_char_corpus
from metagrad.training.config import build_config
from metagrad.training.records import cpu_model
from metagrad.training.setup import build_model, resolve_amp, resolve_device

RESULTS = Path(__file__).resolve().parent / "results"
ADAM = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
MODELS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"model": "vit_tiny", "width": 1.0, "batch_size": 128, **ADAM},
    "gpt_char": {"model": "gpt_char", "width": 1.0, "batch_size": 64, **ADAM},
}
GRADS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "int4-stochastic": {"grad_bits": 4, "grad_rounding": "stochastic"},
    "rht-nvfp4": {"grad_quant": "rht-nvfp4"},
}
"""Gradient quantizers by name (``metagrad train`` keys); ``bf16``: none (the reference)."""
EAGER, COMPILED = "eager", "compiled model"


def settings_for(grads: list[str]) -> dict[str, dict[str, Any]]:
    """``"<grad> eager"`` (compiled kernels, as ``metagrad train``) and ``"<grad> compiled
    model"`` for each gradient quantizer, under bf16 autocast."""
    settings = {}
    for grad in grads:
        base = {**GRADS[grad], "amp": "bf16"}
        settings[f"{grad} {EAGER}"] = {**base, "compile": "kernels" if grad != "bf16" else "off"}
        settings[f"{grad} {COMPILED}"] = {**base, "compile": "model"}
    return settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_breaks(settings: dict[str, Any], data, x: torch.Tensor) -> int:
    """dynamo's graph breaks in the forward of ``settings``' model on ``x`` (under its amp)."""
    cfg = build_config({**settings, "out": "unused"})
    device = resolve_device(cfg.device)
    model = build_model(cfg, data, device)
    amp = resolve_amp(cfg.amp, device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=bool(amp)):
        count = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    return count


def time_interleaved(
    settings: dict[str, dict[str, Any]], data, base: dict[str, Any], steps: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Median step seconds of each setting after ``warmup`` steps, and the warm-up steps' times
    (compilation) apart."""
    batches = step_batches(data, base, warmup + steps)
    runs = {
        name: training_step({**base, **s}, data, fullgraph=True) for name, s in settings.items()
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    for x, y in batches:
        for name, step in runs.items():
            _sync(x.device)
            start = time.perf_counter()
            step(x, y)
            _sync(x.device)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts[warmup:])
        first = ts[:warmup]
        rows[name] = {
            "seconds": round(median, 5),
            "warmup_seconds": [round(t, 3) for t in first],
            "compile_seconds": round(max(0.0, sum(first) - warmup * median), 3),
        }
    return rows


def bench_model(
    name: str, model: dict[str, Any], data, grads: list[str], device, steps: int, warmup: int
) -> dict:
    """Rows of ``name`` (``model``: its settings): each gradient quantizer eager and compiled."""
    base = {**model, "device": device.type}
    settings = settings_for(grads)
    x = step_batches(data, base, 1)[0][0]
    breaks = {g: graph_breaks({**base, **settings[f"{g} {COMPILED}"]}, data, x) for g in grads}
    rows = time_interleaved(settings, data, base, steps, warmup)
    for grad in grads:
        eager, compiled = rows[f"{grad} {EAGER}"], rows[f"{grad} {COMPILED}"]
        compiled["graph_breaks"] = breaks[grad]
        compiled["x_eager"] = round(compiled["seconds"] / eager["seconds"], 3)
        for setting, row in ((EAGER, eager), (COMPILED, compiled)):
            if "bf16" in grads and grad != "bf16":
                row["x_bf16"] = round(row["seconds"] / rows[f"bf16 {setting}"]["seconds"], 3)
        print(
            f"{name} {grad:16s} eager {eager['seconds'] * 1e3:8.1f} ms  compiled "
            f"{compiled['seconds'] * 1e3:8.1f} ms ({compiled['x_eager']:.3f}x eager; compile "
            f"{compiled['compile_seconds']:.1f} s, {breaks[grad]} graph breaks)",
            flush=True,
        )
    return rows


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "device": str(device),
        "compile_available": kernels.available(device)[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="for vit_tiny")
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--grads", nargs="*", default=list(GRADS), choices=list(GRADS))
    parser.add_argument("--width", type=float, help="model width (default: each model's)")
    parser.add_argument("--steps", type=int, help="timed steps per setting (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (compile)")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/compile-step-<dev>")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or RESULTS / f"compile-step-{device.type}.json"
    steps = args.steps or (1 if args.quick else 7)
    warmup = max(1, args.warmup)
    models = {
        n: {**MODELS[n], **({"width": args.width} if args.width else {})} for n in args.models
    }
    data_path = Path(args.data)
    result: dict[str, Any] = {
        "benchmark": "compile_step",
        "command": command_line(),
        "machine": machine(device),
        "models": models,
        "grads": {g: GRADS[g] for g in args.grads},
        "steps": steps,
        "warmup": warmup,
    }
    for name in args.models:
        if name == "vit_tiny":
            batch = models[name]["batch_size"]
            data = load_cifar10(data_path) if data_path.exists() else synthetic_data(batch)
            result["vit_tiny_data"] = str(data_path) if data_path.exists() else "synthetic"
        else:
            data = load_char_corpus()
        result[name] = bench_model(name, models[name], data, args.grads, device, steps, warmup)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
