"""The speed benchmark's tables (``benchmarks/speed.py``), one results file per machine, side by
side: whole training steps, the quantizer, memory, the layers' backward, and the ``int8``
backend's measured routes per layer. Rendered for :mod:`benchmarks.tables`."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.goals import GOAL_INT4_STEP, GOAL_INT8_STEP, GOAL_METAGRAD_STEP, GOAL_PRESET_STEP
from metagrad.stats import paired_ratio


def _where(data: dict) -> str:
    machine = data["machine"]
    return machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"


def _label(data: dict, several: bool, column: str) -> str:
    """A column's heading, with the machine's name in front when several are side by side."""
    return f"{data['machine'].get('gpu') or data['machine']['cpu']} {column}" if several else column


def _names(parts: list[dict[str, Any]]) -> list[str]:
    """Every row name of ``parts`` (dicts by name), in the order they first appear."""
    names: list[str] = []
    for part in parts:
        names += [n for n in part if n not in names]
    return names


def _steps(datas: tuple[dict, ...]) -> list[str]:
    several = len(datas) > 1
    apart = [any("compile_seconds" in r for r in d["steps"].values()) for d in datas]
    head, rule = ["training step"], ["---"]
    for data, warm in zip(datas, apart, strict=True):
        columns = ["ms", "x float32", "x bf16", "x the step it replaces"]
        columns += ["warm-up s", "compile s"] if warm else []
        head += [_label(data, several, c) if i == 0 else c for i, c in enumerate(columns)]
        rule += ["---"] * len(columns)
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for name in _names([d["steps"] for d in datas]):
        cells = [name]
        for data, warm in zip(datas, apart, strict=True):
            r = data["steps"].get(name)
            if r is None:
                cells += [""] * (6 if warm else 4)
                continue
            steps, ref = data["steps"], r.get("compared_with")
            cells += [
                f"{r['seconds'] * 1e3:.1f}",
                *(
                    ratio_text(step_ratio(steps, name, k), 3) if k != name else "1.000x"
                    for k in ("fp32", "bf16")
                ),
                f"{ratio_text(step_ratio(steps, name, ref), 3)} ({ref})" if ref else "",
            ]
            if warm:
                cells += [f"{sum(r['warmup_seconds']):.1f}", f"{r['compile_seconds']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _quantizer_and_memory(data: dict, several: bool) -> list[str]:
    where = f"{_where(data)}: " if several else ""
    rows = []
    q = data.get("quantizer")
    if q:
        share = q["share_of_int4_bf16_step"]
        rows.append(
            f"\n{where}Quantizer alone (INT4 stochastic, the {q['errors']} errors of one step, "
            f"{q['elements'] / 1e6:.1f}M elements): {q['ms']['compiled']:.1f} ms compiled, "
            f"{q['ms']['eager']:.1f} ms eager = {100 * share['compiled']:.1f}% / "
            f"{100 * share['eager']:.1f}% of the INT4 bf16 step."
        )
    m = data.get("memory")
    if m:
        plain, meta = m["tensor_memory_mb"].values()
        rows.append(
            f"\n{where}Tensor memory of a training step, MetaGrad against plain INT4 bf16: peak "
            f"{meta['peak_mb']:.0f} vs {plain['peak_mb']:.0f} MB (**{m['ratio_peak']:.2f}x**), "
            f"growth over weights {meta['growth_mb']:.0f} vs {plain['growth_mb']:.0f} MB "
            f"(**{m['ratio_growth']:.2f}x**)."
        )
        if "extra_growth_in_weights" in m:
            rows[-1] += (
                f" MetaGrad's extra growth is {m['extra_growth_in_weights']:.2f} times the size "
                f"of the weights it updates ({m['meta_weights_mb']:.1f} MB): it holds three "
                "weight-sized tensors more by design (the pending gradient, which the "
                "hypernetwork's backward reads; the proposed weights W_t; the new momentum "
                "buffer, kept apart so that a skipped step leaves the old one)."
            )
    return rows


def _blocks(data: dict, several: bool) -> list[str]:
    """One operand quantized in each block format, against a memory copy of it."""
    b = data.get("blocks")
    if not b:
        return []
    where = f"{_where(data)}: " if several else ""
    shape = " x ".join(str(n) for n in b["shape"])
    rows = [
        "",
        f"{where}One {shape} operand quantized in a block format (stochastic rounding), against "
        "a memory copy of it into a new tensor, as the quantizer writes one (the goal: compiled "
        "within 3x), and into an existing tensor (memory traffic alone):",
        "",
        "| format | blocks along | dtype | copy ms | copy into ms | eager ms | compiled ms | "
        "compiled / copy | compiled / copy into |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, d in b["dtypes"].items():
        cells: dict[tuple[str, str], dict[str, dict]] = {}
        for r in d["rows"]:
            cells.setdefault((r["format"], r["axis"]), {})[r["kernels"]] = r
        into = d.get("copy_into_ms")  # absent from runs before it was timed
        into_ms = "-" if into is None else f"{into:.1f}"
        for (fmt, axis), by in cells.items():
            c = by["compiled"]
            vs_into = "-" if into is None else f"{c['vs_copy_into']:.1f}x"
            rows.append(
                f"| {fmt} | {axis} | {dtype} | {d['copy_ms']:.1f} | {into_ms} | "
                f"{by['eager']['ms']:.1f} | {c['ms']:.1f} | **{c['vs_copy']:.1f}x** | {vs_into} |"
            )
    return rows


LAYER_COLUMNS = {
    "fp32": "fp32 ms",
    "bf16": "bf16 ms",
    "int8": "int8 ms",
    "int8 codes in bf16": "int8 codes in bf16 ms",
    "int8 measured routes": "int8 measured routes ms",
    "error cast to int8": "error cast to int8 ms",
}


def _layers(datas: tuple[dict, ...]) -> list[str]:
    several = len(datas) > 1
    layers = [d.get("layers") for d in datas]
    shown = [(d, lay) for d, lay in zip(datas, layers, strict=True) if lay]
    if not shown:
        return []
    by_name = [{r["name"]: r for r in lay["rows"]} for _, lay in shown]
    columns = [
        [k for k in LAYER_COLUMNS if any(k in r["ms"] for r in lay["rows"])] for _, lay in shown
    ]
    head, rule = ["layer backward (INT8 error)"], ["---"]
    for (data, _), keys in zip(shown, columns, strict=True):
        labels = [LAYER_COLUMNS[k] for k in keys] + ["bf16/int8", "measured routes/bf16"]
        head += [_label(data, several, c) if i == 0 else c for i, c in enumerate(labels)]
        rule += ["---"] * len(labels)
    rows = ["", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for name in _names(by_name):
        cells = [name]
        for rows_of, keys in zip(by_name, columns, strict=True):
            r = rows_of.get(name)
            if r is None:
                cells += [""] * (len(keys) + 2)
                continue
            cells += [f"{r['ms'][k]:.1f}" if k in r["ms"] else "" for k in keys]
            cells.append(f"{r['bf16/int8']:.2f}x")
            cells.append(_routed_cell(r))
        rows.append("| " + " | ".join(cells) + " |")
    for data, lay in shown:
        med = lay["conv_medians"]
        where = f" ({_where(data)})" if several else ""
        routed = med.get("bf16/int8 measured routes")
        extra = f", with measured routes {routed:.2f}x" if routed is not None else ""
        kernels = lay.get("kernels", "eager (recorded before this part compiled them)")
        rows.append(
            f"\nMedian over the 13 convolutions{where}: bf16/int8 **{med['bf16/int8']:.2f}x**"
            f"{extra}, fp32/int8 {med['fp32/int8']:.2f}x. Quantization kernels: {kernels}."
        )
        if all(FLOOR in r["ms"] for r in lay["rows"]):
            named = ", ".join(out_of_reach(lay["rows"])) or "none"
            rows.append(
                f"\nOut of reach{where}: the layers where no route can meet the per-layer goal "
                f"(at most {1 + PER_LAYER_SLACK:g}x the bf16 backward), because bf16 products "
                f"of the 8-bit codes cost at least bf16's own plus the error's cast to int8, "
                f"which alone takes more than {PER_LAYER_SLACK:.0%} of it, and the integer "
                f"route was measured slower than the goal: {named}."
            )
    return rows


def _routed_cell(row: dict[str, Any]) -> str:
    """The measured routes over bf16: with its interval and verdict against the per-layer goal
    where the run kept each round, else the ratio of medians."""
    paired = row.get("measured routes/bf16")
    if paired:
        return goal_cell(paired, 1 + PER_LAYER_SLACK)
    routed = row["ms"].get(ROUTED)
    return f"{routed / row['ms']['bf16']:.2f}x" if routed else ""


FLOOR = "error cast to int8"
ROUTED = "int8 measured routes"
"""The layers part's floor: one read of the bf16 error and one write of int8 codes."""
PER_LAYER_SLACK = 0.05
"""The per-layer goal: no layer's 8-bit backward more than 5% slower than its bf16 backward."""


def out_of_reach(rows: list[dict[str, Any]]) -> list[str]:
    """The layers no route of the ``int8`` backend can bring within the per-layer goal: the
    float route (bf16 products of the codes) is bounded below by bf16's backward plus the
    error's cast, which exceeds the slack, and the integer route (alone and as the measured
    routes ran it) measured beyond it."""
    goal = 1 + PER_LAYER_SLACK
    return [
        r["name"]
        for r in rows
        if r["ms"][FLOOR] > PER_LAYER_SLACK * r["ms"]["bf16"]
        and min(r["ms"]["int8"], r["ms"].get(ROUTED, math.inf)) > goal * r["ms"]["bf16"]
    ]


def _plan_ms(choice: dict[str, Any]) -> str:
    """The measured plans' times, fastest first: ``float 3.1 / integer 4.0 ms``."""
    seconds = choice.get("seconds", {})
    return " / ".join(f"{n} {s * 1e3:.1f}" for n, s in sorted(seconds.items(), key=lambda i: i[1]))


def route_table(data: dict) -> list[str]:
    """The ``int8`` backend's measured routes of each layer's products (the layers part), else
    those the training steps measured, by product key."""
    rows_with = [r for r in (data.get("layers") or {}).get("rows", []) if "routes" in r]
    if rows_with:
        named = [(r["name"], r["routes"]) for r in rows_with]
        label = "layer"
    else:
        named = list(((data.get("routes") or {}).get("products") or {}).items())
        label = "products"
    if not named:
        return []
    rows = [
        "",
        f"Measured routes of the `int8` backend ({_where(data)}; each plan's median ms in the "
        "route measurement, fastest first):",
        "",
        f"| {label} | dL/dx | dL/dW | measured ms |",
        "|---|---|---|---|",
    ]
    for name, choice in named:
        routes = choice["routes"]
        rows.append(
            f"| {name} | {routes.get('dx', '')} | {routes.get('dw', '')} | {_plan_ms(choice)} |"
        )
    return rows


def speed_table(*datas: dict) -> str:
    """Whole training steps against float32 and bf16, the quantizer's share, memory, layers and
    routes: one results file per machine, side by side."""
    several = len(datas) > 1
    torch_versions = sorted({d["machine"]["torch"] for d in datas})
    kept = any("step_seconds" in r for d in datas for r in d["steps"].values())
    how = (
        " Where a run kept every step, each ratio is the geometric mean of the per-step ratios "
        "(steps interleaved) with its 95% interval; else a ratio of medians."
        if kept
        else ""
    )
    rows = [
        f"Full-width VGG-16, batch 128, CIFAR-10 batches, torch {', '.join(torch_versions)}, "
        f"{'; '.join(_where(d) for d in datas)}.{how}",
        "",
        *_steps(datas),
    ]
    for data in datas:
        rows += _quantizer_and_memory(data, several)
        rows += _blocks(data, several)
    rows += _layers(datas)
    for data in datas:
        rows += route_table(data)
    return "\n".join(rows)


def _is_preset(setting: dict[str, Any]) -> bool:
    """Whether a step matrix setting is a gradient preset on the emulating backend (not bf16,
    another backend, MetaGrad or a whole recipe), from the configuration it recorded."""
    return "grad_quant" in setting and not {"backend", "method", "recipe"} & setting.keys()


def step_matrix_table(*datas: dict) -> str:
    """Every gradient route's training step per model: against bf16, against the ``plain``
    quantized step (the goal for the presets), and against the step it replaces; one results
    file after another."""
    return "\n\n".join(_step_matrix(data) for data in datas)


def _step_matrix(data: dict) -> str:
    models = [k for k, v in data.items() if isinstance(v, dict) and "steps" in v]
    kept = any("step_seconds" in r for m in models for r in data[m]["steps"].values())
    how = (
        "each ratio the geometric mean of the per-step ratios (one step of each setting in turn, "
        "on the same batch) with its 95% interval"
        if kept
        else "each ratio one of medians, with no interval"
    )
    out = [
        f"torch {data['machine']['torch']}, {_where(data)}; median of "
        f"{data['repetitions']} interleaved steps after {data['warmup']} warm-up steps; {how}."
    ]
    for name in models:
        part = data[name]
        s = part["settings"]
        steps = part["steps"]
        notes = []
        if "attention_kernel" in part:
            timed = part.get("attention_kernel_seconds", {})
            why = (
                ", the faster bf16 step: "
                + " against ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timed.items())
                if timed
                else ""
            )
            notes.append(f"attention kernel `{part['attention_kernel']}`{why}")
        if part.get("command"):
            notes.append(f"timed by `{part['command']}`")
        out += [
            "",
            f"**{name}** (width {s.get('width', 1):g}, batch {s['batch_size']}, "
            f"{s.get('optimizer', 'sgd')}{''.join('; ' + n for n in notes)}):",
            "",
            "| training step | ms | x bf16 | x `plain` | x the step it replaces | warm-up s "
            "| compile s |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for setting, row in steps.items():
            if "seconds" not in row:
                out.append(f"| {setting} | failed: {row['error']} | | | | | |")
                continue
            ratios = {k: ratio_text(r) for k, r in step_ratios(steps, setting).items()}
            replaces = row.get("compared_with")
            warm = sum(row.get("warmup_seconds", []))
            out.append(
                f"| {setting} | {row['seconds'] * 1e3:.1f} | {ratios.get('bf16', '')} "
                f"| {ratios.get('plain', '')} "
                f"| {f'{ratios[replaces]} ({replaces})' if replaces in ratios else ''} "
                f"| {warm:.1f} | {row.get('compile_seconds', 0):.1f} |"
            )
        presets = {
            k: step_ratios(steps, k)["plain"]
            for k in _presets(data, name)
            if "plain" in step_ratios(steps, k)
        }
        if presets:
            over = [
                f"{k} {ratio_text(r)}" for k, r in presets.items() if _upper(r) > GOAL_PRESET_STEP
            ]
            out.append(
                f"\nPresets that may exceed {GOAL_PRESET_STEP}x the `plain` step ({name}): "
                + (", ".join(over) if over else "none")
                + "."
            )
    return "\n".join(out)


def step_ratio(steps: dict[str, dict], name: str, against: str) -> dict[str, Any]:
    """Step ``name`` against step ``against``, ``{"ratio", "ci95"}``: paired over their timed
    steps (:func:`metagrad.stats.paired_ratio`) where the run kept them, else the ratio of the
    medians alone (files that predate ``step_seconds``)."""
    a, b = steps[name], steps[against]
    if a.get("step_seconds") and b.get("step_seconds"):
        return paired_ratio(a["step_seconds"], b["step_seconds"])
    return {"ratio": a["seconds"] / b["seconds"]}


def step_ratios(steps: dict[str, dict], setting: str) -> dict[str, dict[str, Any]]:
    """A step-matrix setting's ratios (:func:`step_ratio`) to bf16, ``plain`` and the step it
    replaces."""
    if "seconds" not in steps[setting] or setting == "bf16":
        return {}
    return {
        k: step_ratio(steps, setting, k)
        for k in ("bf16", "plain", steps[setting].get("compared_with"))
        if k and k != setting and "seconds" in steps.get(k, {})
    }


def _presets(data: dict, model: str) -> list[str]:
    settings = data["step_settings"]
    return [
        k
        for k, r in data[model]["steps"].items()
        if k != "plain" and "seconds" in r and _is_preset(settings[k])
    ]


def ratio_text(r: dict[str, Any], digits: int = 2) -> str:
    """``1.23x [1.20, 1.26]`` for a ratio ``{"ratio", "ci95"}`` (no brackets without one)."""
    ci = r.get("ci95")
    interval = f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
    return f"{r['ratio']:.{digits}f}x{interval}"


def _upper(r: dict[str, Any]) -> float:
    return r["ci95"][1] if "ci95" in r else r["ratio"]


def speed_goals_table(*datas: dict, repeats: tuple[bool, ...] = ()) -> str:
    """The step-time goals on each CPU, model and width of the step matrix: each ratio with its
    95% interval where the run has one, and whether it meets its goal. ``repeats[i]``: the
    ``i``-th run repeats the run before it; the two are shown in one row, judged together."""
    head = (
        f"| CPU | model | width | `plain` (INT4) x bf16, goal <= {GOAL_INT4_STEP:g}x "
        f"| `int8` backend x bf16, <= {GOAL_INT8_STEP:g}x "
        f"| MetaGrad x `plain`, <= {GOAL_METAGRAD_STEP:g}x "
        f"| slowest preset x `plain`, <= {GOAL_PRESET_STEP:g}x |"
    )
    rows = [
        "Each a ratio of step times from one step-matrix run (steps interleaved). Where the run "
        "kept every step, the ratio is the geometric mean of the per-step ratios with its 95% "
        "interval: *met* when the whole interval is within the goal, *missed* when it is all "
        "beyond, *undecided* otherwise. The interval covers one run's step-to-step noise, not "
        "what moves between runs, so where a run was repeated both are shown (run; repeat) and "
        "the goal is met or missed only where both runs say so. Older runs give a ratio of "
        "medians with no interval.",
        "",
        head,
        "|---|---|---:|---|---|---|---|",
    ]
    flags = list(repeats) + [False] * (len(datas) - len(repeats))
    runs: list[list[dict]] = []
    for data, repeat in zip(datas, flags, strict=True):
        if repeat and runs:
            runs[-1].append(data)
        else:
            runs.append([data])
    for group in runs:
        first = group[0]
        for name, part in first.items():
            if not (isinstance(part, dict) and "steps" in part):
                continue
            goals = [_goal_ratios(d, name) for d in group if name in d]
            cells = [_runs_cell([g[i] for g in goals], goal) for i, goal in enumerate(GOALS)]
            width = part["settings"].get("width", 1)
            rows.append(
                f"| {first['machine']['cpu']} | {name} | {width:g} | " + " | ".join(cells) + " |"
            )
    return "\n".join(rows)


GOALS = (GOAL_INT4_STEP, GOAL_INT8_STEP, GOAL_METAGRAD_STEP, GOAL_PRESET_STEP)
"""The goals of :func:`speed_goals_table`'s columns, in order."""


def _goal_ratios(data: dict, name: str) -> list:
    """The ratios the four goals judge in one run of model ``name``: ``plain`` and the ``int8``
    backend against bf16, MetaGrad against ``plain`` (each a ratio or None), and the presets
    against ``plain`` (a dict)."""
    steps, settings = data[name]["steps"], data["step_settings"]

    def ratio(against: str, pick) -> dict | None:
        found = [k for k in steps if pick(settings[k])]
        return step_ratios(steps, found[0]).get(against) if found else None

    presets = {k: step_ratios(steps, k)["plain"] for k in _presets(data, name)}
    return [
        ratio(
            "bf16",
            lambda s: s.get("grad_quant") == "plain" and "method" not in s and "backend" not in s,
        ),
        ratio("bf16", lambda s: s.get("backend") == "int8"),
        ratio("plain", lambda s: s.get("method") == "metagrad" and s.get("grad_quant") == "plain"),
        {k: r for k, r in presets.items() if r},
    ]


def _judged(r: dict[str, Any] | None, goal: float) -> tuple[str, str, str] | None:
    """A goal's ratio in one run as (preset named, figure, verdict): a ratio, or the presets'
    ratios by name (the slowest named, all judged); None where not measured."""
    if not r:
        return None
    if "ratio" in r:
        return "", _figure(r, goal), _verdict([r], goal)
    slowest = max(r, key=lambda k: r[k]["ratio"])
    return slowest, _figure(r[slowest], goal), _verdict(list(r.values()), goal)


def _runs_cell(found: list[dict[str, Any] | None], goal: float) -> str:
    """One goal's cell over a run and its repeats: each run's figure (``;`` between runs), and
    the verdict they share, ``undecided`` where they differ."""
    judged = [_judged(r, goal) for r in found]
    if any(j is None for j in judged):
        return "not measured"
    names = {name for name, _, _ in judged}
    figures = [f"{name} {figure}".strip() for name, figure, _ in judged]
    if len(names) == 1 and len(figures) > 1:  # the same preset is the slowest: named once
        figures = [figures[0]] + [figure for _, figure, _ in judged[1:]]
    verdicts = {verdict for _, _, verdict in judged}
    verdict = verdicts.pop() if len(verdicts) == 1 else "undecided (the runs differ)"
    return "; ".join(figures) + f", {verdict}"


def _verdict(rs: list[dict[str, Any]], goal: float) -> str:
    """``met`` when every ratio is within ``goal``, ``missed`` when one is beyond it, each by
    its whole 95% interval; ``undecided`` otherwise. Without intervals, by the ratios alone."""
    if not all("ci95" in r for r in rs):
        return ("met" if all(r["ratio"] <= goal for r in rs) else "missed") + " (no interval)"
    if any(r["ci95"][0] > goal for r in rs):
        return "missed"
    return "met" if all(r["ci95"][1] <= goal for r in rs) else "undecided"


def goal_cell(r: dict[str, Any] | None, goal: float) -> str:
    """``ratio [lo, hi], met`` (or ``missed``, ``undecided``, ``... (no interval)``) for a ratio
    ``{"ratio", "ci95"}`` against an upper-bound goal; ``not measured`` for None."""
    return _runs_cell([r], goal)


def _figure(r: dict[str, Any], goal: float) -> str:
    ratio = r["ratio"]
    text = f"{ratio:.2f}"
    if float(text) == goal and ratio > goal:  # a miss that two decimals would round onto the goal
        text = f"{ratio:.3f}"
    ci = r.get("ci95")
    return f"{text}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def goal_ratios(data: dict, model: str) -> dict[str, tuple[dict[str, Any], float]]:
    """A step-matrix model's ratios that the step-time goals judge, each with its goal: the
    ``plain`` and ``int8`` steps against bf16, MetaGrad's against ``plain``, each preset's
    against ``plain``."""
    steps, settings = data[model]["steps"], data["step_settings"]
    out = {}
    for name in steps:
        s, ratios = settings[name], step_ratios(steps, name)
        if name == "plain" and "bf16" in ratios:
            out["`plain` x bf16"] = (ratios["bf16"], GOAL_INT4_STEP)
        elif s.get("backend") == "int8" and "bf16" in ratios:
            out[f"{name} x bf16"] = (ratios["bf16"], GOAL_INT8_STEP)
        elif s.get("method") == "metagrad" and "plain" in ratios:
            out[f"{name} x `plain`"] = (ratios["plain"], GOAL_METAGRAD_STEP)
        elif name in _presets(data, model) and "plain" in ratios:
            out[f"{name} x `plain`"] = (ratios["plain"], GOAL_PRESET_STEP)
    return out


def step_matrix_runs_table(*datas: dict) -> str:
    """Two step-matrix runs of the same CPU and width side by side (the files come in pairs: a
    run, then its repeat), each goal ratio with both intervals and verdicts: how far one run's
    interval covers what moves between runs."""
    rows = [
        "| CPU | model | width | ratio (goal) | run 1 | run 2 | run 2's ratio within run 1's "
        "interval | same verdict |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    inside = same = total = 0
    for first, second in zip(datas[::2], datas[1::2], strict=True):
        for model in [m for m in first if isinstance(first[m], dict) and "steps" in first[m]]:
            if model not in second:
                continue
            one, two = goal_ratios(first, model), goal_ratios(second, model)
            width = first[model]["settings"].get("width", 1)
            for name, (r1, goal) in one.items():
                if name not in two:
                    continue
                r2 = two[name][0]
                v1, v2 = _verdict([r1], goal), _verdict([r2], goal)
                covered = "ci95" in r1 and r1["ci95"][0] <= r2["ratio"] <= r1["ci95"][1]
                inside, same, total = inside + covered, same + (v1 == v2), total + 1
                rows.append(
                    f"| {first['machine']['cpu']} | {model} | {width:g} | {name} ({goal:g}x) "
                    f"| {_figure(r1, goal)}, {v1} | {_figure(r2, goal)}, {v2} "
                    f"| {'yes' if covered else 'no'} | {'yes' if v1 == v2 else 'no'} |"
                )
    rows += [
        "",
        f"Of {total} ratios, the second run's lies within the first run's 95% interval in "
        f"{inside}, and the two runs give the same verdict in {same}.",
    ]
    return "\n".join(rows)


def kernel_ab_table(data: dict) -> str:
    """Each compiled kernel's training step against its eager reference (``kernel_ab``)."""
    m = data["machine"]
    lines = [
        f"torch {m['torch']}, {m['cpu']}, {m['threads']} threads; each case's two steps "
        "alternating on the same batches, medians and the paired ratio new/old.",
        "",
        "| case | model, setting | new ms | old ms | new/old | verdict |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, case in data["cases"].items():
        r, median = case["new_over_old"], case["median_seconds"]
        ci = r.get("ci95")
        verdict = (
            "faster" if ci and ci[1] < 1 else "slower" if ci and ci[0] > 1 else "no change resolved"
        )
        lines.append(
            f"| {name} | {case['model']}, `{case['setting']}` | {median['new'] * 1e3:.1f} | "
            f"{median['old'] * 1e3:.1f} | {ratio_text(r, 3)}, n = {r['n']} | {verdict} |"
        )
    runs: dict[str, list[str]] = {}
    for name, case in data["cases"].items():
        runs.setdefault(case.get("command", data["command"]), []).append(f"`{name}`")
    if len(runs) > 1:
        lines.append("")
        lines.append(
            "Cases from separate runs: "
            + "; ".join(f"{', '.join(names)} by `{cmd}`" for cmd, names in runs.items())
            + "."
        )
    return "\n".join(lines)


def step_profile_table(data: dict) -> str:
    """Where each step's operator time goes, and the least step an integer backend can reach
    (``step_profile``)."""
    m = data["machine"]
    lines = [
        f"torch {m['torch']}, {m['cpu']}, {m['threads']} threads; operator self time per step "
        "under torch.profiler, shares of its total by kind (backward pass / the rest); the last "
        "column: the share outside the backward products and convolutions, which no integer "
        f"backend replaces (the `int8` backend's goal: {GOAL_INT8_STEP:g}x bf16's step).",
        "",
        "| model | width | setting | operators ms | attention | products, backward / rest | "
        "convolutions, backward / rest | compiled kernels | other | "
        "least step for an integer backend |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        for name, p in run["profiles"].items():
            back, rest, total = p["ms"]["backward"], p["ms"]["forward and optimizer"], p["total_ms"]

            def share(kind: str, back=back, rest=rest, total=total) -> str:
                return f"{(back[kind] + rest[kind]) / total:.0%}"

            def split(kind: str, back=back, rest=rest, total=total) -> str:
                return f"{back[kind] / total:.0%} / {rest[kind] / total:.0%}"

            floor = 1 - p["backward_products_share"]
            bound = f"{floor:.2f}x" if name == "bf16" else ""
            if name == "bf16" and floor > GOAL_INT8_STEP:
                bound += " (goal out of reach)"
            lines.append(
                f"| {run['model']} | {run['width']:g} | `{name}` | {total:.1f} | "
                f"{share('attention')} | {split('products')} | {split('convolutions')} | "
                f"{share('compiled kernels')} | {share('other')} | {bound} |"
            )
    return "\n".join(lines)


def layer_overhead_table(data: dict) -> str:
    """A quantized Linear layer's step against ``nn.Linear``'s, per layer (``layer_overhead``)."""
    m = data["machine"]
    lines = [
        f"torch {m['torch']}, {m['cpu']}, {m['threads']} threads; a stack of {data['layers']} "
        f"Linear layers of {data['features']} features, one training step (bf16 autocast, "
        f"compiled kernels), {data['rounds']} rounds in turn with plain `nn.Linear` layers; "
        "times per layer (medians), the extra time per layer over `nn.Linear`'s, the ratio "
        "with its 95% interval, and the calls of compiled code per layer and step.",
        "",
        "| tokens | setting | bf16 us | quantized us | extra us | quantized / bf16 | "
        "compiled calls |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['tokens']} | `{r['setting']}` | {r['bf16_us']:.1f} | {r['us']:.1f} | "
            f"{r['extra_us']:.1f} | {ratio_text(r['x_bf16'])} | {r['compiled_calls']:g} |"
        )
    return "\n".join(lines)
