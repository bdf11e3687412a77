"""Training steps of the transformers: ViT-Tiny on CIFAR-10 batches, the character GPT on text.

    python -m benchmarks.transformers                # CPU  -> results/transformers-cpu.json
    python -m benchmarks.transformers --device cuda  # CUDA -> results/transformers-cuda.json
    python -m benchmarks.transformers --quick        # few repetitions (a smoke run)

Whole training steps (forward, backward, optimizer: Adam), as ``metagrad train`` runs them, of
``vit_tiny`` (width 1, batch 128, CIFAR-10 or random images when the zip is absent) and
``gpt_char`` (its defaults, batch 64 windows of the built-in corpus): float32, bf16 autocast,
INT4-stochastic gradients under bf16 (compiled kernels) and MetaGrad on top of them. The settings
of one model are timed side by side in one process, repetitions interleaved, medians kept, the
warm-up (compilation included) timed apart (``warmup_seconds``, ``compile_seconds``); MetaGrad's
step and its tensor memory (peak and growth over the step, each setting probed in a
fresh process) are also given against the quantized step it corrects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line, step_memory, synthetic_data, time_steps_apart
from metagrad import kernels
from metagrad.data import load_cifar10
from metagrad.data.corpus import load_char_corpus
from metagrad.training.records import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
ADAM = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
MODELS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"model": "vit_tiny", "width": 1.0, "batch_size": 128, **ADAM},
    "gpt_char": {"model": "gpt_char", "width": 1.0, "batch_size": 64, **ADAM},
}
INT4S = {"grad_bits": 4, "grad_rounding": "stochastic", "compile": "kernels"}
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "off", "compile": "off"},
    "bf16": {"amp": "bf16", "compile": "off"},
    "int4-stochastic bf16": {**INT4S, "amp": "bf16"},
    "metagrad int4-stochastic bf16": {**INT4S, "amp": "bf16", "method": "metagrad"},
}


QUANTIZED, METAGRAD = "int4-stochastic bf16", "metagrad int4-stochastic bf16"


def bench_model(
    name: str, data, device: torch.device, reps: int, warmup: int, memory: bool
) -> dict:
    base = {**MODELS[name], "device": device.type}
    timed = time_steps_apart(SETTINGS, data, base, steps=reps, warmup=warmup)
    seconds = {setting: t.seconds for setting, t in timed.items()}
    rows: dict[str, Any] = {}
    for setting, s in seconds.items():
        rows[setting] = {**timed[setting].to_dict(), "x_fp32": round(s / seconds["fp32"], 3)}
        print(f"{name} {setting:32s} {s:8.3f} s/step  {s / seconds['fp32']:.3f}x fp32", flush=True)
    rows["metagrad_vs_quantized"] = {"step": round(seconds[METAGRAD] / seconds[QUANTIZED], 3)}
    if memory:  # MetaGrad's memory against the quantized step it corrects, each in a fresh process
        probes = {s: step_memory({**base, **SETTINGS[s]}) for s in (QUANTIZED, METAGRAD)}
        for setting, probe in probes.items():
            rows[setting].update({k: round(v, 1) for k, v in probe.items()})
        rows["metagrad_vs_quantized"].update(
            {
                f"{k.removesuffix('_mb')}": round(probes[METAGRAD][k] / probes[QUANTIZED][k], 3)
                for k in ("peak_mb", "growth_mb")
            }
        )
    print(f"{name} MetaGrad vs the quantized step: {rows['metagrad_vs_quantized']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="for vit_tiny")
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="models to time")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory probes (fresh processes)"
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/results/transformers-<device>")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or RESULTS / f"transformers-{device.type}.json"
    reps, warmup = (2, 1) if args.quick else (5, 2)
    data_path = Path(args.data)
    result: dict[str, Any] = {
        "benchmark": "transformers",
        "command": command_line(),
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
            ),
            "compile_available": kernels.available(device)[0],
        },
        "models": {name: MODELS[name] for name in args.models},
        "settings": SETTINGS,
        "repetitions": reps,
    }
    if out.is_file():  # keep the models not rerun this time
        result = {**json.loads(out.read_text()), **result, "models": MODELS}
    for name in args.models:
        if name == "vit_tiny":
            batch = MODELS[name]["batch_size"]
            data = load_cifar10(data_path) if data_path.exists() else synthetic_data(batch)
            result["vit_tiny_data"] = str(data_path) if data_path.exists() else "synthetic"
        else:
            data = load_char_corpus()
        result[name] = bench_model(name, data, device, reps, warmup, not args.no_memory)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
