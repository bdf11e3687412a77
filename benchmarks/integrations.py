"""Other people's models: coverage, graph breaks, training and inference cost, MetaGrad's cost.

    python -m benchmarks.integrations            # -> benchmarks/results/integrations-cpu.json
    python -m benchmarks.integrations --quick    # few repetitions (a smoke run)

Models nobody here wrote, built from small random Hugging Face configs (torchvision and timm
cannot be installed next to the CPU build of torch: their wheels need CUDA's libraries): ResNet,
ConvNeXt, ViT, BERT and GPT-2. Each is converted by ``metagrad.quantize_`` with the default
``QuantConfig()`` (INT8 stochastic gradients), as a user would in a few lines. Per model:

- ``matmuls``: matmul modules converted / present (``nn.Linear``, ``nn.Conv2d``, Hugging Face's
  ``Conv1D``), and what the conversion report says it left out;
- ``graph_breaks``: ``torch._dynamo.explain`` on the converted model's forward, and
  ``graph_breaks_unconverted`` on the unconverted one's (breaks the model's own code causes);
- ``step``: a bf16-autocast AdamW training step of the converted model against the unconverted
  one; ``inference``: an eval-mode ``torch.no_grad()`` forward, the same two;
- ``metagrad``: a ``MetaGrad(base="adam")`` step against the converted model's AdamW step.

The settings of one model are timed side by side in one process, repetitions interleaved after
a warm-up (compilation and first-call costs excluded), medians kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import metagrad as mg
from benchmarks.runner import command_line
from metagrad.training.records import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
MATMUL_TYPES = ("Linear", "Conv2d", "Conv1D")
"""Class names of the matmul modules counted (``Conv1D``: Hugging Face's transposed linear)."""

Batch = dict[str, torch.Tensor]


def _models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], Batch]]]:
    """``name -> (build, batch(n))`` for each model, from small random configs."""
    import transformers as hf

    def images(n: int) -> Batch:
        return {"pixel_values": torch.randn(n, 3, 32, 32), "labels": torch.arange(n) % 10}

    def tokens(n: int, labels: str) -> Batch:
        ids = torch.randint(0, 100, (n, 32))
        return {"input_ids": ids, "labels": ids if labels == "lm" else torch.arange(n) % 2}

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {
        "resnet": (
            lambda: hf.ResNetForImageClassification(
                hf.ResNetConfig(
                    embedding_size=16,
                    hidden_sizes=[16, 32, 64, 128],
                    depths=[2, 2, 2, 2],
                    layer_type="basic",
                    num_labels=10,
                )
            ),
            images,
        ),
        "convnext": (
            lambda: hf.ConvNextForImageClassification(
                hf.ConvNextConfig(
                    hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], num_labels=10
                )
            ),
            images,
        ),
        "vit": (
            lambda: hf.ViTForImageClassification(
                hf.ViTConfig(
                    image_size=32, patch_size=4, intermediate_size=128, num_labels=10, **small
                )
            ),
            images,
        ),
        "bert": (
            lambda: hf.BertForSequenceClassification(
                hf.BertConfig(
                    vocab_size=100, intermediate_size=128, max_position_embeddings=64, **small
                )
            ),
            lambda n: tokens(n, "class"),
        ),
        "gpt2": (
            lambda: hf.GPT2LMHeadModel(
                hf.GPT2Config(
                    n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64,
                    bos_token_id=0, eos_token_id=0,
                )
            ),
            lambda n: tokens(n, "lm"),
        ),
    }  # fmt: skip


def _matmuls(model: nn.Module) -> int:
    return sum(type(m).__name__ in MATMUL_TYPES for m in model.modules())


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch).loss.float()


def _adam_step(model: nn.Module) -> Callable[[Batch], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        opt.step()

    return step


def _metagrad_step(model: nn.Module) -> Callable[[Batch], None]:
    opt = mg.MetaGrad(model, lr=1e-3, base="adam", weight_decay=0.0)

    def step(batch: Batch) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)

    return step


def _inference(model: nn.Module) -> Callable[[Batch], None]:
    inputs = {}

    def run(batch: Batch) -> None:
        inputs.update({k: v for k, v in batch.items() if k != "labels"})
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)

    return run


def _time(runs: dict[str, Callable[[Batch], None]], batch: Batch, reps: int, warmup: int):
    """Median seconds of each run, repetitions interleaved after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _graph_breaks(model: nn.Module, batch: Batch) -> dict[str, Any]:
    import torch._dynamo as dynamo

    dynamo.reset()
    explained = dynamo.explain(model)(**batch)
    reasons = sorted({b.reason.splitlines()[0][:160] for b in explained.break_reasons})
    return {"count": explained.graph_break_count, "reasons": reasons}


def bench(name: str, build, batch_of, batch_size: int, reps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = build()
    converted = copy.deepcopy(plain)
    report = mg.quantize_(converted, mg.QuantConfig())
    metagrad_model = copy.deepcopy(converted)
    batch = batch_of(batch_size)
    row: dict[str, Any] = {
        "matmuls": {
            "converted": sum(type(m).__name__.startswith("Quant") for m in converted.modules()),
            "total": _matmuls(plain),
            "left_out": {k: str(v) for k, v in getattr(report, "unconverted", {}).items()},
        },
        "graph_breaks": _graph_breaks(converted, batch),
        "graph_breaks_unconverted": _graph_breaks(plain, batch),
    }
    steps = _time(
        {
            "unconverted": _adam_step(plain),
            "converted": _adam_step(converted),
            "metagrad": _metagrad_step(metagrad_model),
        },
        batch,
        reps,
        warmup,
    )
    inference = _time(
        {"unconverted": _inference(plain), "converted": _inference(converted)},
        batch,
        reps,
        warmup,
    )
    row["step"] = {
        "seconds": {k: round(v, 5) for k, v in steps.items()},
        "converted_vs_unconverted": round(steps["converted"] / steps["unconverted"], 3),
    }
    row["inference"] = {
        "seconds": {k: round(v, 5) for k, v in inference.items()},
        "converted_vs_unconverted": round(inference["converted"] / inference["unconverted"], 3),
    }
    row["metagrad_vs_quantized_step"] = round(steps["metagrad"] / steps["converted"], 3)
    print(
        f"{name:9s} matmuls {row['matmuls']['converted']}/{row['matmuls']['total']}  "
        f"breaks {row['graph_breaks']['count']}  step {row['step']['converted_vs_unconverted']}x"
        f"  inference {row['inference']['converted_vs_unconverted']}x  "
        f"MetaGrad {row['metagrad_vs_quantized_step']}x",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="*", help="default: all")
    parser.add_argument("--out", type=Path, default=RESULTS / "integrations-cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (2, 1) if args.quick else (15, 3)
    models = _models()
    result: dict[str, Any] = {
        "benchmark": "integrations",
        "command": command_line(),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": cpu_model()},
        "config": str(mg.QuantConfig()),
        "batch_size": args.batch_size,
        "repetitions": reps,
        "models": {},
    }  # fmt: skip
    for name in args.models or list(models):
        build, batch_of = models[name]
        result["models"][name] = bench(name, build, batch_of, args.batch_size, reps, warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
