"""Training speed against the baselines users run: float32, TF32 (CUDA) and bf16 autocast.

    python -m benchmarks.speed                  # CPU  -> results/speed-cpu-<cpu model>.json
    python -m benchmarks.speed --device cuda    # CUDA -> benchmarks/results/speed-cuda.json
    python -m benchmarks.speed --quick          # few repetitions (a smoke run)

Every comparison is made side by side in one process, repetitions interleaved, medians kept;
the process retains the CPU memory it frees, as ``metagrad train`` does (``--cpu-memory``).
Warm-up steps (compilation of the model or of the kernels, the ``int8`` backend's route
measurements) are not among the timed steps; a setting whose warm-up still compiles takes more
warm-up steps, and each row reports its warm-up apart (``warmup_seconds``, ``compile_seconds``).
The ``int8`` backend's rows take its fixed routes, except the rows named "measured routes",
which measure them afresh (a new route cache, unless ``--route-cache`` names one):

1. steps: whole training steps (forward, backward, optimizer) of full-width VGG-16 at batch 128
   on CIFAR-10 batches, channels_last, as ``metagrad train`` runs them: plain float32 (TF32 off),
   TF32 (CUDA), bf16 autocast; quantized gradients (simulate backend, compiled or eager
   kernels), the ``int8`` backend (fixed and measured routes), and MetaGrad. Each row has its
   ratio to float32, to bf16 and to the setting it should be compared with (the plain step of
   the same precision, or for MetaGrad the plain quantized step), from the medians; each timed
   step is kept (``step_seconds``), from which the tables take each ratio with its interval.
2. quantizer: the quantizer alone on the errors of one INT4 training step (same shapes, dtypes
   and layouts), eager and compiled, and its share of the quantized bf16 step.
3. memory: tensor memory of MetaGrad's training steps against the plain quantized step's, each
   in a fresh process: the peak (weights, optimizer state, gradients, activations) and its
   growth over what was alive before the first step.
4. blocks: one operand of a product (4096 x 4096, float32 and bf16) quantized in each block
   format of the presets (MXFP4, NVFP4, and both after their Hadamard transform), along its
   rows and along its columns (the weight-gradient product's layout), eager and compiled
   kernels, beside a memory copy of the same tensor (the goal: within 3x of the copy).
5. layers: the backward of each VGG-16 convolution and of transformer-MLP Linear layers (4096
   tokens at width 1024, and ``gpt_char``'s; INT8 nearest error, both products; kernels compiled
   as training's ``--compile auto`` runs them): float32, bf16,
   the ``int8`` backend's integer products, the same 8-bit codes multiplied in bf16 (the route
   the ``int8`` backend takes on CUDA), and the backend with measured routes under bf16 (each
   product on the route its measurement chose, recorded per layer); beside them, a cast of the
   bf16 error to int8, the least any 8-bit route spends before its products: a layer where that
   cast exceeds 5% of the bf16 backward (so that bf16 products of the codes cannot meet the
   per-layer goal) and the integer route is measured beyond the goal is named out of reach.
   As many rounds as the steps; each layer's measured routes against bf16 is the geometric
   mean of the per-round ratios with its 95% interval (the per-layer goal's verdict).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line, step_memory, synthetic_data, time_steps_apart
from benchmarks.tables_speed import FLOOR, ROUTED, out_of_reach
from metagrad import kernels
from metagrad.backward import int8, simulate
from metagrad.backward.int8.routes import CACHE_DIR_ENV, ROUTES, ProductKey, cache_path
from metagrad.data import load_cifar10
from metagrad.machine import cpu_model, fingerprint, retain_freed_cpu_memory
from metagrad.nn.layers import quantized_weights
from metagrad.quant.presets import MXFP4, NVFP4
from metagrad.quant.quantize import quantize_along, quantize_codes
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.stats import paired_ratio
from metagrad.training.config import build_config
from metagrad.training.setup import build_model

RESULTS = Path(__file__).resolve().parent / "results"
BASE: dict[str, Any] = {"model": "vgg16", "width": 1.0, "batch_size": 128, "lr": 0.05}
INT4S = {"grad_bits": 4, "grad_rounding": "stochastic"}
BF16, FP32, COMPILED = {"amp": "bf16"}, {"amp": "off"}, {"compile": "kernels"}
EAGER = {"compile": "off"}
INT8, MEASURED = {"grad_bits": 8, "backend": "int8"}, {"routes": "measured"}
STEPS: dict[str, dict[str, Any]] = {
    "fp32": {**FP32, **EAGER},
    "tf32": {**FP32, **EAGER, "tf32": True},
    "bf16": {**BF16, **EAGER},
    "bf16, compiled model": {**BF16, "compile": "model"},
    "int4-stochastic bf16": {**INT4S, **BF16, **COMPILED},
    "int4-stochastic bf16, compiled model": {**INT4S, **BF16, "compile": "model"},
    "int4-stochastic bf16, eager kernels": {**INT4S, **BF16, **EAGER},
    "int4-stochastic-sample bf16": {**INT4S, "grad_granularity": "sample", **BF16, **COMPILED},
    "int8-nearest bf16": {"grad_bits": 8, **BF16, **COMPILED},
    "int8 backend bf16": {**INT8, **BF16, **COMPILED},
    "int8 backend bf16, measured routes": {**INT8, **MEASURED, **BF16, **COMPILED},
    "metagrad int4-stochastic bf16": {**INT4S, "method": "metagrad", **BF16, **COMPILED},
    "int4-stochastic fp32": {**INT4S, **FP32, **COMPILED},
    "int8 backend fp32": {**INT8, **FP32, **COMPILED},
    "int8 backend fp32, measured routes": {**INT8, **MEASURED, **FP32, **COMPILED},
    "metagrad int4-stochastic fp32": {**INT4S, "method": "metagrad", **FP32, **COMPILED},
}
COMPARE_WITH = {
    "int4-stochastic bf16": "bf16",
    "bf16, compiled model": "bf16",
    "int4-stochastic bf16, compiled model": "bf16, compiled model",
    "int4-stochastic bf16, eager kernels": "bf16",
    "int4-stochastic-sample bf16": "bf16",
    "int8-nearest bf16": "bf16",
    "int8 backend bf16": "bf16",
    "int8 backend bf16, measured routes": "bf16",
    "metagrad int4-stochastic bf16": "int4-stochastic bf16",
    "int4-stochastic fp32": "fp32",
    "int8 backend fp32": "fp32",
    "int8 backend fp32, measured routes": "fp32",
    "metagrad int4-stochastic fp32": "int4-stochastic fp32",
}
"""The setting each step is judged against (the goals: quantized <= 1.15x plain bf16, MetaGrad
<= 1.3x the plain quantized step, the ``int8`` backend <= 0.8x plain bf16)."""
MEMORY = ("int4-stochastic bf16", "metagrad int4-stochastic bf16")
VGG16_CHANNELS = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_SPATIAL = (32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2)
MLP_SHAPES = ((1024, 4096), (4096, 1024))
GPT_CHAR_MLP = ((128, 512), (512, 128))
GPT_CHAR_TOKENS = 64 * 128
"""``gpt_char``'s MLP (width 1) over a batch of 64 windows of 128 characters."""
LAYER_SPEC = QuantSpec(8)

Fn = Callable[[], object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Fn], reps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds of each function, timed in turn ``reps`` times after ``warmup`` rounds."""
    times = interleaved_times(fns, reps, warmup, device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(
    fns: dict[str, Fn], reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each function in each of ``reps`` rounds (one call of each in turn), after
    ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------- 1. steps


def bench_steps(data, device: torch.device, reps: int, warmup: int) -> dict[str, dict]:
    names = [n for n in STEPS if device.type == "cuda" or not STEPS[n].get("tf32")]
    settings = {name: STEPS[name] for name in names}
    base = {**BASE, "device": device.type}
    timed = time_steps_apart(settings, data, base, steps=reps, warmup=warmup)
    seconds = {name: t.seconds for name, t in timed.items()}
    rows = {}
    for name, s in seconds.items():
        row = {
            **timed[name].to_dict(),
            "x_fp32": round(s / seconds["fp32"], 3),
            "x_bf16": round(s / seconds["bf16"], 3),
        }
        if name in COMPARE_WITH:
            ref = COMPARE_WITH[name]
            row["compared_with"] = ref
            row["ratio"] = round(s / seconds[ref], 3)
        rows[name] = row
        extra = f"  {row['ratio']:.3f}x {row['compared_with']}" if "ratio" in row else ""
        print(
            f"step {name:38s} {s * 1e3:9.1f} ms  {row['x_fp32']:.3f}x fp32  "
            f"{row['x_bf16']:.3f}x bf16{extra}  (warm-up {sum(timed[name].warmup_seconds):.1f} s, "
            f"compile {row['compile_seconds']:.1f} s)",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------- 2. quantizer


def error_shapes(data, device: torch.device) -> list[tuple]:
    """Shape, strides, dtype and channel dim of every error one INT4 bf16 training step
    quantizes (each draws its dither's key first: ``simulate.spec_dither_key``)."""
    from benchmarks.runner import training_step

    seen: list[tuple] = []
    original = simulate.spec_dither_key

    def record(e, spec, generator=None):
        seen.append((tuple(e.shape), e.stride(), e.dtype, 1 if e.dim() == 4 else -1))
        return original(e, spec, generator)

    step = training_step({**BASE, **STEPS["int4-stochastic bf16"], "device": device.type}, data)
    x = torch.randn(BASE["batch_size"], 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BASE["batch_size"],), device=device)
    simulate.spec_dither_key = record
    try:
        step(x.contiguous(memory_format=torch.channels_last), y)
    finally:
        simulate.spec_dither_key = original
    if not seen:
        raise RuntimeError("the INT4 step quantized no error through simulate.spec_dither_key")
    return seen


def bench_quantizer(data, device, reps: int, warmup: int, step_seconds: float) -> dict:
    shapes = error_shapes(data, device)
    errors = [
        (torch.empty_strided(s, st, dtype=dt, device=device).normal_(), cd)
        for s, st, dt, cd in shapes
    ]
    spec = QuantSpec(**{"bits": 4, "rounding": "stochastic"})

    def run(compiled: bool) -> Fn:
        def quantize_all() -> None:
            kernels.set_compile(compiled, device)
            for e, cd in errors:
                quantize_codes(e, spec, cd)

        return quantize_all

    secs = interleaved({"eager": run(False), "compiled": run(True)}, reps, warmup, device)
    result = {
        "errors": len(errors),
        "elements": sum(e.numel() for e, _ in errors),
        "ms": {k: round(v * 1e3, 3) for k, v in secs.items()},
        "share_of_int4_bf16_step": {k: round(v / step_seconds, 4) for k, v in secs.items()},
    }
    print(f"quantizer: {result}", flush=True)
    return result


# ---------------------------------------------------------------------------- 4. blocks

BLOCK_OPERAND = (4096, 4096)
BLOCK_FORMATS: dict[str, QuantSpec] = {
    "mxfp4": MXFP4,
    "nvfp4": NVFP4,
    "rht32 mxfp4": dataclasses.replace(MXFP4, transform="rht", transform_block=32),
    "rht16 nvfp4": dataclasses.replace(NVFP4, transform="rht", transform_block=16),
}
BLOCK_AXES = {"rows": (1,), "columns": (0,)}
"""Blocks along the contiguous axis, or across it (the weight-gradient product's operands)."""


def _quantize_fn(x: torch.Tensor, spec: QuantSpec, inner, mode: str, device) -> Fn:
    def run() -> None:
        kernels.set_compile(mode == "compiled", device)
        quantize_along(x, spec, inner, dtype=x.dtype)

    return run


def bench_blocks(device: torch.device, reps: int, warmup: int) -> dict[str, Any]:
    """Quantizing one operand in each block format, eager and compiled, against a copy."""
    result: dict[str, Any] = {"shape": list(BLOCK_OPERAND), "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(BLOCK_OPERAND, device=device).to(dtype)
        into = torch.empty_like(x)

        # a copy into a new tensor allocates its output, as the quantizer does; a copy into an
        # existing one is memory traffic alone (a new tensor past the C library's reuse
        # threshold is fresh pages from the kernel, whose first touch costs more than the copy)
        fns: dict[str, Fn] = {"copy": x.clone, "copy into": functools.partial(into.copy_, x)}
        for name, spec in BLOCK_FORMATS.items():
            for axis, inner in BLOCK_AXES.items():
                for mode in ("eager", "compiled"):
                    fns[f"{name}|{axis}|{mode}"] = _quantize_fn(x, spec, inner, mode, device)
        secs = interleaved(fns, reps, warmup, device)
        copy, copy_into = secs.pop("copy"), secs.pop("copy into")
        rows = [
            {
                "format": key.split("|")[0],
                "axis": key.split("|")[1],
                "kernels": key.split("|")[2],
                "ms": round(v * 1e3, 3),
                "vs_copy": round(v / copy, 2),
                "vs_copy_into": round(v / copy_into, 2),
            }
            for key, v in secs.items()
        ]
        result["dtypes"][str(dtype).removeprefix("torch.")] = {
            "copy_ms": round(copy * 1e3, 3),
            "copy_into_ms": round(copy_into * 1e3, 3),
            "rows": rows,
        }
        print(
            f"blocks {dtype}: copy {copy * 1e3:.1f} ms, into a tensor {copy_into * 1e3:.1f} ms",
            flush=True,
        )
        for r in rows:
            print(f"  {r['format']:12s} {r['axis']:8s} {r['kernels']:8s} {r['vs_copy']:6.2f}x")
    return result


# ---------------------------------------------------------------------------- 3. memory


def meta_weights_mb(settings: dict[str, Any]) -> float:
    """Size (MB) of the weights MetaGrad's hypernetwork updates, for ``settings``' model."""
    cfg = build_config({**settings, "out": "unused"})
    model = build_model(cfg, synthetic_data(cfg.batch_size), torch.device("cpu"))
    return sum(w.numel() * w.element_size() for _, w in quantized_weights(model)) / 2**20


def bench_memory(device: torch.device) -> dict[str, Any]:
    """Tensor memory of the plain INT4 step and MetaGrad's; MetaGrad's extra growth also in units
    of its meta weights' size (it holds three such tensors more by design: the pending gradient,
    ``W_t`` and the new momentum buffer)."""
    rows = {name: step_memory({**BASE, **STEPS[name], "device": device.type}) for name in MEMORY}
    plain, meta = (rows[n] for n in MEMORY)
    weights = meta_weights_mb({**BASE, **STEPS[MEMORY[1]]})
    result = {
        "tensor_memory_mb": rows,
        "ratio_peak": round(meta["peak_mb"] / plain["peak_mb"], 3),
        "ratio_growth": round(meta["growth_mb"] / plain["growth_mb"], 3),
        "meta_weights_mb": round(weights, 2),
        "extra_growth_in_weights": round((meta["growth_mb"] - plain["growth_mb"]) / weights, 2),
    }
    print(f"memory: {result}", flush=True)
    return result


# ---------------------------------------------------------------------------- 4. layers


LayerCase = tuple[str, dict, dict[str, Fn], ProductKey]
"""A layer's name, shape, backward variants and the route-cache key of its two products."""


def conv_fns(index: int, device: torch.device) -> LayerCase:
    """Backward variants of VGG-16 conv ``index``: 3x3, stride 1, padding 1, channels_last."""
    c_in, c_out, hw = VGG16_CHANNELS[index], VGG16_CHANNELS[index + 1], VGG16_SPATIAL[index]
    cl = torch.channels_last
    batch = BASE["batch_size"]
    x = torch.randn(batch, c_in, hw, hw, device=device).relu().contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, 3, 3, device=device) * 0.05).contiguous(memory_format=cl)
    e = (torch.randn(batch, c_out, hw, hw, device=device) * 1e-3).contiguous(memory_format=cl)
    xb, wb, eb = x.bfloat16(), w.bfloat16(), e.bfloat16()
    conv = ((1, 1), (1, 1), (1, 1))
    mask = (True, True, False)
    config = QuantConfig(grad=LAYER_SPEC, backend="int8")

    def native(err, inp, weight) -> Fn:
        backward = torch.ops.aten.convolution_backward
        return lambda: backward(err, inp, weight, None, *conv, False, (0, 0), 1, mask)

    fns = {
        "fp32": native(e, x, w),
        "bf16": native(eb, xb, wb),
        "int8": lambda: int8.conv2d_backward(e, x, w, *conv, 1, config, mask),
        "int8 codes in bf16": lambda: int8.conv2d_backward_simulated(
            eb, xb, w, *conv, 1, config, mask
        ),
        ROUTED: lambda: int8.backend.conv2d_backward_for(eb, xb, wb, *conv, 1, config, mask),
        FLOOR: lambda: eb.to(torch.int8),
    }
    shape = {"batch": batch, "c_in": c_in, "c_out": c_out, "hw": hw, "kernel": 3}
    key = ProductKey.of("conv2d", ("dx", "dw"), xb, wb, conv, "tensor")
    return f"vgg16.conv{index + 1}", shape, fns, key


def linear_fns(c_in: int, c_out: int, tokens: int, device, name: str = "mlp") -> LayerCase:
    """Backward variants of a transformer-MLP Linear layer over ``tokens`` tokens."""
    x = torch.randn(tokens, c_in, device=device)
    w = torch.randn(c_out, c_in, device=device) * 0.02
    e = torch.randn(tokens, c_out, device=device) * 1e-3
    xb, wb, eb = x.bfloat16(), w.bfloat16(), e.bfloat16()
    config = QuantConfig(grad=LAYER_SPEC, backend="int8")
    mask = (True, True, False)
    fns = {
        "fp32": lambda: (e @ w, e.t() @ x),
        "bf16": lambda: (eb @ wb, eb.t() @ xb),
        "int8": lambda: int8.linear_backward(e, x, w, config, mask),
        "int8 codes in bf16": lambda: int8.linear_backward_simulated(eb, xb, w, config, mask),
        ROUTED: lambda: int8.backend.linear_backward_for(eb, xb, wb, config, mask),
        FLOOR: lambda: eb.to(torch.int8),
    }
    shape = {"tokens": tokens, "in": c_in, "out": c_out}
    key = ProductKey.of("linear", ("dx", "dw"), xb, wb, None, "tensor")
    return f"{name}.{tokens}tok.{c_in}x{c_out}", shape, fns, key


def layer_row(name, shape, fns, key, reps: int, warmup: int, device: torch.device) -> dict:
    """One layer's timings (median ms) and ratios, the measured routes against bf16 round by
    round (the per-layer goal's ratio, with its interval), and the routes measured for it."""
    times = interleaved_times(fns, reps, max(warmup, 1), device)
    secs = {k: statistics.median(ts) for k, ts in times.items()}
    routes = ROUTES.used[str(key)].to_dict()
    row = {
        "name": name,
        "shape": shape,
        "ms": {k: round(v * 1e3, 3) for k, v in secs.items()},
        "bf16/int8": round(secs["bf16"] / secs["int8"], 3),
        "bf16/int8 codes in bf16": round(secs["bf16"] / secs["int8 codes in bf16"], 3),
        "bf16/int8 measured routes": round(secs["bf16"] / secs[ROUTED], 3),
        "fp32/int8": round(secs["fp32"] / secs["int8"], 3),
        "floor/bf16": round(secs[FLOOR] / secs["bf16"], 3),
        "measured routes/bf16": paired_ratio(times[ROUTED], times["bf16"]),
        "routes": routes,
    }
    print(
        f"{name:28s} "
        + "  ".join(f"{k} {v:8.2f}" for k, v in row["ms"].items())
        + f" ms  bf16/int8 {row['bf16/int8']:.2f}x  routes "
        + " ".join(f"{p} {r}" for p, r in routes["routes"].items()),
        flush=True,
    )
    return row


def bench_layers(device: torch.device, reps: int, warmup: int, tokens: list[int]) -> dict:
    """Each layer's backward variants; the measured routes are chosen in the warm-up round."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    layers = [conv_fns(i, device) for i in range(len(VGG16_SPATIAL))]
    layers += [linear_fns(a, b, t, device) for t in tokens for a, b in MLP_SHAPES]
    layers += [linear_fns(a, b, GPT_CHAR_TOKENS, device, "gpt_char") for a, b in GPT_CHAR_MLP]
    int8.set_routes("measured")
    # the kernels as training runs them (``--compile auto``: compiled where torch.compile works)
    try:
        with kernels.compiled(kernels.available(device)[0], device) as compiled:
            rows = [layer_row(*layer, reps, warmup, device) for layer in layers]
    finally:
        int8.set_routes(None)
    conv = [r for r in rows if r["name"].startswith("vgg16")]
    keys = ("bf16/int8", "bf16/int8 codes in bf16", "bf16/int8 measured routes", "fp32/int8")
    summary = {key: round(statistics.median(r[key] for r in conv), 3) for key in keys}
    slowest = min(r["bf16/int8 measured routes"] for r in rows)
    print(f"conv medians: {summary}; slowest layer with measured routes: {slowest}x", flush=True)
    return {
        "kernels": "compiled" if compiled else "eager",
        "rows": rows,
        "conv_medians": summary,
        "out_of_reach": out_of_reach(rows),
    }


# ---------------------------------------------------------------------------- main


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "device": str(device),
        "compile_available": kernels.available(device)[0],
        "cpu_memory": build_config({"out": "unused"}).cpu_memory,  # what the steps set
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(model: str) -> str:
    """A file-name form of a CPU model: ``AMD EPYC`` -> ``amd-epyc``."""
    text = re.sub(r"\((r|tm)\)", " ", model.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_record(benchmark: str, out: Path | None) -> tuple[Path, dict[str, Any]]:
    """Where a CPU benchmark writes (``out``, else ``results/<benchmark>-cpu-<cpu model>.json``)
    and the head of its record: its name, the command and the machine."""
    path = out or RESULTS / f"{benchmark.replace('_', '-')}-cpu-{machine_slug(cpu_model())}.json"
    head = {
        "benchmark": benchmark,
        "command": command_line(),
        "machine": machine(torch.device("cpu")),
    }
    return path, head


def write_record(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark's record to ``out`` as JSON (its folder made if needed), say so, and
    return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


def default_out(device: torch.device) -> Path:
    """``results/speed-cpu-<cpu model>.json`` on CPU, ``results/speed-<device>.json`` else."""
    if device.type == "cpu":
        return RESULTS / f"speed-cpu-{machine_slug(cpu_model())}.json"
    return RESULTS / f"speed-{device.type}.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--parts", nargs="*", default=["steps", "quantizer", "memory", "blocks", "layers"]
    )
    parser.add_argument("--tokens", type=int, nargs="*", help="MLP tokens (CPU 4096; CUDA 4k-16k)")
    parser.add_argument(
        "--route-cache",
        type=Path,
        help="folder of the int8 route cache to use (default: a new one, so routes are measured)",
    )
    parser.add_argument(
        "--out", type=Path, help="default benchmarks/results/speed-cpu-<cpu model>.json"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if build_config({"out": "unused"}).cpu_memory == "retain":  # as metagrad train: every part
        retain_freed_cpu_memory()
    device = torch.device(args.device)
    out = args.out or default_out(device)
    reps = (2, 2, 1) if args.quick else (15, 6, 3)
    data_path = Path(args.data)
    data = load_cifar10(data_path) if data_path.exists() else synthetic_data(BASE["batch_size"])
    with tempfile.TemporaryDirectory() as fresh:
        os.environ[CACHE_DIR_ENV] = str(args.route_cache or fresh)
        ROUTES.clear()
        result = run_parts(args, device, out, data, data_path, reps)
        if ROUTES.used:  # the int8 backend's measured routes, of the steps and the layers
            result["routes"] = {
                "fingerprint": fingerprint(device),
                "cache": str(cache_path()) if args.route_cache else None,
                "products": {name: c.to_dict() for name, c in ROUTES.used.items()},
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def run_parts(args, device, out: Path, data, data_path: Path, reps: tuple[int, int, int]) -> dict:
    """The parts ``--parts`` asks for, over the results already in ``out``."""
    step_reps, layer_reps, warmup = reps
    tokens = args.tokens or ([4096, 16384] if device.type == "cuda" else [4096])
    result: dict[str, Any] = {
        "benchmark": "speed",
        "command": command_line(),
        "machine": machine(device),
        "settings": {**BASE, "data": str(data_path) if data_path.exists() else "synthetic"},
        "step_settings": STEPS,
    }
    if out.is_file():  # keep the parts not rerun this time
        result = {**json.loads(out.read_text()), **result}
    # the command that wrote each part (parts of one file may come from several invocations)
    result["part_commands"] = {
        **result.get("part_commands", {}),
        **{part: result["command"] for part in args.parts},
    }
    if "steps" in args.parts:
        result["steps"] = bench_steps(data, device, step_reps, warmup)
    if "quantizer" in args.parts:
        step = result["steps"]["int4-stochastic bf16"]["seconds"]
        result["quantizer"] = bench_quantizer(data, device, layer_reps, warmup, step)
    if "memory" in args.parts:
        result["memory"] = bench_memory(device)
    if "blocks" in args.parts:
        result["blocks"] = bench_blocks(device, layer_reps, warmup)
    if "layers" in args.parts:  # as many rounds as the steps: each layer's ratio has an interval
        result["layers"] = bench_layers(device, step_reps, 1, tokens)
    return result


if __name__ == "__main__":
    main()
