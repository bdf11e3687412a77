"""The speed benchmark's machinery: warm-up timed apart, results named per machine, and the
tables of several machines side by side. No test depends on a timing."""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import runner, speed, step_matrix, tables
from benchmarks.tables_speed import (
    goal_cell,
    kernel_ab_table,
    layer_overhead_table,
    out_of_reach,
    speed_goals_table,
    speed_table,
    step_matrix_runs_table,
    step_matrix_table,
    step_profile_table,
)
from metagrad import kernels
from metagrad.meta.fused import FusedMLP
from metagrad.stats import paired_ratio

ROOT = Path(__file__).resolve().parents[1]


def test_warmup_goes_on_while_a_step_compiles(monkeypatch):
    """Setting ``a`` compiles in its first three steps: it takes three warm-up steps more than
    asked, and no compilation falls into its timed steps; ``b`` takes the one asked for."""
    events = [0]
    compiling = {"a": 3, "b": 0}
    calls = {"a": 0, "b": 0}

    def training_step(settings, data):
        name = settings["name"]

        def step(x, y):
            calls[name] += 1
            if calls[name] <= compiling[name]:
                events[0] += 1

        return step

    batch = (torch.zeros(1), torch.zeros(1))
    monkeypatch.setattr(runner, "training_step", training_step)
    monkeypatch.setattr(runner, "compile_events", lambda: events[0])
    monkeypatch.setattr(runner, "step_batches", lambda data, base, count: [batch] * count)
    settings = {"a": {"name": "a"}, "b": {"name": "b"}}
    timed = runner.time_steps_apart(settings, None, {}, steps=3, warmup=1)
    assert len(timed["a"].warmup_seconds) == 4 and len(timed["b"].warmup_seconds) == 1
    assert calls == {"a": 7, "b": 4}
    assert all(t.compiled_while_timed == 0 and t.compile_seconds >= 0 for t in timed.values())
    row = timed["a"].to_dict()
    assert set(row) == {
        "seconds",
        "warmup_seconds",
        "compile_seconds",
        "compiled_while_timed",
        "step_seconds",
    }
    assert len(row["step_seconds"]) == 3
    medians = runner.time_steps(settings, None, {}, steps=3, warmup=1)
    assert set(medians) == {"a", "b"}


def test_compile_events_count_a_compilation():
    before = runner.compile_events()
    torch.compile(lambda t: t * 2 + 1)(torch.randn(3))
    assert runner.compile_events() > before


def test_results_are_named_per_cpu_model(monkeypatch):
    assert speed.machine_slug("AMD EPYC") == "amd-epyc"
    assert (
        speed.machine_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")
        == "intel-xeon-platinum-8481c-cpu-2-70ghz"
    )
    monkeypatch.setattr(speed, "cpu_model", lambda: "AMD EPYC")
    assert speed.default_out(torch.device("cpu")).name == "speed-cpu-amd-epyc.json"
    assert speed.default_out(torch.device("cuda")).name == "speed-cuda.json"
    assert "speed-cpu-amd-epyc.json" in tables.SPEED_CPU


def test_several_machines_side_by_side_with_their_routes():
    amd = json.loads((tables.RESULTS / "speed-cpu-amd-epyc.json").read_text())
    # a machine without measured routes beside one with them
    for setting in [k for k in amd["steps"] if "measured routes" in k]:
        del amd["steps"][setting]
    amd.pop("routes", None)
    for row in amd["layers"]["rows"]:
        row["ms"].pop("int8 measured routes", None)
        row.pop("routes", None)
    amd["layers"]["conv_medians"].pop("bf16/int8 measured routes", None)
    xeon = copy.deepcopy(amd)
    xeon["machine"]["cpu"] = "Intel Xeon"
    for row in xeon["steps"].values():
        row.update(warmup_seconds=[2.0, 1.5], compile_seconds=1.25, compiled_while_timed=0)
    xeon["steps"]["int8 backend bf16, measured routes"] = {
        **xeon["steps"]["int8 backend bf16"],
        "seconds": 0.25,
    }
    for row in xeon["layers"]["rows"]:
        row["ms"]["int8 measured routes"] = 1.0
        row["routes"] = {
            "routes": {"dx": "float", "dw": "integer"},
            "seconds": {"integer": 0.004, "float": 0.002},
            "source": "measured",
        }
    xeon["layers"]["conv_medians"]["bf16/int8 measured routes"] = 1.5
    text = speed_table(amd, xeon)
    assert "| training step | AMD EPYC ms |" in text and "| Intel Xeon ms |" in text
    assert "| warm-up s | compile s |" in text and "| 3.5 | 1.2 |" in text
    assert "| int8 backend bf16, measured routes |" + "  |" * 4 in text  # absent on the first
    assert "Intel Xeon int8 measured routes ms" not in text  # one label per machine
    assert "with measured routes 1.50x" in text
    assert "| vgg16.conv1 | float | integer | float 2.0 / integer 4.0 |" in text
    single = speed_table(amd)
    assert "| training step | ms | x float32 | x bf16 | x the step it replaces |" in single
    assert "Measured routes" not in single
    # each ratio paired over the steps where a run kept them, a ratio of medians where not
    name, against = "metagrad int4-stochastic bf16", "int4-stochastic bf16"
    meta, plain = (amd["steps"][k] for k in (name, against))
    r = paired_ratio(meta["step_seconds"], plain["step_seconds"])
    for row in xeon["steps"].values():
        row.pop("step_seconds")
    text = speed_table(amd, xeon)
    assert f"| {r['ratio']:.3f}x [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({against}) |" in text
    assert f"| {meta['seconds'] / plain['seconds']:.3f}x ({against}) |" in text
    assert "| fp32 | " in text and "| 1.000x | " in text  # the reference itself
    assert "with its 95% interval" in text


def test_block_formats_are_timed_beside_a_copy_and_tabled(monkeypatch):
    monkeypatch.setattr(speed, "BLOCK_OPERAND", (64, 96))
    # one format without a transform and one with (each compiles its own kernels)
    formats = {k: speed.BLOCK_FORMATS[k] for k in ("mxfp4", "rht16 nvfp4")}
    monkeypatch.setattr(speed, "BLOCK_FORMATS", formats)
    blocks = speed.bench_blocks(torch.device("cpu"), reps=1, warmup=0)
    for dtype in ("float32", "bfloat16"):
        rows = blocks["dtypes"][dtype]["rows"]
        assert len(rows) == len(formats) * len(speed.BLOCK_AXES) * 2
        assert all(r["ms"] > 0 and r["vs_copy"] > 0 and r["vs_copy_into"] > 0 for r in rows)
        assert blocks["dtypes"][dtype]["copy_into_ms"] > 0
    amd = json.loads((tables.RESULTS / "speed-cpu-amd-epyc.json").read_text())
    text = speed_table({**amd, "blocks": blocks})
    assert "One 64 x 96 operand quantized in a block format" in text
    assert "| rht16 nvfp4 | columns | bfloat16 |" in text
    without = {k: v for k, v in blocks["dtypes"]["float32"].items() if k != "copy_into_ms"}
    earlier = speed_table({**amd, "blocks": {**blocks, "dtypes": {"float32": without}}})
    assert "| - |" in earlier  # runs from before the copy into a tensor was timed


def test_the_quantizer_part_times_every_error_a_step_quantizes(monkeypatch):
    """The errors are found by the dither draw each one makes first (``spec_dither_key``)."""
    from benchmarks.runner import synthetic_data

    monkeypatch.setattr(speed, "BASE", {**speed.BASE, "width": 0.0625, "batch_size": 2})
    shapes = speed.error_shapes(synthetic_data(4), torch.device("cpu"))
    assert len(shapes) == 14  # VGG-16's 13 convolutions and its classifier
    assert {s[3] for s in shapes} == {1, -1} and all(len(s[0]) in (2, 4) for s in shapes)
    monkeypatch.setattr(speed, "error_shapes", lambda data, device: shapes[:2])
    result = speed.bench_quantizer(None, torch.device("cpu"), reps=1, warmup=0, step_seconds=1.0)
    assert result["errors"] == 2 and set(result["ms"]) == {"eager", "compiled"}
    assert all(v > 0 for v in result["share_of_int4_bf16_step"].values())


def test_each_part_records_the_command_that_wrote_it(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "bench_memory", lambda device: {"ratio_growth": 1.0})
    monkeypatch.setattr(speed, "bench_blocks", lambda device, reps, warmup: {"rows": []})
    out = tmp_path / "speed.json"
    for part in ("memory", "blocks"):
        monkeypatch.setattr(sys, "argv", ["speed.py", "--parts", part])
        speed.main(["--parts", part, "--out", str(out), "--data", str(tmp_path / "absent")])
    written = json.loads(out.read_text())
    assert set(written["part_commands"]) == {"memory", "blocks"}
    assert "--parts memory" in written["part_commands"]["memory"]
    assert "--parts blocks" in written["part_commands"]["blocks"]
    assert written["memory"] == {"ratio_growth": 1.0}  # kept when the next part ran


def test_a_failing_setting_is_recorded_and_the_others_timed(monkeypatch):
    """With ``errors`` given, a setting that cannot be built or whose step raises is left out
    with its error; without it the error propagates."""

    def training_step(settings, data):
        if settings["name"] == "unbuilt":
            raise ValueError("no such preset")

        def step(x, y):
            if settings["name"] == "fails":
                raise RuntimeError("step failed\nsecond line")

        return step

    batch = (torch.zeros(1), torch.zeros(1))
    monkeypatch.setattr(runner, "training_step", training_step)
    monkeypatch.setattr(runner, "step_batches", lambda data, base, count: [batch] * count)
    settings = {n: {"name": n} for n in ("ok", "unbuilt", "fails")}
    errors: dict[str, str] = {}
    timed = runner.time_steps_apart(settings, None, {}, steps=2, warmup=1, errors=errors)
    assert set(timed) == {"ok"}
    assert errors == {
        "unbuilt": "ValueError: no such preset",
        "fails": "RuntimeError: step failed",
    }
    with pytest.raises(ValueError, match="no such preset"):
        runner.time_steps_apart(settings, None, {}, steps=2, warmup=1)


def test_step_matrix_files_are_named_per_cpu_and_width(monkeypatch):
    monkeypatch.setattr(step_matrix, "cpu_model", lambda: "AMD EPYC")
    cpu = torch.device("cpu")
    assert step_matrix.default_out(cpu, None).name == "step-matrix-cpu-amd-epyc.json"
    assert step_matrix.default_out(cpu, 0.25).name == "step-matrix-cpu-amd-epyc-w0.25.json"
    assert step_matrix.default_out(torch.device("cuda"), None).name == "step-matrix-cuda.json"


def _row(ms: float, **extra) -> dict:
    return {"seconds": ms / 1e3, "warmup_seconds": [1.0, 0.5], "compile_seconds": 0.9, **extra}


def _step_matrix_data() -> dict:
    return {
        "machine": {"torch": "2.13.0", "cpu": "Some CPU", "threads": 2},
        "repetitions": 7,
        "warmup": 3,
        "step_settings": {
            "bf16": {"amp": "bf16"},
            **{p: {"grad_quant": p} for p in ("plain", "psq", "bhq")},
            "int8 backend": {"grad_bits": 8, "backend": "int8"},
            "metagrad plain": {"grad_quant": "plain", "method": "metagrad"},
        },
        "vgg16": {
            "settings": {"width": 1.0, "batch_size": 128},
            "steps": {
                "bf16": _row(100, x_bf16=1.0),
                "plain": _row(110, x_bf16=1.1),
                "psq": _row(140, x_bf16=1.4),
                "int8 backend": _row(80, x_bf16=0.8),
                "metagrad plain": _row(150, x_bf16=1.5, compared_with="plain", ratio=1.364),
                "bhq": {"error": "RuntimeError: out of memory"},
            },
        },
    }


def test_step_matrix_table_names_the_presets_over_the_goal():
    data = _step_matrix_data()
    text = step_matrix_table(data)
    assert "**vgg16** (width 1, batch 128, sgd):" in text
    assert "| psq | 140.0 | 1.40x | 1.27x |  | 1.5 | 0.9 |" in text
    assert "| metagrad plain | 150.0 | 1.50x | 1.36x | 1.36x (plain) | 1.5 | 0.9 |" in text
    assert "| bhq | failed: RuntimeError: out of memory |" in text
    assert "Presets that may exceed 1.3x the `plain` step (vgg16): none." in text  # 1.27x
    assert "each ratio one of medians, with no interval" in text
    data["vgg16"]["steps"]["psq"] = _row(150, x_bf16=1.5)
    assert "(vgg16): psq 1.36x." in step_matrix_table(data)


def _timed(base: list[float], ratios: list[float]) -> dict:
    """A step-matrix row whose steps are ``base``'s times these ratios, one per round."""
    steps = [b * r for b, r in zip(base, ratios, strict=True)]
    return {**_row(statistics.median(steps) * 1e3), "step_seconds": steps}


def _interval_data() -> dict:
    """bf16, then ``plain`` 1.1x it in every round (an interval of no width, within 1.15x), the
    ``int8`` backend 0.7x and 0.9x in turn (undecided about 0.8x), MetaGrad 1.36x ``plain``
    (missed), ``psq`` 1.27x ``plain`` (met)."""
    data = _step_matrix_data()
    steps = data["vgg16"]["steps"]
    steps.pop("bhq")
    bf16 = [0.1, 0.12, 0.1, 0.11]
    steps["bf16"] = _timed(bf16, [1.0] * 4)
    steps["plain"] = plain = _timed(bf16, [1.1] * 4)
    steps["int8 backend"] = _timed(bf16, [0.7, 0.9, 0.7, 0.9])
    steps["metagrad plain"] = {
        **_timed(plain["step_seconds"], [1.36] * 4),
        "compared_with": "plain",
    }
    steps["psq"] = _timed(plain["step_seconds"], [1.27] * 4)
    return data


def _cells(text: str, start: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_goals_are_met_or_missed_only_where_the_interval_says_so():
    data = _interval_data()
    text = speed_goals_table(data)
    cells = _cells(text, "| Some CPU | vgg16 |")
    assert cells[3:] == [
        "1.10x [1.10, 1.10], met",
        cells[4],
        "1.36x [1.36, 1.36], missed",
        "psq 1.27x [1.27, 1.27], met",
    ]
    assert cells[4].startswith("0.79x [") and cells[4].endswith("], undecided")
    table = step_matrix_table(data)
    assert "| psq | " in table and "| 1.40x [1.40, 1.40] | 1.27x [1.27, 1.27] |  |" in table
    assert "| 1.36x [1.36, 1.36] (plain) |" in table
    assert "geometric mean of the per-step ratios" in table
    assert "(vgg16): none." in table
    # a preset whose interval reaches past the goal is named, and leaves the goal undecided
    plain = data["vgg16"]["steps"]["plain"]["step_seconds"]
    data["vgg16"]["steps"]["psq"] = _timed(plain, [1.2, 1.34, 1.2, 1.34])
    assert "(vgg16): psq 1.27x [1.1" in step_matrix_table(data)
    assert _cells(speed_goals_table(data), "| Some CPU |")[6].endswith("], undecided")


def test_a_repeated_run_is_judged_with_its_run():
    """A goal is met or missed only where the run and its repeat both say so."""
    run, repeat = _interval_data(), _interval_data()
    steps = repeat["vgg16"]["steps"]
    bf16 = steps["bf16"]["step_seconds"]
    steps["plain"] = _timed(bf16, [1.2] * 4)  # the run meets 1.15x, the repeat misses it
    for name in ("metagrad plain", "psq"):  # the same seconds as in the run
        steps[name] = run["vgg16"]["steps"][name]
    text = speed_goals_table(run, repeat, repeats=(False, True))
    cells = _cells(text, "| Some CPU | vgg16 |")
    assert cells[3] == "1.10x [1.10, 1.10]; 1.20x [1.20, 1.20], undecided (the runs differ)"
    assert cells[4].endswith("], undecided")  # undecided in both runs
    # MetaGrad and psq are timed against the repeat's shorter plain step there
    assert cells[5] == "1.36x [1.36, 1.36]; 1.25x [1.25, 1.25], undecided (the runs differ)"
    assert cells[6] == "psq 1.27x [1.27, 1.27]; 1.16x [1.16, 1.16], met"  # psq named once
    assert "(run; repeat)" in text
    # without the flag, the second file is a run of its own: a row of its own
    assert len(speed_goals_table(run, repeat).splitlines()) == len(text.splitlines()) + 1


def test_speed_goals_table_judges_each_ratio_against_its_goal():
    data = _step_matrix_data()
    text = speed_goals_table(data)
    # plain 1.10x bf16, int8 0.80x bf16 (the goal itself), MetaGrad 1.36x plain, psq 1.27x plain;
    # bhq failed, so the slowest preset measured is psq
    assert (
        "| Some CPU | vgg16 | 1 | 1.10x, met (no interval) | 0.80x, met (no interval) "
        "| 1.36x, missed (no interval) | psq 1.27x, met (no interval) |" in text
    )
    data["vgg16"]["steps"]["plain"] = _row(115.4)  # 1.154x: two decimals would show the goal
    data["vgg16"]["steps"].pop("int8 backend")
    text = speed_goals_table(data)
    assert "| 1.154x, missed (no interval) | not measured |" in text


def test_layers_name_where_no_route_meets_the_per_layer_goal(monkeypatch):
    """The error's cast to int8 is timed beside each layer's routes; a layer is out of reach
    when that cast exceeds 5% of its bf16 backward (bf16 products of the codes cost at least
    bf16's plus the cast) and its integer route was measured beyond 1.05x bf16."""
    monkeypatch.setattr(speed, "VGG16_SPATIAL", speed.VGG16_SPATIAL[:1])
    monkeypatch.setattr(speed, "GPT_CHAR_MLP", ())
    monkeypatch.setattr(speed, "GPT_CHAR_TOKENS", 8)
    monkeypatch.setattr(speed, "BASE", {**speed.BASE, "batch_size": 2})
    before = kernels.compile_enabled()
    result = speed.bench_layers(torch.device("cpu"), reps=3, warmup=0, tokens=[])
    (conv,) = result["rows"]
    paired = conv["measured routes/bf16"]  # round by round, with its interval
    assert paired["n"] == 3 and paired["ci95"][0] <= paired["ratio"] <= paired["ci95"][1]
    assert speed.FLOOR in conv["ms"] and conv["floor/bf16"] > 0
    # timed with the kernels as training runs them, and the setting restored after
    assert result["kernels"] == ("compiled" if kernels.available("cpu")[0] else "eager")
    assert kernels.compile_enabled() == before
    assert result["out_of_reach"] == out_of_reach(result["rows"])

    def row(name: str, bf16: float, int8: float, cast: float, routed: float = 2.0) -> dict:
        ms = {"bf16": bf16, "int8": int8, speed.FLOOR: cast, speed.ROUTED: routed}
        return {"name": name, "ms": ms, "bf16/int8": bf16 / int8}

    rows = [
        row("cast too slow, integer too slow", 1.0, 2.0, 0.2),
        row("cast within the slack", 1.0, 2.0, 0.04),
        row("integer within the goal", 1.0, 1.04, 0.2),
        row("measured routes within the goal", 1.0, 1.2, 0.2, routed=1.0),
    ]
    assert out_of_reach(rows) == ["cast too slow, integer too slow"]
    amd = json.loads((tables.RESULTS / "speed-cpu-amd-epyc.json").read_text())
    text = speed_table({**amd, "layers": {**result, "rows": rows + result["rows"]}})
    assert "error cast to int8 ms" in text
    assert f"| {goal_cell(paired, 1.05)} |" in text  # the goal's verdict, from the interval
    assert "the layers where no route can meet the per-layer goal" in text
    assert ": cast too slow, integer too slow" in text


def test_two_runs_side_by_side_say_whether_one_runs_interval_held():
    first = _interval_data()
    second = copy.deepcopy(first)
    steps = second["vgg16"]["steps"]
    plain = steps["plain"]["step_seconds"]
    steps["metagrad plain"] = {**_timed(plain, [1.25] * 4), "compared_with": "plain"}  # met now
    steps["psq"] = _timed(plain, [1.2, 1.34, 1.2, 1.34])  # undecided now
    text = step_matrix_runs_table(first, second)
    assert _cells(text, "| Some CPU | vgg16 | 1 | metagrad plain x `plain` (1.3x) |")[4:] == [
        "1.36x [1.36, 1.36], missed",
        "1.25x [1.25, 1.25], met",
        "no",
        "no",
    ]
    psq = _cells(text, "| Some CPU | vgg16 | 1 | psq x `plain` (1.3x) |")
    assert psq[4] == "1.27x [1.27, 1.27], met" and psq[5].endswith("undecided")
    assert psq[6:] == ["no", "no"]  # 1.268x lies outside an interval of no width
    assert "| `plain` x bf16 (1.15x) |" in text and "| int8 backend x bf16 (0.8x) |" in text
    assert (
        "Of 4 ratios, the second run's lies within the first run's 95% interval in 2, and the "
        "two runs give the same verdict in 2." in text
    )


def test_kernel_ab_times_each_kernel_against_its_eager_reference_and_puts_it_back():
    import metagrad.backward.emulated as emulated
    import metagrad.backward.products as products
    import metagrad.quant.transformed as transformed
    from benchmarks.kernel_ab import CASES
    from metagrad import kernels

    compiled = (products.summed, emulated.summed, transformed._contiguous, kernels._all_finite)
    with CASES["bias sums"]["old"]():
        assert products.summed is emulated.summed is compiled[0].eager
    with CASES["transposed copy"]["old"]():
        assert transformed._contiguous is compiled[2].eager
    with CASES["finiteness"]["old"]():
        t = torch.tensor([1.0, float("nan")])
        assert kernels._all_finite is compiled[3].eager and not bool(kernels.finite(t))
    now = (products.summed, emulated.summed, transformed._contiguous, kernels._all_finite)
    assert now == compiled
    import metagrad.backward.int8.codes as codes
    import metagrad.backward.int8.conv as conv
    import metagrad.backward.int8.linear as linear

    int8_kernels = (
        codes._operand_codes,
        conv._rescale,
        linear._rescale,
        conv._rescale_flipped_taps,
    )
    with CASES["int8 codes"]["old"]():
        assert codes._operand_codes is int8_kernels[0].eager
        assert conv._rescale is linear._rescale is codes._rescale.eager
        assert conv._rescale_flipped_taps is int8_kernels[3].eager
    now = (codes._operand_codes, conv._rescale, linear._rescale, conv._rescale_flipped_taps)
    assert now == int8_kernels


def test_kernel_ab_compiles_the_old_rescaling_with_inductors_own_int32_conversion():
    from torch._inductor.utils import run_and_get_code

    import metagrad.backward.int8.conv as conv
    import metagrad.backward.int8.linear as linear
    from benchmarks.kernel_ab import CASES

    def rescaled(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (acc.to(torch.float32) * scale).to(torch.bfloat16)

    acc, scale = torch.arange(-40, 40, dtype=torch.int32).view(2, 40), torch.tensor(0.5)
    before = (conv._rescale, linear._rescale, conv._rescale_flipped_taps)
    with kernels.compiled(True):
        if not kernels.compile_enabled():
            pytest.skip("torch.compile does not work here")
        with CASES["int32 conversions"]["old"]():
            assert conv._rescale is linear._rescale and conv._rescale is not before[0]
            old, (old_code,) = run_and_get_code(kernels.kernel(rescaled), acc, scale)
        new, (new_code,) = run_and_get_code(kernels.kernel(rescaled), acc, scale)
    assert torch.equal(old, new) and torch.equal(new, rescaled(acc, scale))
    assert "convert<float,2,int32_t,2>" in old_code
    assert "convert<float,2,int32_t,2>" not in new_code
    assert (conv._rescale, linear._rescale, conv._rescale_flipped_taps) == before


def test_kernel_ab_reruns_some_cases_and_keeps_the_others_with_their_commands(
    tmp_path, monkeypatch
):
    import benchmarks.kernel_ab as kernel_ab

    def fake_case(case, steps, warmup):  # timings are not what this test checks
        r = {"ratio": 0.9, "ci95": [0.8, 0.95], "n": steps}
        median = {"new": 0.9, "old": 1.0}
        return {"model": "m", "setting": "s", "median_seconds": median, "new_over_old": r}

    monkeypatch.setattr(kernel_ab, "run_case", fake_case)
    monkeypatch.setattr(kernel_ab, "CASES", {"a": {}, "b": {}})
    out = tmp_path / "ab.json"
    for argv in (["--cases", "a", "b", "--steps", "4"], ["--cases", "b", "--steps", "5"]):
        monkeypatch.setattr(sys, "argv", ["kernel_ab", *argv])
        kernel_ab.main([*argv, "--out", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert cases["a"]["new_over_old"]["n"] == 4 and cases["b"]["new_over_old"]["n"] == 5
    assert "--steps 4" in cases["a"]["command"] and "--steps 5" in cases["b"]["command"]
    text = kernel_ab_table(json.loads(out.read_text()))
    assert "separate runs: `a` by `" in text and "--steps 4`; `b` by `" in text
    assert text.rstrip().endswith("--steps 5`.")


def test_kernel_ab_takes_the_earlier_hypernet_from_the_git_history_with_the_same_numbers():
    import subprocess

    import metagrad.meta.hyper as hyper
    from benchmarks.kernel_ab import CASES, HYPERNET_BEFORE
    from metagrad import kernels
    from metagrad.meta.hyper import create_hypernet

    found = subprocess.run(["git", "cat-file", "-e", HYPERNET_BEFORE], cwd=ROOT, check=False)
    if found.returncode != 0:
        pytest.skip(f"needs the git history (commit {HYPERNET_BEFORE})")
    torch.manual_seed(0)
    net = create_hypernet("grad+weight")
    nn.init.normal_(net.head.weight, std=0.5)
    g, w, upstream = torch.randn(3, 16, 8, 3, 3).unbind()
    results = []
    for before in (False, True):
        with CASES["hypernet passes"]["old"]() if before else contextlib.nullcontext():
            assert (hyper.FusedMLP is not FusedMLP) == before
            assert ("cpp.max_horizontal_fusion_size" in kernels.RECOMPUTE) != before
            out = net.fused(g, w)
        torch.autograd.backward(out, upstream)
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
    (out_now, grads_now), (out_then, grads_then) = results
    assert torch.equal(out_now, out_then)
    assert all(torch.equal(a, b) for a, b in zip(grads_now, grads_then, strict=True))
    assert hyper.FusedMLP is FusedMLP


def test_kernel_ab_says_when_the_git_history_it_needs_is_missing():
    from benchmarks.kernel_ab import _module_at

    with pytest.raises(RuntimeError, match=r"git history of a clone.*--cases"):
        _module_at("0000000", "src/metagrad/meta/fused.py", "fused_before")


def test_step_matrix_times_a_model_with_attention_under_its_faster_kernel_and_keeps_others(
    tmp_path, monkeypatch
):
    """``--attention-kernel fastest`` times the bf16 step under each kernel first and runs every
    setting under the faster; ``--keep-models`` keeps the other models of the file, each with the
    command that timed it."""
    monkeypatch.setattr(step_matrix, "ATTENTION_STEPS", 1)
    out = tmp_path / "matrix.json"
    earlier = {"command": "an earlier run", "vgg16": {"steps": {}}, "vgg16_data": "somewhere"}
    out.write_text(json.dumps(earlier))
    tiny = {"model": "gpt_char", "width": 0.25, "batch_size": 2, "optimizer": "adam"}
    monkeypatch.setitem(step_matrix.MODELS, "gpt_char", tiny)
    args = ["--models", "gpt_char", "--settings", "bf16", "--parts", "steps", "--steps", "1"]
    result = step_matrix.main([*args, "--warmup", "1", "--keep-models", "--out", str(out)])
    gpt = result["gpt_char"]
    assert set(gpt["attention_kernel_seconds"]) == {"default", "math"}
    faster = min(gpt["attention_kernel_seconds"], key=gpt["attention_kernel_seconds"].get)
    assert gpt["attention_kernel"] == gpt["settings"]["attention_kernel"] == faster
    assert result["vgg16"] == {"command": "an earlier run", "steps": {}}
    assert result["vgg16_data"] == "somewhere"
    assert json.loads(out.read_text())["vgg16"]["command"] == "an earlier run"
    assert not step_matrix.has_attention({**speed.BASE, "width": 0.25}, runner.synthetic_data(2))
    text = step_matrix_table(result | {"vgg16": {"settings": speed.BASE, "steps": {}}})
    assert f"attention kernel `{faster}`, the faster bf16 step: default" in text


def test_step_profile_puts_attention_and_its_backward_apart_from_the_layers_products():
    """A Linear layer's products, forward and backward, are products; what
    ``scaled_dot_product_attention`` runs (its math kernel: matrix products and a softmax) and
    the backward of those operators are attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.step_profile import classify

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(layer(q), k, v, is_causal=True)
        out.square().sum().backward()
    kinds: dict[tuple[str, str], set[str]] = {}
    for phase, kind, event in classify(list(prof.events())):
        kinds.setdefault((phase, event.name), set()).add(kind)
    assert kinds[("forward and optimizer", "aten::addmm")] == {"products"}
    assert kinds[("forward and optimizer", "aten::bmm")] == {"attention"}
    assert kinds[("backward", "aten::mm")] == {"products"}  # the Linear layer's gradients
    assert kinds[("backward", "aten::bmm")] == {"attention"}
    assert kinds[("backward", "aten::_softmax_backward_data")] == {"attention"}


def test_step_profile_records_each_settings_shares_and_the_table_names_the_bound(tmp_path):
    from benchmarks import step_profile

    out = tmp_path / "profile.json"
    args = ["--models", "gpt_char", "--widths", "0.25", "--settings", "bf16", "int8 backend"]
    record = step_profile.main([*args, "--steps", "1", "--warmup", "1", "--out", str(out)])
    (run,) = record["runs"]
    assert run["attention_kernel"] in ("default", "math")
    for profile_ in run["profiles"].values():
        total = sum(sum(kinds.values()) for kinds in profile_["ms"].values())
        assert total == pytest.approx(profile_["total_ms"], rel=1e-3)
        assert 0 < profile_["backward_products_share"] < 1
    assert run["profiles"]["bf16"]["ms"]["backward"]["attention"] > 0
    assert run["profiles"]["int8 backend"]["ms"]["backward"]["compiled kernels"] > 0
    text = step_profile_table(json.loads(out.read_text()))
    share = 1 - run["profiles"]["bf16"]["backward_products_share"]
    assert "| gpt_char | 0.25 | `bf16` |" in text and f"{share:.2f}x" in text


def test_layer_overhead_times_each_setting_beside_plain_layers_and_counts_compiled_calls(tmp_path):
    from benchmarks import layer_overhead

    out = tmp_path / "overhead.json"
    args = ["--settings", "plain", "--tokens", "1", "3", "--layers", "2", "--features", "8"]
    record = layer_overhead.main([*args, "--rounds", "3", "--warmup", "1", "--out", str(out)])
    assert [(r["setting"], r["tokens"]) for r in record["rows"]] == [("plain", 1), ("plain", 3)]
    for row in record["rows"]:
        assert row["us"] > 0 and row["bf16_us"] > 0 and row["x_bf16"]["n"] == 3
        assert row["bf16_compiled_calls"] == 0
        assert row["compiled_calls"] >= 1 or not kernels.available("cpu")[0]
    text = layer_overhead_table(json.loads(out.read_text()))
    assert "| 3 | `plain` |" in text and "2 Linear layers of 8 features" in text


def test_layer_overhead_refuses_sizes_that_time_nothing(capsys):
    from benchmarks import layer_overhead

    with pytest.raises(SystemExit):
        layer_overhead.main(["--tokens", "0"])
    assert "--tokens, --features and --layers must be positive" in capsys.readouterr().err
