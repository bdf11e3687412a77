"""Markdown tables of the committed benchmark results, written into the documentation.

    python -m benchmarks.tables            # print every table
    python -m benchmarks.tables --write    # rewrite the tables in README.md and docs/results.md
    python -m benchmarks.tables --check    # exit 1 if a document's tables differ from the JSON

A document holds a generated table between two markers, ``<!-- tables:NAME -->`` and
``<!-- /tables:NAME -->``, with ``NAME`` a key of :data:`TABLES`; ``--write`` replaces what lies
between them and leaves every other line (headings, the hand-written analysis) as it is. Each
table is rendered from files in ``benchmarks/results/`` and followed by the command that wrote
each file (``commands``: every such command, as one block). ``tests/test_tables.py`` checks that
the committed documents are what ``--write`` makes of the committed files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
"""The files ``--write`` and ``--check`` work on."""
BLOCK = re.compile(
    r"^<!-- tables:(?P<name>[\w-]+) -->\n.*?^<!-- /tables:(?P=name) -->$", re.S | re.M
)
"""A generated block: the markers stand alone on their lines."""
START = re.compile(r"^<!-- tables:([\w-]+) -->$", re.M)


METAGRAD_DEFAULTS = {"hyper": "grad+weight", "hyper_hidden": 8, "hyper_lr": 1e-4}
"""Settings the ablation table leaves out when a run has them."""


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


def _spread(values: list[float], sign: bool = False, digits: int = 2) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{'+' if sign else ''}.{digits}f} ± {sd:.{digits}f} ({len(values)})"


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


def headline_table(methods: dict, gpt: dict) -> str:
    """The README's table: every gradient quantizer on vgg16 and on the character GPT."""
    wide = methods.get("step_time_vs_plain_at_width", {})
    rows = [
        "| gradients | vgg16, CIFAR-10: test acc (%) | vs fp32 | char GPT: test bits/char "
        f"| vs fp32 | step time vs `plain` (vgg16, width {methods['timing_width']:g}) |",
        "|---|---|---|---|---|---|",
    ]

    def cells(row: dict | None, digits: int) -> str:
        if row is None:
            return "- | -"
        if row["mean"] is None:
            return "diverged | -"
        return f"{_spread(row['values'], digits=digits)} | {row['gap_to_fp32']:+.{digits}f}"

    for method, row in methods["methods"].items():
        step = f"{wide[method]:.2f}x" if method in wide else "-"
        rows.append(
            f"| {method} | {cells(row, 2)} | {cells(gpt['methods'].get(method), 3)} | {step} |"
        )
    return "\n".join(rows)


def horizon_cost_table(data: dict) -> str:
    rows = ["| run | median step s | x plain | x K = 1 |", "|---|---|---|---|"]
    for name, seconds in data["median_step_seconds"].items():
        rows.append(
            f"| {name} | {seconds:.3f} | {data['ratio_to_plain'][name]:.2f} "
            f"| {data['ratio_to_k1'][name]:.2f} |"
        )
    return "\n".join(rows)


def stopped_table(data: dict) -> str:
    """The diverged MetaGrad runs, per epoch."""
    rows = [
        "| hypernetwork output | epoch | train loss | train acc | test acc |",
        "|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        for m in r["metrics"]:
            rows.append(
                f"| {r['hypernet_output']} | {m['epoch']} | {m['train_loss']:.3f} "
                f"| {m['train_acc']:.2f} | {m['test_acc']:.2f} |"
            )
    return "\n".join(rows)


def reproduce_table(data: dict) -> str:
    """``metagrad reproduce``'s table: plain and MetaGrad per setting, paired by seed."""
    t = data["table"]
    rows = [
        f"{t['model']} at width {t['width']:g}, {t['epochs']} epochs, final test accuracy (%), "
        "mean ± standard deviation (number of seeds); differences paired by seed.",
        "",
        "| gradients | plain | MetaGrad | MetaGrad - plain | plain - fp32 | MetaGrad - fp32 |",
        "|---|---|---|---|---|---|",
    ]

    def spread(values: list[float], sign: bool = False) -> str:
        return _spread(values, sign) if values else ""

    for setting, r in data["summary"].items():
        plain = spread([v for _, v in r["plain"]])
        if setting == "fp32":
            rows.append(f"| {setting} | {plain} | | | | |")
            continue
        rows.append(
            f"| {setting} | {plain} | {spread([v for _, v in r['metagrad']])} "
            f"| {spread(r['metagrad_minus_plain'], True)} "
            f"| {spread(r['plain_minus_fp32'], True)} "
            f"| {spread(r['metagrad_minus_fp32'], True)} |"
        )
    return "\n".join(rows)


def transformers_table(data: dict) -> str:
    """Whole training steps of the two transformers, side by side per model."""
    machine, models = data["machine"], data["models"]
    names = [name for name in models if name in data]
    about = "; ".join(
        f"{name} width {m['width']:g}, batch {m['batch_size']}, {m['optimizer']}"
        for name, m in models.items()
    )
    rows = [
        f"{about}; torch {machine['torch']}, {machine['device_name']}, "
        f"{machine['threads']} thread{'' if machine['threads'] == 1 else 's'}, median of "
        f"{data['repetitions']} interleaved repetitions.",
        "",
        "| training step | " + " | ".join(f"{n} s | x fp32" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for setting in data["settings"]:
        cells = " | ".join(
            f"{data[n][setting]['seconds']:.3f} | {data[n][setting]['x_fp32']:.3f}" for n in names
        )
        rows.append(f"| {setting} | {cells} |")
    cost = {
        n: data[n]["metagrad_vs_quantized"] for n in names if "metagrad_vs_quantized" in data[n]
    }
    if cost:
        rows += [
            "",
            "MetaGrad against the quantized step it corrects (step time; tensor memory of a "
            "step, peak and growth over it, each setting probed in a fresh process):",
            "",
            "| model | step | peak memory | memory growth |",
            "|---|---:|---:|---:|",
        ]
        for n, c in cost.items():
            memory = " | ".join(f"{c[k]:.2f}x" if k in c else "" for k in ("peak", "growth"))
            rows.append(f"| {n} | {c['step']:.2f}x | {memory} |")
    return "\n".join(rows)


def integrations_table(data: dict) -> str:
    """Hugging Face models converted by ``quantize_``: coverage, graph breaks, costs."""
    machine = data["machine"]
    rows = [
        f"{data['config']}; batch {data['batch_size']}, bf16 autocast, AdamW; torch "
        f"{machine['torch']}, {machine['cpu']}, {machine['threads']} threads, median of "
        f"{data['repetitions']} interleaved repetitions.",
        "",
        "| model | matmuls converted | graph breaks (unconverted) | training step vs unconverted "
        "| inference vs unconverted | MetaGrad step vs quantized step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in data["models"].items():
        m = r["matmuls"]
        rows.append(
            f"| {name} | {m['converted']} / {m['total']} | {r['graph_breaks']['count']} "
            f"({r.get('graph_breaks_unconverted', {}).get('count', '?')}) "
            f"| {r['step']['converted_vs_unconverted']:.2f}x "
            f"| {r['inference']['converted_vs_unconverted']:.2f}x "
            f"| {r['metagrad_vs_quantized_step']:.2f}x |"
        )
    return "\n".join(rows)


def compile_step_table(data: dict) -> str:
    """Quantized training steps, eager against ``torch.compile(model, fullgraph=True)``."""
    machine = data["machine"]
    names = [n for n in data["models"] if n in data]
    rows = [
        f"bf16 autocast, Adam; torch {machine['torch']}, {machine['cpu']}, {machine['threads']} "
        f"threads; median of {data['steps']} interleaved steps after {data['warmup']} "
        "(compilation timed apart).",
        "",
        "| model | gradients | eager ms | compiled ms | compiled / eager | graph breaks "
        "| compile s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        for grad in data["grads"]:
            eager, compiled = data[name][f"{grad} eager"], data[name][f"{grad} compiled model"]
            rows.append(
                f"| {name} | {grad} | {eager['seconds'] * 1e3:.1f} "
                f"| {compiled['seconds'] * 1e3:.1f} | {compiled['x_eager']:.3f} "
                f"| {compiled['graph_breaks']} | {compiled['compile_seconds']:.1f} |"
            )
    return "\n".join(rows)


def inference_table(data: dict) -> str:
    """Eval-mode forward passes of converted models against the unconverted ones."""
    machine = data["machine"]
    rows = [
        f"`torch.{data['mode']}()`, {data['config']}; torch {machine['torch']}, {machine['cpu']}, "
        f"{machine['threads']} threads, median of {data['reps']} interleaved repetitions.",
        "",
        "| model | unconverted ms | converted ms | converted / unconverted | outputs identical |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in data["models"].items():
        if "skipped" in r:
            continue
        rows.append(
            f"| {name} | {r['unconverted_seconds'] * 1e3:.3f} | {r['converted_seconds'] * 1e3:.3f}"
            f" | {r['ratio']:.3f} | {'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(rows)


COMM_LABELS = {
    "fp32": "fp32 (DDP's all-reduce)",
    "fp16": "fp16 (`fp16_compress_hook`)",
    "bf16": "bf16 (`bf16_compress_hook`)",
    "powerSGD r=1": "PowerSGD rank 1",
    "powerSGD r=4": "PowerSGD rank 4",
    "ours int8": "ours, 8 bits",
    "ours int4": "ours, 4 bits",
}


def _error(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.1e}"


def _cosine(x: float) -> str:
    return f"{x:.6f}" if x > 0.99 else f"{x:.3f}"


def comm_table(data: dict) -> str:
    """One all-reduce of real gradients with each method, against the exact mean."""
    s = data["settings"]
    rows = [
        f"One all-reduce of {s['model']} (width {s['width']:g}) gradients, {s['numel']:,} "
        f"elements, {s['world_size']} {data['machine']['backend']} processes, against the exact "
        "mean.",
        "",
        "| method | bytes sent per rank | fp32 bytes / bytes | relative L2 error | cosine "
        "| ranks identical | ms |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in data["rows"]:
        rows.append(
            f"| {COMM_LABELS.get(r['method'], r['method'])} | {r['bytes_per_rank']:,.0f} "
            f"| {r['compression']:.2f} | {_error(r['rel_l2_error'])} | {_cosine(r['cosine'])} "
            f"| {'yes' if r['ranks_bit_identical'] else 'no'} "
            f"| {r['ms_per_all_reduce_median']:.1f} |"
        )
    return "\n".join(rows)


def comm_training_table(data: dict) -> str:
    """Final accuracy of training with each communication precision, paired by seed."""
    runs: dict[str, list[dict]] = {}
    for r in data["runs"]:
        runs.setdefault(r["setting"], []).append(r)
    base = {r["seed"]: r for r in runs.get("fp32", [])}
    rows = [
        "| comm | bytes per step per rank | fp32 bytes / bytes | final test acc (%) "
        "| minus fp32 comm, paired by seed |",
        "|---|---:|---:|---|---|",
    ]
    for setting, rs in runs.items():
        first = rs[0]
        ratio = next(iter(base.values()))["bytes_per_step"] / first["bytes_per_step"]
        diffs = [r["final_test_acc"] - base[r["seed"]]["final_test_acc"] for r in rs]
        paired = _spread(diffs, sign=True) if setting != "fp32" else ""
        rows.append(
            f"| {setting} | {first['bytes_per_step']:,.0f} ({first['bytes_how']}) | {ratio:.2f} "
            f"| {_spread([r['final_test_acc'] for r in rs])} | {paired} |"
        )
    return "\n".join(rows)


def demo_table(text: str) -> str:
    """The table ``metagrad demo`` prints (its last block before the files it wrote)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backward pass"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "```text\n" + "\n".join(lines[start:end]) + "\n```"


def commands_block() -> str:
    """Every command that wrote a committed result file, once, with the files it writes."""
    files: dict[str, list[str]] = {}
    for table in TABLES.values():
        for f, command in zip(table.files, table.commands, strict=True):
            if (RESULTS / f).is_file() and f not in files.setdefault(command, []):
                files[command].append(f)
    lines = [f"{c}\n    # -> {', '.join(fs)}" for c, fs in files.items() if fs]
    return "```bash\n" + "\n".join(lines) + "\n```"


@dataclass(frozen=True)
class Table:
    """A generated table: the result files it reads, how it renders them, and the command that
    writes each file (run from the repository root)."""

    files: tuple[str, ...]
    render: Callable[..., str]
    commands: tuple[str, ...]
    text: bool = False  # the files are plain text, not JSON


def _table(files: str | tuple[str, ...], render: Callable[..., str], *commands: str) -> Table:
    files = files if isinstance(files, tuple) else (files,)
    return Table(files, render, commands)


METHODS = "python -m benchmarks.methods --parallel 2 --threads 1 --timing-width 1.0"
METHODS_GPT = "python -m benchmarks.methods --task gpt --epochs 3 --parallel 2 --threads 1"
TABLES: dict[str, Table] = {
    "headline": _table(("methods.json", "methods-gpt.json"), headline_table, METHODS, METHODS_GPT),
    "demo": Table(
        ("demo.txt",), demo_table, ("metagrad demo > benchmarks/results/demo.txt",), text=True
    ),
    "commands": Table((), commands_block, ()),
    "methods": _table("methods.json", methods_table, METHODS),
    "methods-gpt": _table("methods-gpt.json", methods_table, METHODS_GPT),
    "baselines": _table(
        "quantized-baselines.json",
        training_table,
        "python -m benchmarks.quantized_baselines",
    ),
    "baselines-step-time": _table(
        "quantized-baselines.json",
        step_ratio_table,
        "python -m benchmarks.quantized_baselines",
    ),
    "metagrad-cifar10": _table(
        "metagrad-cifar10.json", training_table, "python -m benchmarks.metagrad_cifar10 --threads 1"
    ),
    "metagrad-paired": _table(
        "metagrad-cifar10.json", paired_table, "python -m benchmarks.metagrad_cifar10 --threads 1"
    ),
    "metagrad-stopped": _table(
        "metagrad-cifar10-stopped.json",
        stopped_table,
        "python -m benchmarks.metagrad_cifar10 --threads 1",
    ),
    "reproduce-cpu": _table(
        "reproduce-cpu/results.json",
        reproduce_table,
        "metagrad reproduce --profile cpu --seeds 0 1 --parallel 2 --threads 1 "
        "--out benchmarks/results/reproduce-cpu",
    ),
    "ablations": _table(
        "metagrad-ablations.json",
        ablation_table,
        "python -m benchmarks.metagrad_ablations --threads 2",
    ),
    "ceiling": _table(
        "metagrad-signal.json", signal_table, "python -m benchmarks.metagrad_signal --threads 1"
    ),
    "snr": _table(
        "metagrad-signal.json", snr_table, "python -m benchmarks.metagrad_signal --threads 1"
    ),
    "meta-gradient": _table(
        "metagrad-signal.json",
        meta_gradient_table,
        "python -m benchmarks.metagrad_signal --threads 1",
    ),
    "horizon": _table(
        "metagrad-horizon.json",
        horizon_table,
        "python -m benchmarks.metagrad_horizon --threads 1 --parallel 2",
    ),
    "horizon-cost": _table(
        "metagrad-horizon-cost.json",
        horizon_cost_table,
        "python -m benchmarks.metagrad_horizon --cost",
    ),
    "overhead": _table(
        "metagrad-overhead.json", overhead_table, "python -m benchmarks.metagrad_overhead"
    ),
    "speed-cpu": _table("speed-cpu.json", speed_table, "python -m benchmarks.speed"),
    "speed-cuda": _table(
        "speed-cuda.json", speed_table, "python -m benchmarks.speed --device cuda"
    ),
    "transformers-cpu": _table(
        "transformers-cpu.json", transformers_table, "python -m benchmarks.transformers --threads 1"
    ),
    "integrations-cpu": _table(
        "integrations-cpu.json", integrations_table, "python -m benchmarks.integrations"
    ),
    "compile-step-cpu": _table(
        "compile-step-cpu.json", compile_step_table, "python -m benchmarks.compile_step"
    ),
    "inference-cpu": _table(
        "inference-cpu.json", inference_table, "python -m benchmarks.inference"
    ),
    "comm": _table("comm.json", comm_table, "python -m benchmarks.comm"),
    "comm-training": _table(
        "comm-training.json", comm_training_table, "python -m benchmarks.comm_training"
    ),
}
"""Every generated block by the name its markers use."""


def available(name: str) -> bool:
    """Whether the result files of table ``name`` are committed."""
    return all((RESULTS / f).is_file() for f in TABLES[name].files)


def render(name: str, where: Path = ROOT) -> str:
    """Table ``name`` and, below it, its source files (linked relative to the folder ``where``)
    and the command that writes them."""
    table = TABLES[name]
    missing = [f for f in table.files if not (RESULTS / f).is_file()]
    if missing:
        raise FileNotFoundError(f"table {name!r} needs benchmarks/results/{missing[0]}")
    texts = [(RESULTS / f).read_text() for f in table.files]
    body = table.render(*(texts if table.text else [json.loads(t) for t in texts]))
    if not table.files:
        return body
    sources = " and ".join(
        f"[`benchmarks/results/{f}`]({Path(os.path.relpath(RESULTS / f, where)).as_posix()}), "
        f"written by `{command}`"
        for f, command in zip(table.files, table.commands, strict=True)
    )
    return f"{body}\n\nSource: {sources}."


def fill(text: str, where: Path = ROOT) -> str:
    """``text`` with every marked block rewritten from the result files."""
    names = START.findall(text)
    unknown = sorted(set(names) - TABLES.keys())
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
    blocks = [m["name"] for m in BLOCK.finditer(text)]
    if blocks != names:
        unclosed = next(n for n in names if names.count(n) != blocks.count(n))
        raise ValueError(f"<!-- tables:{unclosed} --> has no <!-- /tables:{unclosed} -->")
    return BLOCK.sub(
        lambda m: (
            f"<!-- tables:{m['name']} -->\n\n{render(m['name'], where)}\n\n"
            f"<!-- /tables:{m['name']} -->"
        ),
        text,
    )


def stale(documents: tuple[Path, ...] | None = None) -> list[Path]:
    """The documents (default :data:`DOCUMENTS`) whose tables differ from the result files."""
    return [d for d in documents or DOCUMENTS if fill(d.read_text(), d.parent) != d.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"tables to print (default: all): {', '.join(TABLES)}"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write", action="store_true", help="rewrite the tables in README.md and docs/results.md"
    )
    action.add_argument(
        "--check", action="store_true", help="exit 1 if a document's tables are out of date"
    )
    args = parser.parse_args(argv)
    if args.write:
        for doc in DOCUMENTS:
            text = doc.read_text()
            new = fill(text, doc.parent)
            if new != text:
                doc.write_text(new)
                print(f"rewrote {doc.relative_to(ROOT)}")
        return 0
    if args.check:
        out_of_date = stale()
        for doc in out_of_date:
            name = doc.relative_to(ROOT)
            print(f"{name}: tables out of date; run python -m benchmarks.tables --write")
        return 1 if out_of_date else 0
    unknown = sorted(set(args.names) - TABLES.keys())
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
    for name in args.names or [n for n in TABLES if available(n)]:
        print(f"### {name}\n\n{render(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
