"""Tables of training runs, rendered from the committed result files for :mod:`benchmarks.tables`.

Wherever runs of two methods share seeds, they are compared by their differences seed by seed
(:mod:`metagrad.stats`): the mean difference, its t-based 95% confidence interval and the exact
sign-flip p. ``mean ± sd (n)`` describes the spread of one method's results over its ``n`` seeds;
it is not a test.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from benchmarks.goals import GOAL_4BIT
from benchmarks.metagrad_biased import (
    CHANCE,
    CONTROLS,
    FROZEN,
    PRESCALE,
    PRESCALED,
    accuracies,
    sweep_names,
)
from metagrad.stats import PairedComparison, interval_text, p_text, paired, signed

METAGRAD_DEFAULTS = {"hyper": "grad+weight", "hyper_hidden": 8, "hyper_lr": 1e-4}
"""Settings the ablation table leaves out when a run has them."""
PAIRED = "95% CI | sign-flip p"
"""The header of the two cells :func:`paired_cells` adds after a mean difference."""


def _is_fp32(r: dict) -> bool:
    """Full-precision gradients: records of either format (``bits``, or the spec strings)."""
    return r["bits"] == 32 if "bits" in r else r["grad_spec"] == "fp32"


def _quantizer(r: dict) -> str:
    """The gradients a run quantized with, MetaGrad or not."""
    if "label" in r:  # records that name what ran (training.records.gradient_record)
        return r["label"].removeprefix("metagrad+")
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


def _spread(values: list[float], sign: bool = False, digits: int = 2) -> str:
    """``mean ± sample standard deviation (n)``: the spread over seeds, not a test."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{'+' if sign else ''}.{digits}f} ± {sd:.{digits}f} ({len(values)})"


def paired_cells(c: PairedComparison, digits: int = 2) -> str:
    """``mean | 95% CI | p`` of a paired comparison (``-`` where there is none)."""
    mean = "-" if c.mean is None else signed(c.mean, digits)
    return f"{mean} | {interval_text(c, digits)} | {p_text(c)}"


def _per_seed(values: tuple[float, ...], digits: int = 2) -> str:
    return ", ".join(signed(v, digits) for v in values)


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


def metagrad_pairs(data: dict) -> dict[str, dict[str, dict[int, float | None]]]:
    """Per quantizer, the final accuracy per seed of ``plain``, ``metagrad`` and ``fp32``."""
    out: dict[str, dict[str, dict[int, float | None]]] = {}
    fp32 = {r["seed"]: r["final_test_acc"] for r in data["runs"] if _is_fp32(r)}
    for r in data["runs"]:
        if not _is_fp32(r):
            runs = out.setdefault(_quantizer(r), {"fp32": fp32})
            runs.setdefault(r["method"], {})[r["seed"]] = r["final_test_acc"]
    return out


def paired_table(data: dict) -> str:
    """Plain against MetaGrad per quantizer, paired by seed, with full precision's runs."""
    rows = [
        "| gradients | seeds | fp32 | plain | MetaGrad | MetaGrad - plain, per seed "
        f"| mean | {PAIRED} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for quantizer, runs in metagrad_pairs(data).items():
        c = paired(runs.get("metagrad", {}), runs.get("plain", {}))
        if not c.n:
            continue
        seeds = list(c.seeds)

        def accs(method: str, seeds: list = seeds, runs: dict = runs) -> str:
            return ", ".join(_number(runs[method].get(s)) for s in seeds)

        rows.append(
            f"| {quantizer} | {', '.join(map(str, seeds))} | {accs('fp32')} | {accs('plain')} "
            f"| {accs('metagrad')} | {_per_seed(c.differences)} | {paired_cells(c)} |"
        )
    return "\n".join(rows)


def _ablation_baseline(r: dict, runs: list[dict]) -> dict | None:
    """The plain run of the same gradients and seed as ablation run ``r``."""
    o = r["overrides"]
    for b in runs:
        ob = b["overrides"]
        same = all(ob.get(k) == o.get(k) for k in ("grad_bits", "grad_rounding", "seed"))
        if ob["method"] == "plain" and same:
            return b
    return None


def ablation_table(data: dict) -> str:
    """Each ablation's accuracy, minus the plain run of its gradients and seed (one pair: no
    interval), and over its last epoch the gradient cosines and correction size."""
    rows = [
        "| run | changed | test acc | minus plain, same seed (one pair: no interval) "
        "| cosine to fp32: quantized | used | correction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        changed = ", ".join(
            f"{k}={v}" for k, v in r["overrides"].items() if METAGRAD_DEFAULTS.get(k) != v
        )
        base = _ablation_baseline(r, data["runs"])
        diff = ""
        if base is not None and base is not r and r["overrides"]["method"] != "plain":
            diff = signed(r["final_test_acc"] - base["final_test_acc"])
        last = r["gradients"]["per_epoch"][-1]
        rows.append(
            f"| {r['run']} | {changed} | {_final(r)} | {diff} "
            f"| {last['quantized_cosine']:.3f} | {last['used_cosine']:.3f} "
            f"| {last['correction']:.3f} |"
        )
    return "\n".join(rows)


def horizon_groups(data: dict) -> dict[tuple[str, str], list[dict]]:
    """The horizon runs per (gradients, variant)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in data["runs"]:
        name = r["run"].rsplit("-seed", 1)[0]
        gradients = "int8-nearest-tensor" if name.startswith("int8") else "int4-stochastic-tensor"
        groups.setdefault((gradients, name.removeprefix(gradients + "-")), []).append(r)
    return groups


def horizon_comparison(groups: dict, gradients: str, variant: str) -> PairedComparison:
    """A horizon variant minus plain of the same gradients, paired by seed."""

    def accs(v: str) -> dict[int, float]:
        return {r["seed"]: r["final_test_acc"] for r in groups.get((gradients, v), [])}

    return paired(accs(variant), accs("plain"))


def horizon_table(data: dict) -> str:
    """Per gradients and variant: accuracy over seeds, minus plain paired by seed, the
    last epoch's correction and cosine change, the learned gain at 8 rms."""
    groups = horizon_groups(data)
    rows = [
        "| gradients | run | test acc (seeds) | minus plain, paired | 95% CI | sign-flip p "
        "| correction | used - quantized cosine | gain at 8 rms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (gradients, variant), runs in groups.items():
        accs = [r["final_test_acc"] for r in runs]
        lasts = [r["gradients"]["per_epoch"][-1] for r in runs]
        correction = statistics.fmean(x["correction"] for x in lasts)
        dcos = statistics.fmean(x["used_cosine"] - x["quantized_cosine"] for x in lasts)
        gains = [r["learned_response"]["gain"][-1] for r in runs if "learned_response" in r]
        gain = f"{statistics.fmean(gains):.3f}" if gains else ""
        compared = " | | "
        if variant != "plain":
            compared = paired_cells(horizon_comparison(groups, gradients, variant))
        rows.append(
            f"| {gradients} | {variant} | {_spread(accs)} | {compared} "
            f"| {correction:.4f} | {dcos:+.4f} | {gain} |"
        )
    return "\n".join(rows)


def metric_of(data: dict) -> tuple[str, int]:
    """The run records' key of a methods file's result, and the decimals it is shown with."""
    bpc = any(r.get("final_test_bpc") is not None for r in data["runs"])
    return ("final_test_bpc", 3) if bpc else ("final_test_acc", 2)


def by_seed(data: dict) -> dict[str, dict[int, float | None]]:
    """A methods file's results per method and seed (None: diverged)."""
    key, _ = metric_of(data)
    out: dict[str, dict[int, float | None]] = {}
    for r in data["runs"]:
        out.setdefault(r["method_name"], {})[r["seed"]] = r.get(key)
    return out


def methods_comparisons(data: dict) -> dict[str, PairedComparison]:
    """Every method minus full precision, and ``metagrad+P`` and ``recipe+P`` (the paper's
    whole recipe) minus ``P``, paired by seed."""
    values = by_seed(data)
    fp32 = values.get("fp32", {})  # a file without full precision: no seeds to pair
    out = {m: paired(v, fp32) for m, v in values.items() if m != "fp32"}
    for m, v in values.items():
        base = m.removeprefix("metagrad+").removeprefix("recipe+")
        if base != m and base in values:
            out[f"{m} - {base}"] = paired(v, values[base])
    return out


def methods_table(data: dict) -> str:
    """Every gradient preset (and MetaGrad on the chosen ones) against full precision, paired
    by seed; then MetaGrad against the preset it corrects. A file without full-precision runs
    (or without step timings) leaves those columns out."""
    metric = data.get("metric", "test acc")
    _, digits = metric_of(data)
    wide = data.get("step_time_vs_plain_at_width", {})
    timing = data.get("step_time_vs_plain", {})
    with_fp32 = "fp32" in data["methods"]
    head = ["method", "seeds", metric]
    head += ["minus fp32, paired", PAIRED] if with_fp32 else []
    head += ["grad cosine", "grad rel. error"]
    head += ["step vs plain"] if timing else []
    head += [f"step vs plain, width {data['timing_width']:g}"] if wide else []
    columns = sum(cell.count("|") + 1 for cell in head)
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * columns]
    compared = methods_comparisons(data)
    for method, row in data["methods"].items():
        cells = [method, ", ".join(str(seed) for seed in row["seeds"])]
        cells.append("diverged" if row["mean"] is None else _spread(row["values"], digits=digits))
        if with_fp32:
            cells.append(" | | " if method == "fp32" else paired_cells(compared[method], digits))
        cells.append("-" if row["grad_cosine"] is None else f"{row['grad_cosine']:.3f}")
        cells.append("-" if row["grad_rel_error"] is None else f"{row['grad_rel_error']:.3f}")
        if timing:
            cells.append(f"{timing[method]:.2f}x" if method in timing else "-")
        if wide:
            cells.append(f"{wide[method]:.2f}x" if method in wide else "-")
        rows.append("| " + " | ".join(cells) + " |")
    better = "lower" if digits == 3 else "higher"
    recipes = any(name.startswith("recipe+") and " - " in name for name in compared)
    meta = any(name.startswith("metagrad+") and " - " in name for name in compared)
    what = {
        (True, True): "MetaGrad and the papers' recipes minus the gradient-only preset",
        (True, False): "The papers' recipes minus the gradient-only preset",
    }.get((recipes, meta), "MetaGrad minus the preset it corrects")
    rows += [
        "",
        f"{what}, paired by seed ({better} is better):",
        "",
        f"| comparison | per seed | mean | {PAIRED} |",
        "|---|---|---|---|---|",
    ]
    for name, c in compared.items():
        if " - " in name:
            rows.append(
                f"| {name} | {_per_seed(c.differences, digits)} | {paired_cells(c, digits)} |"
            )
    return "\n".join(rows)


def headline_table(methods: dict, gpt: dict) -> str:
    """The README's table: every gradient quantizer on vgg16 and on the character GPT."""
    wide = methods.get("step_time_vs_plain_at_width", {})
    rows = [
        "| gradients | vgg16, CIFAR-10: test acc (%) | minus fp32, paired [95% CI] "
        "| char GPT: test bits/char | minus fp32, paired [95% CI] "
        f"| step time vs `plain` (vgg16, width {methods['timing_width']:g}) |",
        "|---|---|---|---|---|---|",
    ]
    compared = {"vgg16": methods_comparisons(methods), "gpt": methods_comparisons(gpt)}

    def cells(data: dict, task: str, method: str, digits: int) -> str:
        row = data["methods"].get(method)
        if row is None:
            return "- | -"
        if row["mean"] is None:
            return "diverged | -"
        if method == "fp32":
            return f"{_spread(row['values'], digits=digits)} | "
        c = compared[task][method]
        return (
            f"{_spread(row['values'], digits=digits)} "
            f"| {signed(c.mean, digits)} {interval_text(c, digits)}"
        )

    for method in methods["methods"]:
        step = f"{wide[method]:.2f}x" if method in wide else "-"
        rows.append(
            f"| {method} | {cells(methods, 'vgg16', method, 2)} "
            f"| {cells(gpt, 'gpt', method, 3)} | {step} |"
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
    """``metagrad reproduce``'s table (the one its report.md holds)."""
    from metagrad.training.reproduce import summary_table

    t = data["table"]
    return (
        f"{t['model']} at width {t['width']:g}, {t['epochs']} epochs, final test accuracy (%).\n\n"
        + summary_table(data["summary"])
    )


def comm_training_groups(data: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in data["runs"]:
        runs.setdefault(r["setting"], []).append(r)
    return runs


def comm_comparison(runs: Mapping[str, list[dict]], setting: str) -> PairedComparison:
    """A communication setting minus float32 communication, paired by seed."""

    def accs(s: str) -> dict[int, float]:
        return {r["seed"]: r["final_test_acc"] for r in runs.get(s, [])}

    return paired(accs(setting), accs("fp32"))


def comm_training_table(data: dict) -> str:
    """Final accuracy of training with each communication precision, paired by seed."""
    runs = comm_training_groups(data)
    base = {r["seed"]: r for r in runs.get("fp32", [])}
    rows = [
        "| comm | bytes per step per rank | fp32 bytes / bytes | final test acc (%) "
        f"| minus fp32 comm, paired | {PAIRED} |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for setting, rs in runs.items():
        first = rs[0]
        ratio = next(iter(base.values()))["bytes_per_step"] / first["bytes_per_step"]
        compared = " | | " if setting == "fp32" else paired_cells(comm_comparison(runs, setting))
        rows.append(
            f"| {setting} | {first['bytes_per_step']:,.0f} ({first['bytes_how']}) | {ratio:.2f} "
            f"| {_spread([r['final_test_acc'] for r in rs])} | {compared} |"
        )
    return "\n".join(rows)


def oracle_table(data: dict) -> str:
    """The oracle bound against plain training: each arm's final accuracy and gradient cosines,
    then each oracle arm minus plain, paired by seed."""
    arms: dict[str, list[dict]] = {}
    for r in data["runs"]:
        arms.setdefault(r["arm"], []).append(r)
    rows = [
        "| arm | seeds | test acc (%) | cosine to the reference: quantized | oracle |",
        "|---|---|---|---|---|",
    ]
    for arm, runs in arms.items():
        finals = [r["final_test_acc"] for r in runs if r.get("diverged_at_step") is None]
        value = _spread(finals) if finals else "diverged"
        cos = [r["cosine_to_reference"] for r in runs if "cosine_to_reference" in r]
        quantized = f"{statistics.fmean(c['quantized'] for c in cos):.3f}" if cos else "-"
        oracle = f"{statistics.fmean(c['oracle'] for c in cos):.3f}" if cos else "-"
        seeds = ", ".join(str(r["seed"]) for r in runs)
        rows.append(f"| {arm} | {seeds} | {value} | {quantized} | {oracle} |")
    rows += ["", f"| comparison | per seed | mean | {PAIRED} |", "|---|---|---|---|---|"]
    plain = {r["seed"]: r["final_test_acc"] for r in arms.get("plain", [])}
    for arm, runs in arms.items():
        if arm != "plain":
            c = paired({r["seed"]: r["final_test_acc"] for r in runs}, plain)
            rows.append(f"| {arm} - plain | {_per_seed(c.differences)} | {paired_cells(c)} |")
    return "\n".join(rows)


def _epochs(run: dict) -> str:
    """A run's test accuracy after each epoch, as ``a, b, c``."""
    return ", ".join(f"{a:.1f}" for a in run.get("test_acc_per_epoch") or [])


def biased_table(data: dict) -> str:
    """The biased-quantizer benchmark's stages: the candidates against full precision, the sweep
    against plain (one seed each), and the primary comparisons paired by seed."""
    runs = data["runs"]

    def acc(r: dict) -> str:
        return _final(r)

    rows: list[str] = []
    candidates = [r for r in runs if r["stage"] == "candidates"]
    fp32 = next((r["final_test_acc"] for r in candidates if r["setting"] == "fp32"), None)
    if candidates:
        rows += [
            "Candidates (3 epochs, seed 0): plain training with each quantizer.",
            "",
            "| gradients | test acc (%) | minus fp32 | per epoch |",
            "|---|---|---|---|",
        ]
        for r in candidates:
            gap = r["final_test_acc"] - fp32 if r["setting"] != "fp32" and fp32 else None
            chosen = " (chosen)" if r["setting"] == data.get("chosen_quantizer") else ""
            gap_text = "" if gap is None else signed(gap)
            rows.append(f"| {r['setting']}{chosen} | {acc(r)} | {gap_text} | {_epochs(r)} |")
    sweep = [r for r in runs if r["stage"] == "sweep"]
    if sweep:
        plain = next((r["final_test_acc"] for r in sweep if r["setting"] == "plain"), None)
        rows += [
            "",
            f"Sweep on `{data.get('chosen_quantizer')}` (3 epochs, seed 0; one run each, no "
            "interval):",
            "",
            "| setting | test acc (%) | minus plain | per epoch |",
            "|---|---|---|---|",
        ]
        order = ["plain", *sweep_names(), *CONTROLS]
        for r in sorted(sweep, key=lambda r: order.index(r["setting"])):
            value = r["final_test_acc"]
            gap = (
                ""
                if r["setting"] == "plain" or value is None or plain is None
                else signed(value - plain)
            )
            best = " (best)" if r["setting"] == data.get("best_setting") else ""
            rows.append(f"| {r['setting']}{best} | {acc(r)} | {gap} | {_epochs(r)} |")
    rows += _biased_comparisons(
        data, "comparisons", ("primary",), "Primary comparisons (6 epochs), paired by seed:"
    )
    rows += _biased_comparisons(
        data,
        "control_comparisons",
        ("primary", "control"),
        "Controls (6 epochs, added after the primary stage), paired by seed: MetaGrad with its "
        f"hypernetwork frozen at the identity (`{FROZEN}`), and plain training on the preset "
        f"pre-scaled by {PRESCALE:g} (`{PRESCALED}`):",
    )
    rows += _biased_diagnosis(data)
    return "\n".join(rows)


def _biased_comparisons(data: dict, key: str, stages: tuple[str, ...], title: str) -> list[str]:
    """The comparisons of ``data[key]`` over the runs of ``stages``: each side's mean, the
    per-seed differences (diverged runs marked), the paired mean, interval and p, and words."""
    comparisons = data.get(key, {})
    if not comparisons:
        return []
    rows = [
        "",
        title,
        "",
        f"| comparison | test acc (%), mean of each | per seed | mean | {PAIRED} |",
        "|---|---|---|---|---|---|",
    ]
    by = accuracies(data["runs"], stages)
    compared = {x for name in comparisons for x in name.split(" - ")}
    diverged: dict[str, set[int]] = {}
    for r in data["runs"]:
        failed = r.get("diverged_at_step") is not None
        if failed and r["stage"] in stages and r["setting"] in compared:
            diverged.setdefault(r["setting"], set()).add(r["seed"])
    for name in comparisons:
        a, b = name.split(" - ")
        c = paired(by[a], by[b])
        marks = [
            signed(d)
            + (" (diverged)" if s in diverged.get(a, set()) | diverged.get(b, set()) else "")
            for d, s in zip(c.differences, c.seeds, strict=True)
        ]
        means = " / ".join(
            f"{statistics.fmean(by[x][seed] for seed in c.seeds):.2f}" for x in (a, b)
        )
        rows.append(f"| {name} | {means} | {', '.join(marks)} | {paired_cells(c)} |")
    rows.append("")
    for name, c in comparisons.items():
        goal = f" (goal: {GOAL_4BIT})" if name.endswith(" - fp32") else ""
        rows.append(f"- `{name}`{goal}: {c['words']}.")
    if diverged:
        rows += [
            "",
            f"A run that diverged counts at chance ({CHANCE:g}%), the accuracy of a model "
            "whose weights are not finite.",
        ]
    return rows


def _biased_diagnosis(data: dict) -> list[str]:
    """The diagnose stage: per run and epoch, the cosines of the quantized and the used gradient
    with the full-precision one, and the correction's size."""
    runs = [r for r in data["runs"] if r["stage"] == "diagnose"]
    if not runs:
        return []
    rows = [
        "",
        f"Diagnosis on `{data.get('chosen_quantizer')}` and on each control preset (3 epochs, "
        "seed 0; added after the primary stage, deciding nothing): per epoch, the mean over "
        "layers of the cosine with the full-precision gradient, of the quantized gradient and "
        "of the one used (after MetaGrad's correction), and the correction's size "
        "|H(g) - g| / |g|.",
        "",
        "| run | test acc (%) | epoch | quantized cosine | used cosine | correction |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        epochs = (r.get("gradients") or {}).get("per_epoch") or [{}]
        for i, e in enumerate(epochs):
            head = f"| {r['setting']} | {_final(r)} |" if i == 0 else "| | |"
            cells = [
                f"{e[k]:.3f}" if k in e else "-"
                for k in ("quantized_cosine", "used_cosine", "correction")
            ]
            rows.append(f"{head} {i + 1} | {' | '.join(cells)} |")
    learned = [r for r in runs if r.get("learned_response")]
    if learned:
        at = learned[0]["learned_response"]["at_rms"]
        rows += [
            "",
            "What each trained hypernetwork does to one element (at weight 0): its gain H(g) / g "
            "before the norm-preserving rescale, at g in units of the layer's rms, and its "
            "output for g = 0 (in rms):",
            "",
            f"| run | {' | '.join(f'{a:+g}' for a in at)} | g = 0 |",
            "|---|" + "---|" * (len(at) + 1),
        ]
        for r in learned:
            response = r["learned_response"]
            gains = " | ".join(f"{v:.2f}" for v in response["gain"])
            rows.append(f"| {r['setting']} | {gains} | {response['output_for_zero']:+.3f} |")
    return rows
