"""Markdown tables of the committed benchmark results (the README's Results section).

python -m benchmarks.tables
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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


def horizon_table(data: dict) -> str:
    """Per gradients and variant: accuracy over seeds, minus plain paired by seed, the
    last epoch's correction and cosine change, the learned gain at 8 rms."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in data["runs"]:
        name = r["run"].rsplit("-seed", 1)[0]
        gradients = "int8-nearest-tensor" if name.startswith("int8") else "int4-stochastic-tensor"
        groups.setdefault((gradients, name.removeprefix(gradients + "-")), []).append(r)
    rows = [
        "| gradients | run | test acc (seeds) | minus plain, paired | correction "
        "| used - quantized cosine | gain at 8 rms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (gradients, variant), runs in groups.items():
        plain = {r["seed"]: r["final_test_acc"] for r in groups.get((gradients, "plain"), [])}
        accs = [r["final_test_acc"] for r in runs]
        diffs = [r["final_test_acc"] - plain[r["seed"]] for r in runs if r["seed"] in plain]
        lasts = [r["gradients"]["per_epoch"][-1] for r in runs]
        correction = statistics.fmean(x["correction"] for x in lasts)
        dcos = statistics.fmean(x["used_cosine"] - x["quantized_cosine"] for x in lasts)
        gains = [r["learned_response"]["gain"][-1] for r in runs if "learned_response" in r]
        gain = f"{statistics.fmean(gains):.3f}" if gains else ""
        rows.append(
            f"| {gradients} | {variant} | {_spread(accs)} "
            f"| {_spread(diffs, sign=True) if variant != 'plain' else ''} "
            f"| {correction:.4f} | {dcos:+.4f} | {gain} |"
        )
    return "\n".join(rows)


def _spread(values: list[float], sign: bool = False) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (
        f"{mean:+.2f} ± {sd:.2f} ({len(values)})"
        if sign
        else f"{mean:.2f} ± {sd:.2f} ({len(values)})"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _ceiling_rows(name: str, c: dict) -> list[str]:
    identity = c["identity"]["pooled"]
    excluded = f" ({len(c['excluded_layers'])} all-zero layers left out)"
    label = name + (excluded if c["excluded_layers"] else "")
    rows = []
    for fit in ("shared", "per_layer"):
        cells = [
            f"{f[fit]['pooled']['fit']:.3f} / {f[fit]['pooled']['held_out']:.3f}"
            for f in c["families"].values()
        ]
        rows.append(
            f"| {label} | {fit.replace('_', ' ')} | {identity['fit']:.3f} / "
            f"{identity['held_out']:.3f} | " + " | ".join(cells) + " |"
        )
    return rows


def signal_table(data: dict) -> str:
    """Cosine to fp32 of the best coordinate-wise corrections (fit / held out)."""
    point = str(data["settings"]["ceiling_points"][-1])
    ceilings = data["ceiling"][point]
    families = list(next(iter(ceilings.values()))["families"])
    header = [
        "| gradients | fitted | identity | " + " | ".join(map(_cell, families)) + " |",
        "|---|---|---|" + "---|" * len(families),
    ]
    rows = [
        "Mean over layers of the cosine to the full-precision gradient, fit / held out; shared: "
        "one correction for all layers, per layer: one each. After "
        f"{point} plain SGD steps with full-precision gradients:",
        "",
        *header,
    ]
    for name, c in ceilings.items():
        rows += _ceiling_rows(name, c)
    trained = data.get("quantized_training", {})
    if trained:
        steps = next(iter(trained.values()))["steps"]
        rows += ["", f"After {steps} steps of training with the quantized gradients:", "", *header]
        for name, r in trained.items():
            rows += _ceiling_rows(name, r["ceiling"])
    return "\n".join(rows)


def snr_table(data: dict) -> str:
    """Slope of log SNR on log |g| over the layers (0: flat, 2: noise of one variance)."""
    rows = [
        "| gradients | step | slope, variance (median, min-max) | slope, error | "
        "kurtosis of g (median) |",
        "|---|---|---|---|---|",
    ]
    for point, settings in data["snr"].items():
        for name, r in settings.items():
            s = r["summary"]
            slopes = [
                f"{s[k]['median']:.2f} ({s[k]['min']:.2f} to {s[k]['max']:.2f})" if k in s else "-"
                for k in ("slope_variance", "slope_mse")
            ]
            rows.append(
                f"| {name} | {point} | {slopes[0]} | {slopes[1]} | {s['kurtosis_median']:.1f} |"
            )
    return "\n".join(rows)


def meta_gradient_table(data: dict) -> str:
    """Batch-means t of the mean meta-gradient per parameter, against simulated noise."""
    rows = [
        "| gradients | hypernetwork | parameters | median abs t (noise 5-95%) "
        "| abs t > 2 (noise 5-95%, p) | naive median abs t | sign test median abs z "
        "| same sign in both halves |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, phases in data["meta_gradients"].items():
        for phase, r in phases.items():
            ref = r["noise_reference"]
            lo, _, hi = ref["median_abs_t_quantiles_5_50_95"]
            clo, _, chi = ref["count_above_2_quantiles_5_50_95"]
            rows.append(
                f"| {name} | {phase} | {r['parameters_tested']} | {r['median_abs_t']:.2f} "
                f"({lo:.2f}-{hi:.2f}) | {r['count_abs_t_above_2']} ({clo:.0f}-{chi:.0f}, "
                f"{ref['binomial_p_count_at_least_observed']:.2g}) | "
                f"{r['median_abs_t_naive']:.2f} | {r['sign_test_median_abs_z']:.2f} | "
                f"{r['halves_same_sign']} |"
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


def methods_table(data: dict) -> str:
    """Every gradient preset (and MetaGrad on the chosen ones) against full precision."""
    metric = data.get("metric", "test acc")
    wide = data.get("step_time_vs_plain_at_width", {})
    wide_column = f" step vs plain, width {data['timing_width']:g} |" if wide else ""
    rows = [
        f"| method | seeds | {metric} | vs fp32 | grad cosine | grad rel. error | step vs plain |"
        + wide_column,
        "|---|---|---|---|---|---|---|" + ("---|" if wide else ""),
    ]
    timing = data.get("step_time_vs_plain", {})
    for method, row in data["methods"].items():
        seeds = ", ".join(str(seed) for seed in row["seeds"])
        value = "diverged" if row["mean"] is None else _spread(row["values"])
        gap = "-" if row["gap_to_fp32"] is None else f"{row['gap_to_fp32']:+.2f}"
        cos = "-" if row["grad_cosine"] is None else f"{row['grad_cosine']:.3f}"
        err = "-" if row["grad_rel_error"] is None else f"{row['grad_rel_error']:.3f}"
        step = f"{timing[method]:.2f}x" if method in timing else "-"
        row_text = f"| {method} | {seeds} | {value} | {gap} | {cos} | {err} | {step} |"
        if wide:
            row_text += f" {wide[method]:.2f}x |" if method in wide else " - |"
        rows.append(row_text)
    return "\n".join(rows)


def render() -> str:
    sections = [
        ("quantized-baselines.json", "Plain quantized gradients", training_table),
        ("quantized-baselines.json", "Step time side by side", step_ratio_table),
        ("metagrad-cifar10.json", "MetaGrad on CIFAR-10", training_table),
        ("metagrad-cifar10.json", "MetaGrad against plain, paired", paired_table),
        ("metagrad-ablations.json", "MetaGrad ablations", ablation_table),
        ("metagrad-signal.json", "MetaGrad's learning signal and its ceiling", signal_table),
        ("metagrad-signal.json", "Signal-to-noise ratio against element size", snr_table),
        ("metagrad-signal.json", "MetaGrad's meta-gradient against noise", meta_gradient_table),
        ("metagrad-horizon.json", "MetaGrad's horizon, K = 1 to 4", horizon_table),
        ("metagrad-overhead.json", "MetaGrad's cost", overhead_table),
        ("methods.json", "Gradient quantizers side by side, vgg16", methods_table),
        ("methods-gpt.json", "Gradient quantizers side by side, character GPT", methods_table),
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
