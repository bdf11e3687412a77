"""Markdown tables of the committed benchmark results (the README's Results section).

python benchmarks/tables.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- tables:start -->", "<!-- tables:end -->"


METAGRAD_DEFAULTS = {"hyper": "grad+weight", "hyper_hidden": 8, "hyper_lr": 1e-4}
"""Settings the ablation table leaves out when a run has them."""


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _quantizer(r: dict) -> str:
    if r["bits"] == 32:
        return "fp32"
    return f"INT{r['bits']} {r['rounding']}, per {r['granularity']}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _final(r: dict) -> str:
    """The final test accuracy, or where the run diverged."""
    if r.get("diverged_at_step") is not None:
        return f"diverged (step {r['diverged_at_step']})"
    return _number(r["final_test_acc"])


def training_table(data: dict) -> str:
    rows = [
        "| gradients | method | seed | test acc (final) | best | mean step s | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        rows.append(
            f"| {_quantizer(r)} | {r['method']} | {r['seed']} | {_final(r)} "
            f"| {_number(r['best_test_acc'])} | {r['mean_step_seconds']:.3f} "
            f"| {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(rows)


def paired_table(data: dict) -> str:
    """Plain against MetaGrad per quantizer and seed, with full precision of the same seed."""
    runs = data["runs"]
    fp32 = {r["seed"]: r["final_test_acc"] for r in runs if r["bits"] == 32}
    pairs: dict[tuple[str, int], dict[str, float]] = {}
    for r in runs:
        if r["bits"] < 32:
            pairs.setdefault((_quantizer(r), r["seed"]), {})[r["method"]] = r
    rows = [
        "| gradients | seed | fp32 | plain | MetaGrad | MetaGrad - plain |",
        "|---|---|---|---|---|---|",
    ]
    for (quantizer, seed), pair in pairs.items():
        if {"plain", "metagrad"} <= pair.keys():
            plain, meta = pair["plain"]["final_test_acc"], pair["metagrad"]["final_test_acc"]
            fp = f"{fp32[seed]:.2f}" if seed in fp32 else "-"
            diff = f"{meta - plain:+.2f}" if None not in (plain, meta) else "-"
            rows.append(
                f"| {quantizer} | {seed} | {fp} | {_final(pair['plain'])} "
                f"| {_final(pair['metagrad'])} | {diff} |"
            )
    return "\n".join(rows)


def ablation_table(data: dict) -> str:
    """Each ablation's accuracy and, over its last epoch, gradient cosines and correction size."""
    rows = [
        "| run | changed | test acc | cosine to fp32: quantized | used | correction |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        changed = ", ".join(
            f"{k}={v}" for k, v in r["overrides"].items() if METAGRAD_DEFAULTS.get(k) != v
        )
        last = r["gradients"]["per_epoch"][-1]
        rows.append(
            f"| {r['run']} | {changed} | {_final(r)} "
            f"| {last['quantized_cosine']:.3f} | {last['used_cosine']:.3f} "
            f"| {last['correction']:.3f} |"
        )
    return "\n".join(rows)


def signal_table(data: dict) -> str:
    """Meta-gradient consistency per setting, and the best coordinate-wise correction's cosine."""
    rows = [
        "| gradients | meta-gradient median abs t | abs t > 2 | cosine to fp32: quantized "
        "| best coordinate-wise correction |",
        "|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        ceiling = r.get("coordinatewise_ceiling")
        cosines = (
            f"{ceiling['quantized_cosine']:.3f} | {ceiling['best_coordinatewise_cosine']:.3f}"
            if ceiling
            else "1 | -"
        )
        t = r["all"]
        rows.append(
            f"| {name} | {t['median_abs_t']:.2f} | {100 * t['share_abs_t_above_2']:.0f}% of "
            f"{t['elements']} | {cosines} |"
        )
    return "\n".join(rows)


def step_ratio_table(data: dict) -> str:
    rows = ["| gradients | median step s | x fp32 |", "|---|---|---|"]
    for name, t in data["side_by_side_step_time"].items():
        rows.append(f"| {name} | {t['median_step_seconds']:.3f} | {t['ratio_to_fp32']:.3f} |")
    return "\n".join(rows)


def overhead_table(data: dict) -> str:
    rows = [
        "| setting | median step s | x plain | step memory MB | x plain |",
        "|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        rows.append(
            f"| {name} | {r['median_step_seconds']:.3f} | {r['time_ratio_to_plain']:.2f} "
            f"| {r['step_memory_mb']:.0f} | {r['memory_ratio_to_plain']:.2f} |"
        )
    return "\n".join(rows)


def speed_table(data: dict) -> str:
    """Whole training steps against float32 and bf16, the quantizer's share, memory, layers."""
    machine = data["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    rows = [
        f"Full-width VGG-16, batch 128, CIFAR-10 batches, torch {machine['torch']}, {where}.",
        "",
        "| training step | ms | x float32 | x bf16 | x the step it replaces |",
        "|---|---|---|---|---|",
    ]
    for name, r in data["steps"].items():
        ratio = f"{r['ratio']:.3f} ({r['compared_with']})" if "ratio" in r else ""
        rows.append(
            f"| {name} | {r['seconds'] * 1e3:.1f} | {r['x_fp32']:.3f} | {r['x_bf16']:.3f} "
            f"| {ratio} |"
        )
    q = data.get("quantizer")
    if q:
        share = q["share_of_int4_bf16_step"]
        rows.append(
            f"\nQuantizer alone (INT4 stochastic, the {q['errors']} errors of one step, "
            f"{q['elements'] / 1e6:.1f}M elements): {q['ms']['compiled']:.1f} ms compiled, "
            f"{q['ms']['eager']:.1f} ms eager = {100 * share['compiled']:.1f}% / "
            f"{100 * share['eager']:.1f}% of the INT4 bf16 step."
        )
    m = data.get("memory")
    if m:
        plain, meta = m["tensor_memory_mb"].values()
        rows.append(
            f"\nTensor memory of a training step, MetaGrad against plain INT4 bf16: peak "
            f"{meta['peak_mb']:.0f} vs {plain['peak_mb']:.0f} MB (**{m['ratio_peak']:.2f}x**), "
            f"growth over weights {meta['growth_mb']:.0f} vs {plain['growth_mb']:.0f} MB "
            f"(**{m['ratio_growth']:.2f}x**)."
        )
    layers = data.get("layers")
    if layers:
        rows += [
            "",
            "| layer backward (INT8 error) | fp32 ms | bf16 ms | int8 ms | int8 codes in bf16 ms "
            "| bf16/int8 |",
            "|---|---|---|---|---|---|",
        ]
        for r in layers["rows"]:
            ms = r["ms"]
            rows.append(
                f"| {r['name']} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | {ms['int8']:.1f} "
                f"| {ms['int8 codes in bf16']:.1f} | {r['bf16/int8']:.2f}x |"
            )
        med = layers["conv_medians"]
        rows.append(
            f"\nMedian over the 13 convolutions: bf16/int8 **{med['bf16/int8']:.2f}x**, "
            f"fp32/int8 {med['fp32/int8']:.2f}x."
        )
    return "\n".join(rows)


def render() -> str:
    sections = [
        ("quantized-baselines.json", "Plain quantized gradients", training_table),
        ("quantized-baselines.json", "Step time side by side", step_ratio_table),
        ("metagrad-cifar10.json", "MetaGrad on CIFAR-10", training_table),
        ("metagrad-cifar10.json", "MetaGrad against plain, paired", paired_table),
        ("metagrad-ablations.json", "MetaGrad ablations", ablation_table),
        ("metagrad-signal.json", "MetaGrad's learning signal and its ceiling", signal_table),
        ("metagrad-overhead.json", "MetaGrad's cost", overhead_table),
        ("speed-cpu.json", "Training speed on CPU, against float32 and bf16", speed_table),
        ("speed-cuda.json", "Training speed on CUDA, against float32, TF32 and bf16", speed_table),
    ]
    out = []
    for name, title, table in sections:
        data = _load(name)
        if data is not None:
            out.append(f"#### {title} (`benchmarks/results/{name}`)\n\n{table(data)}\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="rewrite this file between its markers")
    args = parser.parse_args()
    tables = render()
    if args.readme is None:
        print(tables)
        return
    text = args.readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    args.readme.write_text(pattern.sub(lambda _: f"{START}\n{tables}\n{END}", text))


if __name__ == "__main__":
    main()
