"""Tables of measurements (speed, memory, gradient statistics, communication, the demo's output),
rendered from the committed result files for :mod:`benchmarks.tables`."""

from __future__ import annotations

from benchmarks.tables_training import PAIRED, paired_cells
from metagrad.stats import differences


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
    gains = [
        f"{name} {min(g):.2f}-{max(g):.2f} ({len(g)} bins)"
        for name, c in ceilings.items()
        if "gain" in c["families"]
        for g in [[row[0] for row in c["families"]["gain"]["shared"]["correction"]["gain"]]]
    ]
    if gains:
        rows += ["", f"Fitted shared gains per bin of `gain`, step {point}: {'; '.join(gains)}."]
    trained = data.get("quantized_training", {})
    if trained:
        steps = next(iter(trained.values()))["steps"]
        rows += ["", f"After {steps} steps of training with the quantized gradients:", "", *header]
        for name, r in trained.items():
            rows += _ceiling_rows(name, r["ceiling"])
    return "\n".join(rows)


def snr_table(data: dict) -> str:
    """Slope of log SNR on log |g| over the layers (0: flat, 2: noise of one variance), along
    plain full-precision SGD and on each quantizer's own training trajectory."""
    rows = [
        "| gradients | step | slope, variance (median, min-max) | slope, error | "
        "kurtosis of g (median) |",
        "|---|---|---|---|---|",
    ]
    points = [(point, name, r) for point, v in data["snr"].items() for name, r in v.items()]
    trained = data.get("quantized_training", {})
    points += [(f"{r['steps']}, its own training", n, r["snr"]) for n, r in trained.items()]
    for point, name, r in points:
        s = r["summary"]
        slopes = [
            f"{s[k]['median']:.2f} ({s[k]['min']:.2f} to {s[k]['max']:.2f})" if k in s else "-"
            for k in ("slope_variance", "slope_mse")
        ]
        rows.append(
            f"| {name} | {point} | {slopes[0]} | {slopes[1]} | {s['kurtosis_median']:.1f} |"
        )
    return "\n".join(rows)


def _flips(r: dict) -> str:
    """The sign-flip cells of one phase: median and count with their null's 5-95% and p."""
    f = r.get("sign_flip_null")
    if f is None:
        return "not computed (`--reanalyse`) | | |"
    lo, _, hi = f["median_abs_t_quantiles_5_50_95"]
    clo, _, chi = f["count_above_2_quantiles_5_50_95"]
    c = r["correlation"]
    return (
        f"{f['median_abs_t']:.2f} ({lo:.2f}-{hi:.2f}, p {f['p_median_abs_t']:.2g}) "
        f"| {f['count_abs_t_above_2']} ({clo:.0f}-{chi:.0f}, p {f['p_count_abs_t_above_2']:.2g}) "
        f"| {c['median_abs_r']:.2f} | {c['effective_parameters']:.1f}"
    )


def meta_gradient_table(data: dict) -> str:
    """Batch-means t of the mean meta-gradient per parameter: against sign flips of the batch
    means (the parameters' correlation kept), then against the original reference, simulated
    for independent parameters."""
    rows = [
        "Against every sign pattern of the batch means, one sign per group shared by all "
        "parameters (their correlation kept; the test to read):",
        "",
        "| gradients | hypernetwork | parameters | median abs t (sign flips 5-95%, p) "
        "| abs t > 2 (sign flips 5-95%, p) | median abs r between parameters "
        "| effective parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    phases = [(n, ph, r) for n, p in data["meta_gradients"].items() for ph, r in p.items()]
    for name, phase, r in phases:
        rows.append(f"| {name} | {phase} | {r['parameters_tested']} | {_flips(r)} |")
    rows += [
        "",
        "The original reference, simulated for as many *independent* parameters, with a binomial "
        "p for the count: it ignores their correlation and overstates the evidence:",
        "",
        "| gradients | hypernetwork | median abs t (noise 5-95%) "
        "| abs t > 2 (noise 5-95%, binomial p) | naive median abs t | sign test median abs z "
        "| same sign in both halves | lag-1 autocorrelation (median, range) "
        "| batch-means / naive standard error (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, phase, r in phases:
        ref = r["noise_reference"]
        lo, _, hi = ref["median_abs_t_quantiles_5_50_95"]
        clo, _, chi = ref["count_above_2_quantiles_5_50_95"]
        lag_lo, lag_hi = r["lag1_autocorrelation_range"]
        rows.append(
            f"| {name} | {phase} | {r['median_abs_t']:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {r['count_abs_t_above_2']} ({clo:.0f}-{chi:.0f}, "
            f"{ref['binomial_p_count_at_least_observed']:.2g}) | "
            f"{r['median_abs_t_naive']:.2f} | {r['sign_test_median_abs_z']:.2f} | "
            f"{r['halves_same_sign']} | {r['lag1_autocorrelation_median']:.2f} "
            f"({lag_lo:.2f} to {lag_hi:.2f}) | {r['median_se_ratio_batch_over_naive']:.2f} |"
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


def horizon_cost_table(data: dict) -> str:
    rows = ["| run | median step s | x plain | x K = 1 |", "|---|---|---|---|"]
    for name, seconds in data["median_step_seconds"].items():
        rows.append(
            f"| {name} | {seconds:.3f} | {data['ratio_to_plain'][name]:.2f} "
            f"| {data['ratio_to_k1'][name]:.2f} |"
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


def demo_table(text: str) -> str:
    """The table ``metagrad demo`` prints (its last block before the files it wrote)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backward pass"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "```text\n" + "\n".join(lines[start:end]) + "\n```"


def fsdp_table(data: dict) -> str:
    """Sharded (FSDP2) against replicated (DDP) training of the GPT: memory and step time."""
    from benchmarks.fsdp import table

    train, machine = data["train"], data["machine"]
    header = (
        f"{train['model']} width {train['width']}, global batch {train['batch_size']}, "
        f"{train['optimizer']}, INT{train.get('grad_bits', 32)} gradients, float32; "
        f"{data['processes']} processes (gloo), {train['threads']} thread each; torch "
        f"{machine['torch']}, {machine['device_name']}; median step of {train['max_steps']} "
        f"after {data['warmup_steps']} left out, over {data['repeats']} runs in turns; peak "
        "resident memory of each process."
    )
    return f"{header}\n\n{table(data)}"


def ceiling_rerun_table(data: dict) -> str:
    """The ceiling on more batches and seeds: per quantizer and target, the identity's held-out
    cosine, the best family's (chosen by its fit), and their difference paired by seed."""
    settings = data["settings"]
    rows = [
        f"After {settings['step']} SGD steps; fit on {settings['fit']} batches, scored on "
        f"{settings['held_out']} others; seeds {', '.join(data['runs'])}.",
        "",
        "| gradients | target | identity, held out | best shared family (by fit) | held out "
        f"| best minus identity, paired | {PAIRED} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, g in data["gains"].items():
        quantizer, target = key.split("/")
        families = _cell(", ".join(sorted(set(g["best_fit_family"].values()))))
        c = differences(g["gain"]["differences"])
        rows.append(
            f"| {quantizer} | {target} | {g['identity_held_out']:.4f} | {families} "
            f"| {g['best_fit_family_held_out']:.4f} | {paired_cells(c, 4)} |"
        )
    return "\n".join(rows)
