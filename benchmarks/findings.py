"""The findings' sentences, generated from the committed result files for :mod:`benchmarks.tables`.

Every number a finding quotes is computed here, so that the words and the files cannot disagree.
Comparisons are paired by seed (:mod:`metagrad.stats`): mean difference, t-based 95% confidence
interval, exact sign-flip p, and the words of :func:`metagrad.stats.verdict`: a goal is *met*
only when its whole interval lies inside the goal, and a difference is *detected* only when its
interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Iterable

from benchmarks.goals import GOAL_4BIT, GOAL_METAGRAD_INT4, GOAL_METAGRAD_STEP, GOAL_SEEDS
from benchmarks.tables_speed import goal_cell, step_ratio
from benchmarks.tables_training import (
    by_seed,
    comm_comparison,
    comm_training_groups,
    horizon_comparison,
    horizon_groups,
    metagrad_pairs,
    methods_comparisons,
    metric_of,
)
from metagrad.stats import (
    PairedComparison,
    differences,
    interval_text,
    outcome,
    p_text,
    paired,
    signed,
    summary,
    t_quantile,
)


def _met(holds: bool) -> str:
    return "met" if holds else "not met"


def _code(name: str) -> str:
    return f"`{name}`"


def _join(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _ci(c: PairedComparison, digits: int = 2) -> str:
    """``mean [low, high]`` (the mean alone without an interval)."""
    if c.ci is None:
        return signed(c.mean, digits)
    return f"{signed(c.mean, digits)} {interval_text(c, digits)}"


def _best_4bit(data: dict) -> str:
    """The 4-bit preset with the best mean (every preset but FP8 E5M2 is 4-bit)."""
    return next(m for m in _presets(data) if m != "fp8-e5m2")


def _presets(data: dict) -> list[str]:
    """The presets of a methods file, best mean first."""
    _, digits = metric_of(data)
    rows = {
        m: r["mean"]
        for m, r in data["methods"].items()
        if m != "fp32" and not m.startswith(("metagrad+", "recipe+")) and r["mean"] is not None
    }
    return sorted(rows, key=rows.get, reverse=digits == 2)


def _by_outcome(compared: dict[str, PairedComparison], names: list[str], digits: int) -> str:
    """``names`` grouped by what their interval says, each with its mean and interval."""
    groups: dict[str, list[str]] = {}
    for m in names:
        groups.setdefault(outcome(compared[m]), []).append(f"{_code(m)} {_ci(compared[m], digits)}")
    return "; ".join(f"{words}: {_join(items)}" for words, items in groups.items())


def _widths(cs: Iterable[PairedComparison]) -> str:
    widths = [c.ci[1] - c.ci[0] for c in cs if c.ci is not None]
    return (
        f"{min(widths):.2f}"
        if min(widths) == max(widths)
        else (f"{min(widths):.2f}-{max(widths):.2f}")
    )


def _metagrad_rows(compared: dict[str, PairedComparison]) -> dict[str, PairedComparison]:
    """MetaGrad minus the preset it corrects."""
    return {n: c for n, c in compared.items() if " - " in n and n.startswith("metagrad+")}


def recipe_rows(compared: dict[str, PairedComparison]) -> dict[str, PairedComparison]:
    """Each paper's whole recipe minus its gradient-only preset."""
    return {n: c for n, c in compared.items() if " - " in n and n.startswith("recipe+")}


def headline_findings(methods: dict, gpt: dict) -> str:
    """The README's summary of the methods tables."""
    vgg, lm = methods_comparisons(methods), methods_comparisons(gpt)
    best = _best_4bit(methods)
    c = vgg[best]
    meta = [*_metagrad_rows(vgg).values(), *_metagrad_rows(lm).values()]
    words = {outcome(m) for m in meta}
    wide = methods["step_time_vs_plain_at_width"]
    rht = sorted(wide[m] for m in ("rht-mxfp4", "rht-nvfp4"))
    return (
        "Differences are paired by seed, with their t-based 95% confidence interval "
        "([`metagrad.stats`](src/metagrad/stats.py); with 3 seeds the exact sign-flip p cannot "
        f"fall below 0.25). The best 4-bit preset on CIFAR-10, {_code(best)}, is "
        f"{_ci(c)} points from full precision: the goal of at most 0.3 points is "
        f"{outcome(c, GOAL_4BIT)}. MetaGrad minus the preset it corrects, 2 presets on 2 tasks: "
        f"{_join(sorted(words))}, with intervals {_widths(_metagrad_rows(vgg).values())} points "
        f"wide on CIFAR-10 ({_widths(_metagrad_rows(lm).values())} bits per character on the "
        "GPT): a gain of a point on CIFAR-10 is not excluded, and neither is a loss. The "
        f"Hadamard-transformed FP4 formats cost {rht[0]:.2f}-{rht[1]:.2f}x the `plain` step at "
        f"width {methods['timing_width']:g} (their block formats are emulated)."
    )


def methods_findings(data: dict) -> str:
    """What the vgg16 methods table supports."""
    compared = methods_comparisons(data)
    values = by_seed(data)
    fp32 = data["methods"]["fp32"]
    presets = _presets(data)
    best = _best_4bit(data)
    c = compared[best]
    goal_seeds = paired({s: values[best][s] for s in GOAL_SEEDS}, values["fp32"])
    signs = {v < 0 for v in c.differences}
    every = ""
    if signs == {True}:
        every = (
            f" All {c.n} seeds' differences are negative ({', '.join(map(signed, c.differences))}),"
            f" which with {c.n} seeds a sign-flip test cannot confirm (p {p_text(c)})."
        )
    meta = _metagrad_rows(compared)
    timing, wide = data["step_time_vs_plain"], data["step_time_vs_plain_at_width"]
    cheap = [m for m in presets if timing[m] <= 1.3 and m != "plain"]
    dear = [m for m in presets if timing[m] > 1.3]
    lines = [
        f"- Full precision: {fp32['mean']:.2f} ± {fp32['std']:.2f}% (seeds "
        f"{', '.join(map(str, fp32['seeds']))}). Below, differences are paired by seed: mean, "
        "t-based 95% confidence interval (which assumes normal differences) and exact sign-flip "
        f"p (at least {2 / 2**c.n:.2g} with {c.n} seeds, whatever the data).",
        f"- Best 4-bit preset by mean, {_code(best)}: minus full precision, paired, "
        f"{summary(c, GOAL_4BIT)} against the goal of at most 0.3 points. On the goal's seeds "
        f"{_join([str(s) for s in GOAL_SEEDS])} alone: {summary(goal_seeds, GOAL_4BIT)}.{every}",
        f"- Every preset minus full precision: {_by_outcome(compared, presets, 2)}.",
        "- MetaGrad minus the preset it corrects: "
        + "; ".join(f"{_code(name)} {summary(c)}" for name, c in meta.items())
        + f". The intervals are {_widths(meta.values())} points wide: a gain of a point is not "
        "excluded, and neither is a loss.",
        "- Step time against the `plain` preset (one interleaved measurement, no interval), "
        f"width {data['settings']['width']:g}: "
        + ", ".join(f"{_code(m)} {timing[m]:.2f}x" for m in cheap)
        + " (goal 1.3x: met); "
        + ", ".join(f"{_code(m)} {timing[m]:.2f}x" for m in dear)
        + f" (not met). At width {data['timing_width']:g}: "
        + ", ".join(f"{_code(m)} {wide[m]:.2f}x" for m in dear)
        + ".",
    ]
    return "\n".join(lines)


def _ranks(data: dict) -> dict[str, int]:
    return {m: i + 1 for i, m in enumerate(_presets(data))}


def methods_gpt_findings(methods: dict, gpt: dict) -> str:
    """The GPT's methods table, and whether its order is the vgg16 one."""
    vgg, lm = _ranks(methods), _ranks(gpt)
    moved = [f"{_code(m)} {vgg[m]} -> {lm[m]}" for m in vgg if vgg[m] != lm.get(m)]
    same = "the same" if not moved else "not the same (rank on CIFAR-10 -> on the GPT: "
    order = same + ("" if not moved else ", ".join(moved) + ")")
    compared = methods_comparisons(gpt)
    meta = _metagrad_rows(compared)

    def against_base(data: dict) -> str:
        rows, higher = data["methods"], metric_of(data)[1] == 2
        return _join(
            f"{_code(m)} {'better' if (a > b) == higher else 'worse'}"
            for m in rows
            if m.startswith("metagrad+")
            for a, b in [(rows[m]["mean"], rows[m.removeprefix("metagrad+")]["mean"])]
        )

    lines = [
        "- Presets by mean, best first: CIFAR-10 "
        + ", ".join(map(_code, _presets(methods)))
        + "; the GPT "
        + ", ".join(map(_code, _presets(gpt)))
        + f": {order}. MetaGrad's mean against its preset's: on CIFAR-10 "
        f"{against_base(methods)}, on the GPT {against_base(gpt)}.",
        "- Every preset minus full precision, bits per character (lower is better): "
        f"{_by_outcome(compared, _presets(gpt), 3)}.",
        "- MetaGrad minus the preset it corrects: "
        + "; ".join(f"{_code(name)} {summary(c, digits=3)}" for name, c in meta.items())
        + ".",
    ]
    return "\n".join(lines)


def metagrad_findings(cifar: dict, speed: dict) -> str:
    """The MetaGrad benchmark against its goals, with the cost from the speed benchmark."""
    pairs = metagrad_pairs(cifar)
    int4 = {q: r for q, r in pairs.items() if q.startswith("INT4 stochastic")}
    to_fp32 = {q: paired(r["metagrad"], r["fp32"]) for q, r in int4.items()}
    best = max(to_fp32, key=lambda q: to_fp32[q].mean)
    vs_plain = {q: paired(r.get("metagrad", {}), r.get("plain", {})) for q, r in pairs.items()}
    steps, memory = speed["steps"], speed["memory"]
    bf16 = step_ratio(steps, "metagrad int4-stochastic bf16", "int4-stochastic bf16")
    fp32 = step_ratio(steps, "metagrad int4-stochastic fp32", "int4-stochastic fp32")
    peak, growth = memory["ratio_peak"], memory["ratio_growth"]
    lines = [
        f"- Best INT4 MetaGrad setting ({best}) minus full precision, paired: "
        f"{summary(to_fp32[best], GOAL_METAGRAD_INT4)} against the goal of at most 0.5 points.",
        "- MetaGrad minus plain, paired: "
        + "; ".join(f"{q} {summary(c)}" for q, c in vs_plain.items())
        + f". With two seeds a 95% t interval reaches {t_quantile(0.975, 1):.1f} standard errors "
        "to each side: these runs can show neither a gain nor a loss of several points.",
        f"- Cost, full-width VGG-16 on the {speed['machine']['cpu']} "
        "([speed](#speed-against-what-users-run); one run, steps interleaved, the ratio's 95% "
        "interval over its steps): a step against the plain INT4 step, goal at most "
        f"{GOAL_METAGRAD_STEP:g}x: {goal_cell(bf16, GOAL_METAGRAD_STEP)} under bf16, "
        f"{goal_cell(fp32, GOAL_METAGRAD_STEP)} in float32; tensor "
        f"memory peak {peak:.3f}x (goal 1.5x: {_met(peak <= 1.5)}), growth over the weights "
        f"{growth:.2f}x ({_met(growth <= 1.5)} by that measure).",
    ]
    return "\n".join(lines)


def reproduce_findings(data: dict) -> str:
    """The biased-rounding row of the reproduce table, final against best epochs."""
    runs = [r for r in data["runs"] if r["setting"] == "int4-nearest-sample"]

    def accs(method: str, key: str) -> str:
        chosen = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        return " / ".join(f"{r[key]:.2f}" for r in chosen)

    c = differences(data["summary"]["int4-nearest-sample"]["metagrad_minus_plain"])
    return (
        f"INT4 nearest per sample, MetaGrad minus plain: {summary(c)}. Both stay near chance "
        f"(10%): final accuracy plain {accs('plain', 'final_test_acc')}, MetaGrad "
        f"{accs('metagrad', 'final_test_acc')} (seeds 0 / 1); their best epochs, plain "
        f"{accs('plain', 'best_test_acc')}, MetaGrad {accs('metagrad', 'best_test_acc')}: the "
        "final epochs swing around chance, and plain's best epochs are above MetaGrad's."
    )


def horizon_findings(horizon: dict, ablations: dict) -> str:
    """The horizon runs against plain, and the gain form's single runs against each other."""
    groups = horizon_groups(horizon)
    lines = []
    for gradients in ("int4-stochastic-tensor", "int8-nearest-tensor"):
        ks = [v for g, v in groups if g == gradients and v.startswith("metagrad-k")]
        compared = {k: horizon_comparison(groups, gradients, k) for k in ks}
        lines.append(
            f"- {gradients}, MetaGrad minus plain, paired: "
            + "; ".join(f"K = {k[-1]} {_ci(c)}, p {p_text(c)}" for k, c in compared.items())
            + f": {_join(sorted({outcome(c) for c in compared.values()}))} for every K."
        )
    gain = {
        v: runs[0]
        for (g, v), runs in groups.items()
        if v.startswith("gain-lr1e-3") and len(runs) == 1
    }
    k1, k4 = gain["gain-lr1e-3-k1"], gain["gain-lr1e-3-k4"]
    again = next(r for r in ablations["runs"] if r["run"] == "metagrad-gain-lr1e-3")

    def at(r: dict, rms: float) -> float:
        response = r["learned_response"]
        return response["gain"][response["at_rms"].index(rms)]

    def cos(r: dict) -> str:
        last = r["gradients"]["per_epoch"][-1]
        return f"{last['used_cosine']:.3f} against {last['quantized_cosine']:.3f} quantized"

    lines.append(
        "- The gain form at hypernetwork lr 1e-3, one seed each: at K = 1 an element at 8 rms "
        f"keeps {at(k1, 8.0):.2f} of its value and one at 0.5 rms {at(k1, 0.5):.2f} (used "
        f"gradient's cosine {cos(k1)}), accuracy {k1['final_test_acc']:.2f}%; at K = 4 "
        f"{at(k4, 8.0):.2f} and {at(k4, 0.5):.2f} (cosine {cos(k4)}), accuracy "
        f"{k4['final_test_acc']:.2f}%. The ablations' run of the K = 1 setting (earlier code) "
        f"reached {again['final_test_acc']:.2f}%: two runs of one setting differ by "
        f"{abs(again['final_test_acc'] - k1['final_test_acc']):.2f} points, K = 1 and K = 4 by "
        f"{abs(k4['final_test_acc'] - k1['final_test_acc']):.2f}."
    )
    return "\n".join(lines)


def meta_gradient_findings(data: dict) -> str:
    """The meta-gradient tests with the parameters' correlation kept, against the original."""
    phases = {
        (n, ph): r
        for n, p in data["meta_gradients"].items()
        for ph, r in p.items()
        if "sign_flip_null" in r
    }
    if not phases:
        return "No sign-flip null yet: `python -m benchmarks.metagrad_signal --reanalyse`."

    def cell(key: tuple[str, str]) -> str:
        r = phases[key]
        f = r["sign_flip_null"]
        return (
            f"{key[0]} {key[1]}: median |t| {r['median_abs_t']:.2f} (p {f['p_median_abs_t']:.2g}), "
            f"{r['count_abs_t_above_2']} of {r['parameters_tested']} above 2 "
            f"(p {f['p_count_abs_t_above_2']:.2g}; binomial p for independent parameters "
            f"{r['noise_reference']['binomial_p_count_at_least_observed']:.2g})"
        )

    r_abs = [r["correlation"]["median_abs_r"] for r in phases.values()]
    eff = [r["correlation"]["effective_parameters"] for r in phases.values()]
    tested = [r["parameters_tested"] for r in phases.values()]
    lines = [
        "- Against sign flips of the batch means (p of the median |t| and of the count above 2):",
        *(f"  - {cell(k)};" for k in phases),
        f"- The parameters' meta-gradients are correlated: median |r| between two parameters "
        f"{min(r_abs):.2f}-{max(r_abs):.2f}, {min(eff):.1f}-{max(eff):.1f} effective "
        f"parameters out of {min(tested)}-{max(tested)}, so the binomial p, which counts them "
        "as independent, overstates the evidence.",
    ]
    return "\n".join(lines)


def comm_training_findings(data: dict) -> str:
    """Training with each communication precision against float32 communication."""
    runs = comm_training_groups(data)
    compared = {s: comm_comparison(runs, s) for s in runs if s != "fp32"}
    return (
        "Minus float32 communication, paired by seed: "
        + "; ".join(f"{s} {summary(c)}" for s, c in compared.items())
        + "."
    )


def recipes_findings(vgg: dict, gpt: dict) -> str:
    """Each paper's whole recipe against its gradient-only preset, on both tasks."""
    lines = []
    for task, data, digits, unit in (
        ("vgg16, CIFAR-10, 3 epochs (test accuracy, points; higher is better)", vgg, 2, ""),
        ("the character GPT, 3 epochs (bits per character; lower is better)", gpt, 3, ""),
    ):
        rows = recipe_rows(methods_comparisons(data))
        n = sorted({c.n for c in rows.values()})
        seeds = f"{_join([str(k) for k in n])} seed{'s' if n != [1] else ''}"
        lines.append(
            f"- {task}, recipe minus gradient-only preset, paired over {seeds}{unit}: "
            f"{_by_outcome(rows, list(rows), digits)}."
        )
    return "\n".join(lines)


def oracle_findings(data: dict) -> str:
    """What the oracle bound says, from its runs."""
    arms: dict[str, dict[int, float | None]] = {}
    cosines: dict[str, list[dict]] = {}
    for r in data["runs"]:
        arms.setdefault(r["arm"], {})[r["seed"]] = r["final_test_acc"]
        if "cosine_to_reference" in r:
            cosines.setdefault(r["arm"], []).append(r["cosine_to_reference"])
    lines = []
    for arm in ("oracle", "oracle-ls"):
        if arm not in arms or "plain" not in arms:
            continue
        c = paired(arms[arm], arms["plain"])
        cos = cosines.get(arm, [])
        before = sum(x["quantized"] for x in cos) / len(cos)
        after = sum(x["oracle"] for x in cos) / len(cos)
        scale = "at its own scale"
        if arm == "oracle":
            scale = "rescaled to the quantized gradient's norm"
        lines.append(
            f"- `{arm}` ({scale}): its fit raises the cosine to the reference gradient from "
            f"{before:.3f} (the quantized gradient) to {after:.3f}, averaged over the steps; "
            f"final accuracy minus plain's, paired by seed: {summary(c)}."
        )
    return "\n".join(lines)
