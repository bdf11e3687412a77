"""Eval-mode inference of converted models against the unconverted ones (it should cost nothing).

    python -m benchmarks.inference                  # -> results/inference-cpu.json
    python -m benchmarks.inference --quick          # 2 repetitions (a smoke run)
    python -m benchmarks.inference --mode no_grad   # under torch.no_grad() instead

Each model (``gpt_char``, ``vit_tiny``, ``small_cnn`` from the registry; a tiny Hugging Face
BERT and GPT-2 from random configs, when transformers is installed; one bf16
``nn.Linear(512, 512)``) is timed in eval mode under ``torch.inference_mode()`` as built and
after ``metagrad.quantize`` (INT4 gradients, no forward quantization), side by side in one
process, repetitions interleaved, medians kept. ``ratio`` is converted / unconverted seconds;
``identical`` says whether both gave the same output bits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import metagrad as mg
from benchmarks.runner import command_line
from metagrad.training.records import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = mg.QuantConfig(grad=mg.QuantSpec(bits=4))
Case = tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]
"""A model and how to run it on its fixed input (returning one tensor)."""


def _registry(name: str, x: torch.Tensor, **sizes: int) -> Case:
    return mg.create_model(name, **sizes), lambda m: m(x)


def _hf_bert(batch: int) -> Case:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 100, (batch, 64))
    return BertModel(config), lambda m: m(ids).last_hidden_state


def _hf_gpt2(batch: int) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    ids = torch.randint(0, 100, (batch, 32))
    return GPT2LMHeadModel(config), lambda m: m(ids).logits


def _linear_bf16(batch: int) -> Case:
    model = nn.Sequential(nn.Linear(512, 512)).to(torch.bfloat16)
    x = torch.randn(batch, 512, dtype=torch.bfloat16)
    return model, lambda m: m(x)


CASES: dict[str, Callable[[], Case]] = {
    "gpt_char": lambda: _registry(
        "gpt_char", torch.randint(0, 96, (8, 128)), num_classes=96, in_channels=96
    ),
    "vit_tiny": lambda: _registry("vit_tiny", torch.randn(32, 3, 32, 32)),
    "small_cnn": lambda: _registry("small_cnn", torch.randn(64, 3, 32, 32)),
    "hf_bert_tiny": lambda: _hf_bert(16),
    "hf_gpt2_tiny": lambda: _hf_gpt2(16),
    "linear_512_bf16": lambda: _linear_bf16(256),
}
MODES: dict[str, Callable[[], AbstractContextManager]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
}


def bench_case(name: str, mode: str, reps: int, warmup: int) -> dict[str, Any]:
    """Median seconds of one forward of the unconverted and converted model, interleaved."""
    torch.manual_seed(0)
    try:
        original, run = CASES[name]()
    except ImportError as error:  # transformers absent
        print(f"{name}: skipped ({error})", flush=True)
        return {"skipped": str(error)}
    original.eval()
    models = {"unconverted": original, "converted": mg.quantize(original, CONFIG).eval()}
    times: dict[str, list[float]] = {key: [] for key in models}
    outputs: dict[str, torch.Tensor] = {}
    with MODES[mode]():
        for rep in range(warmup + reps):
            for key, model in models.items():
                start = time.perf_counter()
                outputs[key] = run(model)
                if rep >= warmup:
                    times[key].append(time.perf_counter() - start)
    seconds = {key: statistics.median(ts) for key, ts in times.items()}
    ratio = seconds["converted"] / seconds["unconverted"]
    identical = torch.equal(outputs["converted"], outputs["unconverted"])
    print(
        f"{name:16s} unconverted {seconds['unconverted'] * 1e3:9.3f} ms  "
        f"converted {seconds['converted'] * 1e3:9.3f} ms  ratio {ratio:.3f}  "
        f"identical {identical}",
        flush=True,
    )
    return {
        "unconverted_seconds": round(seconds["unconverted"], 6),
        "converted_seconds": round(seconds["converted"], 6),
        "ratio": round(ratio, 4),
        "identical": identical,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 warm-up")
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--mode", choices=list(MODES), default="inference_mode")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS / "inference-cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)
    result: dict[str, Any] = {
        "benchmark": "inference",
        "command": command_line(),
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
        },
        "mode": args.mode,
        "config": str(CONFIG),
        "reps": reps,
        "warmup": warmup,
        "models": {name: bench_case(name, args.mode, reps, warmup) for name in args.models},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
