"""The speed benchmark's tables (``benchmarks/speed.py``), one results file per machine, side by
side: whole training steps, the quantizer, memory, the layers' backward, and the ``int8``
backend's measured routes per layer. Rendered for :mod:`benchmarks.tables`."""

from __future__ import annotations

from typing import Any

from benchmarks.goals import GOAL_INT4_STEP, GOAL_INT8_STEP, GOAL_METAGRAD_STEP, GOAL_PRESET_STEP


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
            ratio = f"{r['ratio']:.3f} ({r['compared_with']})" if "ratio" in r else ""
            cells += [
                f"{r['seconds'] * 1e3:.1f}",
                f"{r['x_fp32']:.3f}",
                f"{r['x_bf16']:.3f}",
                ratio,
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
        labels = [LAYER_COLUMNS[k] for k in keys] + ["bf16/int8"]
        head += [_label(data, several, c) if i == 0 else c for i, c in enumerate(labels)]
        rule += ["---"] * len(labels)
    rows = ["", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for name in _names(by_name):
        cells = [name]
        for rows_of, keys in zip(by_name, columns, strict=True):
            r = rows_of.get(name)
            if r is None:
                cells += [""] * (len(keys) + 1)
                continue
            cells += [f"{r['ms'][k]:.1f}" if k in r["ms"] else "" for k in keys]
            cells.append(f"{r['bf16/int8']:.2f}x")
        rows.append("| " + " | ".join(cells) + " |")
    for data, lay in shown:
        med = lay["conv_medians"]
        where = f" ({_where(data)})" if several else ""
        routed = med.get("bf16/int8 measured routes")
        extra = f", with measured routes {routed:.2f}x" if routed is not None else ""
        rows.append(
            f"\nMedian over the 13 convolutions{where}: bf16/int8 **{med['bf16/int8']:.2f}x**"
            f"{extra}, fp32/int8 {med['fp32/int8']:.2f}x."
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


FLOOR = "error cast to int8"
"""The layers part's floor: one read of the bf16 error and one write of int8 codes."""
PER_LAYER_SLACK = 0.05
"""The per-layer goal: no layer's 8-bit backward more than 5% slower than its bf16 backward."""


def out_of_reach(rows: list[dict[str, Any]]) -> list[str]:
    """The layers no route of the ``int8`` backend can bring within the per-layer goal: the
    float route (bf16 products of the codes) is bounded below by bf16's backward plus the
    error's cast, which exceeds the slack, and the integer route measured beyond it."""
    goal = 1 + PER_LAYER_SLACK
    return [
        r["name"]
        for r in rows
        if r["ms"][FLOOR] > PER_LAYER_SLACK * r["ms"]["bf16"]
        and r["ms"]["int8"] > goal * r["ms"]["bf16"]
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
    rows = [
        f"Full-width VGG-16, batch 128, CIFAR-10 batches, torch {', '.join(torch_versions)}, "
        f"{'; '.join(_where(d) for d in datas)}.",
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
    another backend or MetaGrad), from the configuration it recorded."""
    return "grad_quant" in setting and "backend" not in setting and "method" not in setting


def step_matrix_table(*datas: dict) -> str:
    """Every gradient route's training step per model: against bf16, against the ``plain``
    quantized step (the goal for the presets), and against the step it replaces; one results
    file after another."""
    return "\n\n".join(_step_matrix(data) for data in datas)


def _step_matrix(data: dict) -> str:
    models = [k for k, v in data.items() if isinstance(v, dict) and "steps" in v]
    out = [
        f"torch {data['machine']['torch']}, {_where(data)}; median of "
        f"{data['repetitions']} interleaved steps after {data['warmup']} warm-up steps."
    ]
    for name in models:
        part = data[name]
        s = part["settings"]
        steps = part["steps"]
        plain = steps.get("plain", {}).get("seconds")
        out += [
            "",
            f"**{name}** (width {s.get('width', 1):g}, batch {s['batch_size']}, "
            f"{s.get('optimizer', 'sgd')}):",
            "",
            "| training step | ms | x bf16 | x `plain` | x the step it replaces | warm-up s "
            "| compile s |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for setting, row in steps.items():
            if "seconds" not in row:
                out.append(f"| {setting} | failed: {row['error']} | | | | | |")
                continue
            versus = f"{row['seconds'] / plain:.2f}x" if plain and setting != "bf16" else ""
            replaces = f"{row['ratio']:.2f}x ({row['compared_with']})" if "ratio" in row else ""
            warm = sum(row.get("warmup_seconds", []))
            out.append(
                f"| {setting} | {row['seconds'] * 1e3:.1f} | {row.get('x_bf16', 0):.2f}x "
                f"| {versus} | {replaces} | {warm:.1f} | {row.get('compile_seconds', 0):.1f} |"
            )
        presets = {
            k: r["seconds"] / plain
            for k, r in steps.items()
            if plain and "seconds" in r and k != "plain" and _is_preset(data["step_settings"][k])
        }
        if presets:
            over = [f"{k} {v:.2f}x" for k, v in presets.items() if v > GOAL_PRESET_STEP]
            out.append(
                f"\nPresets over {GOAL_PRESET_STEP}x the `plain` step ({name}): "
                + (", ".join(over) if over else "none")
                + "."
            )
    return "\n".join(out)


def speed_goals_table(*datas: dict) -> str:
    """The step-time goals on each CPU, model and width of the step matrix: each ratio of
    median step times, and whether it meets its goal."""
    head = (
        f"| CPU | model | width | `plain` (INT4) x bf16, goal <= {GOAL_INT4_STEP:g}x "
        f"| `int8` backend x bf16, <= {GOAL_INT8_STEP:g}x "
        f"| MetaGrad x `plain`, <= {GOAL_METAGRAD_STEP:g}x "
        f"| slowest preset x `plain`, <= {GOAL_PRESET_STEP:g}x |"
    )
    rows = [
        "Each a ratio of median step times from one step-matrix run (steps interleaved; "
        "on a shared machine a rerun moves them by a few percent), and whether it meets its goal.",
        "",
        head,
        "|---|---|---:|---|---|---|---|",
    ]
    for data in datas:
        for name, part in data.items():
            if not (isinstance(part, dict) and "steps" in part):
                continue
            steps = {k: r["seconds"] for k, r in part["steps"].items() if "seconds" in r}
            settings = data["step_settings"]
            bf16, plain = steps.get("bf16"), steps.get("plain")
            presets = {k: t for k, t in steps.items() if k != "plain" and _is_preset(settings[k])}
            metagrad = [
                t
                for k, t in steps.items()
                if settings[k].get("method") == "metagrad"
                and settings[k].get("grad_quant") == "plain"
            ]
            int8 = [t for k, t in steps.items() if settings[k].get("backend") == "int8"]
            slowest = max(presets, key=presets.get) if presets else None
            cells = [
                _goal_cell(plain, bf16, GOAL_INT4_STEP),
                _goal_cell(int8[0] if int8 else None, bf16, GOAL_INT8_STEP),
                _goal_cell(metagrad[0] if metagrad else None, plain, GOAL_METAGRAD_STEP),
                _goal_cell(presets.get(slowest), plain, GOAL_PRESET_STEP, slowest),
            ]
            width = part["settings"].get("width", 1)
            rows.append(
                f"| {data['machine']['cpu']} | {name} | {width:g} | " + " | ".join(cells) + " |"
            )
    return "\n".join(rows)


def _goal_cell(seconds: float | None, base: float | None, goal: float, what: str = "") -> str:
    if not seconds or not base:
        return "not measured"
    ratio = seconds / base
    text = f"{ratio:.2f}"
    if float(text) == goal and ratio > goal:  # a miss that two decimals would round onto the goal
        text = f"{ratio:.3f}"
    words = "met" if ratio <= goal else "missed"
    return f"{what + ' ' if what else ''}{text}x, {words}"
