"""Result records name what ran, from the run's resolved configuration."""

import json
from pathlib import Path

import pytest

from benchmarks.runner import run_record
from metagrad.training.config import build_config
from metagrad.training.records import gradient_record

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize(
    ("settings", "label", "grad", "wgrad"),
    [
        ({}, "fp32", "fp32", "fp32"),
        ({"grad_bits": 4}, "int4:stochastic", "int4:stochastic", "int4:stochastic"),
        (
            {"grad_quant": "rht-nvfp4"},
            "rht-nvfp4",
            "fp4_e2m1:block16:e4m3-nearest:stochastic",
            "fp4_e2m1:block16:e4m3-nearest:stochastic:rht16",
        ),
        (
            {"grad_quant": "rht-nvfp4", "recipe": True},
            "recipe+rht-nvfp4",
            "fp4_e2m1:block16:e4m3-nearest:stochastic",
            "fp4_e2m1:block16:e4m3-nearest:stochastic:rht16",
        ),
        (
            {"grad_quant": "psq", "method": "metagrad"},
            "metagrad+psq",
            "int4:sample:stochastic",
            None,
        ),
        (
            {"grad_spec": "fp8_e4m3:stochastic", "input_spec_wgrad": "int8"},
            "fp8_e4m3:stochastic, input int8",
            "fp8_e4m3:stochastic",
            None,
        ),
    ],
)
def test_a_record_names_the_preset_and_every_spec(settings, label, grad, wgrad):
    record = gradient_record(build_config(settings))
    assert record["label"] == label
    assert record["grad_spec"] == grad
    assert record["grad_spec_wgrad"] == (wgrad or grad)
    assert record["preset"] == settings.get("grad_quant")
    assert record["method"] == settings.get("method", "plain")


def test_a_benchmark_record_of_a_preset_run_is_not_full_precision():
    cfg = build_config({"grad_quant": "luq", "seed": 2}).to_dict()
    summary = {
        "config": cfg,
        "epochs_completed": 1,
        "steps": 3,
        "final_test_acc": 50.0,
        "best_test_acc": 50.0,
        "mean_step_seconds": 0.1,
        "peak_memory_mb": 1.0,
        "peak_memory_kind": "process_max_rss",
    }
    record = run_record("luq-s2", summary, [])
    assert (record["method"], record["preset"], record["grad_spec"]) == (
        "plain",
        "luq",
        "log4:stochastic:dither16",
    )
    assert "bits" not in record


@pytest.mark.parametrize("name", ["methods.json", "methods-gpt.json"])
def test_the_committed_method_results_say_what_ran(name):
    for record in json.loads((RESULTS / name).read_text())["runs"]:
        assert record["label"] == record["method_name"]
        quantized = record["method_name"] != "fp32"
        assert (record["grad_spec"] != "fp32") == quantized


def _summary(settings: dict, acc: float) -> dict:
    return {
        "config": build_config(settings).to_dict(),
        "epochs_completed": 1,
        "steps": 3,
        "final_test_acc": acc,
        "best_test_acc": acc,
        "mean_step_seconds": 0.1,
        "peak_memory_mb": 1.0,
        "peak_memory_kind": "process_max_rss",
        "hypernet": {},
        "hyper_share_of_step_time": 0.0,
    }


def test_the_tables_pair_records_that_name_what_ran():
    """A results file of today's records (no ``bits``): full precision is found by its spec and
    MetaGrad is paired with plain on the same gradients, seed by seed."""
    from benchmarks.tables_training import paired_table, training_table

    runs = []
    for seed, (fp, plain, meta) in enumerate([(80.0, 75.0, 75.5), (79.0, 74.0, 74.25)]):
        int4 = {"grad_bits": 4, "seed": seed}
        runs += [
            run_record(f"fp32-s{seed}", _summary({"seed": seed}, fp), []),
            run_record(f"plain-s{seed}", _summary(int4, plain), []),
            run_record(f"meta-s{seed}", _summary({**int4, "method": "metagrad"}, meta), []),
        ]
    table = paired_table({"runs": runs})
    assert "| int4:stochastic | 0, 1 | 80.00, 79.00 | 75.00, 74.00 | 75.50, 74.25 " in table
    assert "| +0.50, +0.25 | +0.38 | [-1.21, +1.96] | 0.5 |" in table
    assert "| fp32 | plain | 0 | 80.00 |" in training_table({"runs": runs})


def test_the_documented_commands_name_the_seeds_the_results_hold():
    """Each result file holds the seeds its documented command runs (``--seeds``, or the
    benchmark's default)."""
    import inspect

    from benchmarks import methods, tables

    default = [0, 1, 2]  # the methods benchmark's --seeds
    assert f'"--seeds", type=int, nargs="+", default={default}' in inspect.getsource(methods.main)
    for name, table in tables.TABLES.items():
        for file, command in zip(table.files, table.commands, strict=True):
            path = tables.RESULTS / file
            if table.text or not path.is_file() or not isinstance(command, str):
                continue
            runs = json.loads(path.read_text()).get("runs")
            if not isinstance(runs, list) or not runs or "seed" not in runs[0]:
                continue
            seeds = sorted({r["seed"] for r in runs})
            words = command.split()
            if "--seeds" in words:
                start = words.index("--seeds") + 1
                given = []
                for word in words[start:]:
                    if not word.isdigit():
                        break
                    given.append(int(word))
                assert given == seeds, (name, file, command)
            elif "benchmarks.methods" in command:
                assert seeds == default, (name, file)
