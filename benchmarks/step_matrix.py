"""Every gradient route's training step side by side, on VGG-16, ViT-Tiny and the character GPT.

    python -m benchmarks.step_matrix --device cuda   # -> benchmarks/results/step-matrix-cuda.json
    python -m benchmarks.step_matrix                 # -> results/step-matrix-cpu-<cpu model>.json
    python -m benchmarks.step_matrix --quick         # a smoke run: narrow models, few steps

1. steps: for each model, whole training steps (forward, backward, optimizer) as ``metagrad
   train`` runs them (freed CPU memory retained: ``--cpu-memory``), under bf16 autocast with
   compiled kernels: plain bf16 (no quantization),
   every gradient preset (``plain`` is INT4 stochastic; the others emulated by the ``simulate``
   backend), the ``int8`` backend (INT8 gradients), the ``fp8`` backend (the ``fp8-e5m2``
   preset as FP8 GEMMs) and MetaGrad on the ``plain`` preset. The settings of one model are
   timed side by side in one process, one step of each in turn on the same batches, after
   ``--warmup`` steps (compilation included; more for a setting whose last warm-up step still
   compiled), which are timed apart; medians kept. Each ratio (``paired``: against bf16,
   ``plain`` and the step a setting replaces) is the geometric mean of the per-round ratios,
   with its 95% interval. A setting whose first step fails is left out with its error. Each
   model also records which of its layers the ``fp8`` backend routes elsewhere, and why.
   The papers' whole recipes (``--recipe``) are timed when named: ``--settings bf16 plain
   rht-mxfp4 "rht-mxfp4 recipe"`` (each judged against its preset).
2. layers: the backward products of transformer-MLP Linear layers: bf16, the ``fp8`` backend
   (FP8 GEMMs where the device has them) and the same recipe emulated by ``simulate``.

The JSON is written after each model, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.runner import command_line, synthetic_data, time_steps_apart
from benchmarks.speed import BASE, MLP_SHAPES, interleaved, machine, machine_slug
from benchmarks.tables_speed import ratio_text, step_ratios
from benchmarks.transformers import MODELS as TRANSFORMERS
from metagrad.backward import fallback_report, get_backend
from metagrad.data import load_cifar10
from metagrad.data.corpus import load_char_corpus
from metagrad.machine import cpu_model
from metagrad.models import model_task
from metagrad.quant import QuantConfig, QuantSpec, list_presets, list_recipes
from metagrad.training.config import ATTENTION_KERNELS, build_config
from metagrad.training.setup import build_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS: dict[str, dict[str, Any]] = {"vgg16": BASE, **TRANSFORMERS}
ROUTE = {"amp": "bf16", "compile": "kernels"}
SETTINGS: dict[str, dict[str, Any]] = {
    "bf16": {"amp": "bf16", "compile": "off"},
    **{preset: {**ROUTE, "grad_quant": preset} for preset in list_presets()},
    "int8 backend": {**ROUTE, "grad_bits": 8, "backend": "int8"},
    "fp8 backend": {**ROUTE, "grad_quant": "fp8-e5m2", "backend": "fp8"},
    "metagrad plain": {**ROUTE, "grad_quant": "plain", "method": "metagrad"},
}
DEFAULT_SETTINGS = list(SETTINGS)
RECIPES = {
    f"{name} recipe": {**ROUTE, "grad_quant": name, "recipe": True} for name in list_recipes()
}
"""The papers' whole recipes (``--recipe``): timed when named in ``--settings``."""
SETTINGS.update(RECIPES)
COMPARE_WITH = {
    "fp8 backend": "fp8-e5m2",
    "metagrad plain": "plain",
    **{name: name.removesuffix(" recipe") for name in RECIPES},
}
"""Besides bf16, the step each setting is judged against (the same numbers emulated; the
quantized step MetaGrad corrects; the preset a recipe extends)."""
E4M3 = QuantSpec(format="fp8_e4m3")


def fp8_routes(base: dict[str, Any], data) -> dict[str, Any]:
    """How many layers of the model run their products as FP8 GEMMs, and the others' reasons."""
    cfg = build_config({**base, **SETTINGS["fp8 backend"], "out": "unused"})
    model = build_model(cfg, data, torch.device(base["device"]))
    report = fallback_report(model)
    layers = [
        n for n, m in model.named_modules() if isinstance(getattr(m, "config", None), QuantConfig)
    ]
    return {"layers": len(layers), "fp8": len(layers) - len(report), "elsewhere": report}


def time_settings(
    base: dict[str, Any], data, names: list[str], steps: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Median step seconds of each setting (interleaved), its warm-up (compilation included,
    extended while a setting still compiles), or its error."""
    errors: dict[str, str] = {}
    timed = time_steps_apart(
        {name: SETTINGS[name] for name in names}, data, base, steps, warmup, errors=errors
    )
    rows = {name: {"error": error} for name, error in errors.items()}
    rows.update({name: t.to_dict() for name, t in timed.items()})
    return {name: rows[name] for name in names}


ATTENTION_STEPS = 6
"""Timed steps of each attention kernel when ``--attention-kernel fastest`` chooses one."""


def has_attention(base: dict[str, Any], data) -> bool:
    """Whether ``base``'s model has ``nn.MultiheadAttention`` layers (which call
    ``scaled_dot_product_attention``)."""
    model = build_model(build_config({**base, "out": "unused"}), data, torch.device("cpu"))
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def choose_attention(base: dict[str, Any], data, kernel: str, warmup: int) -> dict[str, Any]:
    """The attention kernel every setting of ``base``'s model runs with: ``kernel``, or for
    ``fastest`` the one whose bf16 step was faster, the two timed side by side."""
    if kernel != "fastest":
        return {"attention_kernel": kernel}
    settings = {k: {**SETTINGS["bf16"], "attention_kernel": k} for k in ATTENTION_KERNELS}
    timed = time_steps_apart(settings, data, base, ATTENTION_STEPS, warmup)
    seconds = {k: t.seconds for k, t in timed.items()}
    return {
        "attention_kernel": min(seconds, key=seconds.__getitem__),
        "attention_kernel_seconds": {k: round(v, 5) for k, v in seconds.items()},
    }


def bench_model(name: str, base: dict[str, Any], data, args) -> dict[str, Any]:
    attention: dict[str, Any] = {}
    if has_attention(base, data):
        attention = choose_attention(base, data, args.attention_kernel, args.warmup)
        base = {**base, "attention_kernel": attention["attention_kernel"]}
        print(f"{name}: attention kernel {attention}", flush=True)
    rows = time_settings(base, data, args.settings, args.steps, args.warmup)
    ref = rows.get("bf16", {}).get("seconds")
    for setting, row in rows.items():
        if "seconds" not in row:
            print(f"{name} {setting:20s} failed: {row['error']}", flush=True)
            continue
        if ref:
            row["x_bf16"] = round(row["seconds"] / ref, 3)
        other = rows.get(COMPARE_WITH.get(setting, ""), {}).get("seconds")
        if other:
            row["compared_with"] = COMPARE_WITH[setting]
            row["ratio"] = round(row["seconds"] / other, 3)
        row["paired"] = step_ratios(rows, setting)
        print(
            f"{name} {setting:20s} {row['seconds'] * 1e3:9.2f} ms  "
            + "  ".join(f"{ratio_text(r, 3)} {k}" for k, r in row["paired"].items()),
            flush=True,
        )
    return {"settings": base, **attention, "steps": rows, "fp8_routes": fp8_routes(base, data)}


def linear_rows(device: torch.device, tokens: list[int], reps: int) -> list[dict[str, Any]]:
    """Backward products of MLP Linear layers: bf16, the fp8 backend, its emulation."""
    fp8, emulated = (
        QuantConfig(grad=QuantSpec(format="fp8_e5m2"), backend="fp8"),
        QuantConfig(
            grad=QuantSpec(format="fp8_e5m2"),
            weight_for_input_grad=E4M3,
            input_for_weight_grad=E4M3,
        ),
    )
    mask, dtypes = (True, True, False), (torch.bfloat16, torch.float32, None)
    rows = []
    for t in tokens:
        for c_in, c_out in MLP_SHAPES:
            x = torch.randn(t, c_in, device=device, dtype=torch.bfloat16)
            w = (torch.randn(c_out, c_in, device=device) * 0.02).bfloat16()
            e = (torch.randn(t, c_out, device=device) * 1e-3).bfloat16()
            fns = {
                "bf16": lambda e=e, w=w, x=x: (e @ w, e.t() @ x),
                "fp8 backend": lambda e=e, w=w, x=x: get_backend("fp8").linear_backward(
                    e, x, w, fp8, mask, dtypes, ()
                ),
                "fp8 emulated": lambda e=e, w=w, x=x: get_backend("simulate").linear_backward(
                    e, x, w, emulated, mask, dtypes, ()
                ),
            }
            secs = interleaved(fns, reps, 1, device)
            row = {
                "name": f"mlp.{t}tok.{c_in}x{c_out}",
                "ms": {k: round(v * 1e3, 3) for k, v in secs.items()},
                "bf16/fp8": round(secs["bf16"] / secs["fp8 backend"], 3),
                "emulated/fp8": round(secs["fp8 emulated"] / secs["fp8 backend"], 3),
            }
            print(f"{row['name']:24s} {row['ms']}  bf16/fp8 {row['bf16/fp8']:.2f}x", flush=True)
            rows.append(row)
    return rows


def default_out(device: torch.device, width: float | None) -> Path:
    """``results/step-matrix-cpu-<cpu model>[-w<width>].json`` on CPU, ``-<device>`` else."""
    where = f"cpu-{machine_slug(cpu_model())}" if device.type == "cpu" else device.type
    suffix = f"-w{width:g}" if width and width != 1 else ""
    return RESULTS / f"step-matrix-{where}{suffix}.json"


def _kept_models(out: Path, timed: list[str]) -> dict[str, Any]:
    """The entries of the models in ``out`` that this run does not time (each with the command
    that timed it)."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    kept = {}
    for name in MODELS:
        if name in earlier and name not in timed:
            kept[name] = {"command": earlier.get("command"), **earlier[name]}
            if f"{name}_data" in earlier:
                kept[f"{name}_data"] = earlier[f"{name}_data"]
    return kept


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10")
    parser.add_argument("--quick", action="store_true", help="width 0.25, batch 16, few steps")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--parts", nargs="*", default=["steps", "layers"])
    parser.add_argument("--steps", type=int, help="timed steps per setting (default 15; quick 2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (compile)")
    parser.add_argument("--tokens", type=int, nargs="*", help="MLP tokens (CPU 1024; CUDA 16k)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--width", type=float, help="every model at this width (default: 1)")
    parser.add_argument(
        "--attention-kernel",
        default="fastest",
        choices=["fastest", *ATTENTION_KERNELS],
        help="scaled_dot_product_attention's kernel in every setting of a model with attention "
        "(fastest: the one whose bf16 step is faster here, timed first)",
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the models of an existing --out file that this run does not time",
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/results/step-matrix-<dev>")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.steps = args.steps or (2 if args.quick else 15)
    args.warmup = min(args.warmup, 1) if args.quick else args.warmup
    out = args.out or default_out(device, args.width)
    data_path = Path(args.data)
    kept = _kept_models(out, args.models) if args.keep_models else {}
    result: dict[str, Any] = {
        **kept,
        "benchmark": "step_matrix",
        "command": command_line(),
        "machine": machine(device),
        "step_settings": {name: SETTINGS[name] for name in args.settings},
        "repetitions": args.steps,
        "warmup": args.warmup,
    }

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "layers" in args.parts:
        tokens = args.tokens or ([16384] if device.type == "cuda" else [1024])
        result["layers"] = linear_rows(device, [256] if args.quick else tokens, args.steps)
        write()
    for name in args.models if "steps" in args.parts else []:
        base = {**MODELS[name], "device": device.type}
        if args.quick:
            base.update(width=0.25, batch_size=16)
        if args.width:
            base.update(width=args.width)
        if model_task(base["model"]) == "image":
            count = base["batch_size"] * (args.warmup + args.steps)
            data = load_cifar10(data_path) if data_path.exists() else synthetic_data(count)
            result[f"{name}_data"] = str(data_path) if data_path.exists() else "synthetic"
        else:
            data = load_char_corpus()
        result[name] = bench_model(name, base, data, args)
        write()
    write()
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
