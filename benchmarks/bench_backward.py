"""Backward-pass speed of float32 PyTorch, the ``simulate`` backend and the ``int8`` backend.

Per layer (both products, with quantization and layout changes included), side by side with
interleaved repetitions and the median kept:

* the 13 convolutions of full-width VGG-16 at batch 128 on 32×32 inputs (channels_last);
* the two Linear layers of a transformer MLP (4096 tokens, 1024→4096 and 4096→1024).

Variants: ``float32`` (``aten.convolution_backward`` / matmuls on the unquantized error),
``simulate`` (INT8 error, float products: the simulate backend) and ``int8`` (integer products).

Then whole training steps (forward, backward, SGD step) of ``create_model("vgg16", width=1.0)``
at batch 128, channels_last: float32, simulate (INT8 grads), int8 backward, and int8 forward +
backward (8-bit weights and activations).

Writes ``benchmarks/results/backward-speed.json``; the last line printed is
``backward speed-up float32/int8: median X.XX over N layers`` (the VGG-16 conv layers).

    python benchmarks/bench_backward.py            # full run
    python benchmarks/bench_backward.py --quick    # < 1 minute on 2 CPU cores
    python benchmarks/bench_backward.py --device cuda

The integer path runs more, smaller kernels than PyTorch's float convolution, so it suffers more
when the CPU cores are shared with other busy processes: time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import int8
from metagrad.functional import QuantConfig
from metagrad.layers import quantize_
from metagrad.models import create_model
from metagrad.quant import QuantSpec, fake_quantize

RESULTS = Path(__file__).resolve().parent / "results" / "backward-speed.json"
BATCH = 128
VGG16_CHANNELS = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_SPATIAL = (32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2)
MLP_TOKENS = 4096
MLP_SHAPES = ((1024, 4096), (4096, 1024))
GRAD_SPEC = QuantSpec(8)  # INT8 error, nearest, one scale per tensor
LAYER_VARIANTS = ("float32", "simulate", "int8")
STEP_VARIANTS = {
    "float32": None,
    "simulate": QuantConfig(grad=GRAD_SPEC),
    "int8 backward": QuantConfig(grad=GRAD_SPEC, backend="int8"),
    "int8 forward+backward": QuantConfig(
        grad=GRAD_SPEC,
        weight=QuantSpec(8, granularity="channel"),
        activation=QuantSpec(8),
        backend="int8",
    ),
}

Fn = Callable[[], object]


@dataclass
class Layer:
    """One benchmarked layer: its description and one backward closure per variant."""

    name: str
    kind: str
    shape: dict[str, int]
    fns: dict[str, Fn]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Fn], reps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds of each function, timed in turn ``reps`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            elapsed = _time(fn, device)
            if rep >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def conv_layer(index: int, device: torch.device) -> Layer:
    """VGG-16 conv ``index`` (0-based): 3×3, stride 1, padding 1, no bias, channels_last."""
    c_in, c_out, hw = VGG16_CHANNELS[index], VGG16_CHANNELS[index + 1], VGG16_SPATIAL[index]
    cl = torch.channels_last
    x = torch.randn(BATCH, c_in, hw, hw, device=device).relu().contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, 3, 3, device=device) * 0.05).contiguous(memory_format=cl)
    e = (torch.randn(BATCH, c_out, hw, hw, device=device) * 1e-3).contiguous(memory_format=cl)
    conv = ((1, 1), (1, 1), (1, 1))
    mask = (True, True, False)
    config = QuantConfig(grad=GRAD_SPEC, backend="int8")

    def float32(err: Tensor = e) -> object:
        return torch.ops.aten.convolution_backward(err, x, w, None, *conv, False, (0, 0), 1, mask)

    fns = {
        "float32": float32,
        "simulate": lambda: float32(fake_quantize(e, GRAD_SPEC, 1)),
        "int8": lambda: int8.conv2d_backward(e, x, w, *conv, 1, config, mask),
    }
    shape = {"batch": BATCH, "c_in": c_in, "c_out": c_out, "hw": hw, "kernel": 3}
    return Layer(f"vgg16.conv{index + 1}", "conv", shape, fns)


def linear_layer(c_in: int, c_out: int, device: torch.device) -> Layer:
    """A transformer-MLP linear layer over ``MLP_TOKENS`` tokens, with bias."""
    x = torch.randn(MLP_TOKENS, c_in, device=device)
    w = torch.randn(c_out, c_in, device=device) * 0.02
    e = torch.randn(MLP_TOKENS, c_out, device=device) * 1e-3
    config = QuantConfig(grad=GRAD_SPEC, backend="int8")

    def float32(err: Tensor = e) -> object:
        return err @ w, err.t() @ x, err.sum(0)

    fns = {
        "float32": float32,
        "simulate": lambda: float32(fake_quantize(e, GRAD_SPEC, -1)),
        "int8": lambda: int8.linear_backward(e, x, w, config, (True, True, True)),
    }
    shape = {"tokens": MLP_TOKENS, "in": c_in, "out": c_out}
    return Layer(f"mlp.linear{c_in}x{c_out}", "linear", shape, fns)


def bench_layers(device: torch.device, reps: int, warmup: int) -> list[dict]:
    layers = [conv_layer(i, device) for i in range(len(VGG16_SPATIAL))]
    layers += [linear_layer(c_in, c_out, device) for c_in, c_out in MLP_SHAPES]
    rows = []
    for layer in layers:
        secs = interleaved(layer.fns, reps, warmup, device)
        ms = {k: round(v * 1e3, 3) for k, v in secs.items()}
        speedup = {
            "float32/int8": secs["float32"] / secs["int8"],
            "simulate/int8": secs["simulate"] / secs["int8"],
            "float32/simulate": secs["float32"] / secs["simulate"],
        }
        rows.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "shape": layer.shape,
                "ms": ms,
                "speedup": {k: round(v, 3) for k, v in speedup.items()},
            }
        )
        print(
            f"{layer.name:24s} "
            + "  ".join(f"{k} {v:9.2f} ms" for k, v in ms.items())
            + f"  float32/int8 {speedup['float32/int8']:.2f}x",
            flush=True,
        )
        del layer
    return rows


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def bench_steps(device: torch.device, variants: list[str], reps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    base = create_model("vgg16", width=1.0).to(device, memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=device)
    fns = {}
    for name in variants:
        model = copy.deepcopy(base)
        config = STEP_VARIANTS[name]
        if config is not None:
            quantize_(model, config)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fns[name] = _train_step(model, opt, x, y)
    secs = interleaved(fns, reps, warmup, device)
    ref = secs.get("float32")
    rows = []
    for name, s in secs.items():
        row = {"variant": name, "seconds": round(s, 4)}
        if ref is not None:
            row["speedup_vs_float32"] = round(ref / s, 3)
        rows.append(row)
        extra = f"  {ref / s:.2f}x vs float32" if ref is not None else ""
        print(f"step {name:24s} {s:8.3f} s{extra}", flush=True)
    return rows


def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (< 1 min on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per layer")
    parser.add_argument("--step-reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layer_reps = args.reps or (2 if args.quick else 7)
    step_reps = args.step_reps or (1 if args.quick else 5)

    layers = bench_layers(device, layer_reps, warmup=1)
    steps = bench_steps(device, list(STEP_VARIANTS), step_reps, warmup=1)
    conv = [r["speedup"]["float32/int8"] for r in layers if r["kind"] == "conv"]
    median = statistics.median(conv)
    result = {
        "machine": machine_info(device),
        "settings": {
            "quick": args.quick,
            "layer_reps": layer_reps,
            "step_reps": step_reps,
            "batch": BATCH,
            "grad": str(GRAD_SPEC),
            "layer_products": "dL/dx and dL/dW (and dL/db for the linear layers)",
        },
        "layers": layers,
        "steps": steps,
        "summary": {
            "median_conv_speedup_float32_over_int8": round(median, 3),
            "conv_layers": len(conv),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(f"backward speed-up float32/int8: median {median:.2f} over {len(conv)} layers")
    return result


if __name__ == "__main__":
    main()
