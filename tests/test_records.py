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
            "fp4_e2m1:block16:e4m3:stochastic",
            "fp4_e2m1:block16:e4m3:stochastic:rht16",
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
        "log4:stochastic",
    )
    assert "bits" not in record


@pytest.mark.parametrize("name", ["methods.json", "methods-gpt.json"])
def test_the_committed_method_results_say_what_ran(name):
    for record in json.loads((RESULTS / name).read_text())["runs"]:
        assert record["label"] == record["method_name"]
        quantized = record["method_name"] != "fp32"
        assert (record["grad_spec"] != "fp32") == quantized
