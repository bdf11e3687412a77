"""The paper-table runner (metagrad reproduce): planning, running in parallel, resuming, merging."""

from __future__ import annotations

import json

import pytest

from metagrad.training.config import ConfigError
from metagrad.training.reproduce import (
    SETTINGS,
    base_settings,
    plan,
    reproduce,
    run_all,
    write_results,
)

TINY = {
    "model": "small_cnn",
    "width": 0.5,
    "epochs": 2,
    "batch_size": 64,
    "lr": 0.05,
    "compile": "off",
    "amp": "off",
}
ONLY = ["fp32", "int4-stochastic-tensor"]


def test_a_seed_has_eleven_runs_and_seeds_come_one_after_another():
    runs = plan([0, 1, 2])
    assert len(runs) == 33 and len({r.name for r in runs}) == 33
    assert [r.seed for r in runs[:11]] == [0] * 11
    assert {r.method for r in runs if r.setting == "fp32"} == {"plain"}
    assert len(SETTINGS) == 6


def test_profiles_and_overrides():
    assert base_settings("paper", None, None)["width"] == 1.0
    assert base_settings("paper", None, None)["epochs"] == 200
    cpu = base_settings("cpu", None, None)
    assert (cpu["width"], cpu["epochs"], cpu["amp"]) == (0.25, 6, "off")
    assert base_settings("paper", "resnet20", 30)["model"] == "resnet20"
    with pytest.raises(ConfigError, match="profile"):
        base_settings("gpu", None, None)
    with pytest.raises(ConfigError, match="model"):
        base_settings("paper", "alexnet", None)
    with pytest.raises(ConfigError, match="unknown setting"):
        reproduce(only=["int2-nearest"], report_only=True)


@pytest.mark.slow
def test_runs_in_parallel_resume_skip_and_merge_into_one_table(tmp_path):
    runs_dir = tmp_path / "runs"
    table = {"profile": "test", "model": "small_cnn", "width": 0.5, "epochs": 2}
    # A run killed after a few steps: its checkpoint must be resumed, not restarted.
    killed = plan([0], ["int4-stochastic-tensor"])[0]
    status = run_all([killed], {**TINY, "max_steps": 3}, "digits", runs_dir, 1, 1)
    assert status == {killed.name: 0}
    assert json.loads((runs_dir / killed.name / "summary.json").read_text())["steps"] == 3

    status = run_all(plan([0], ONLY), TINY, "digits", runs_dir, parallel=2, threads=1)
    assert set(status) == {r.name for r in plan([0], ONLY)} and set(status.values()) == {0}
    log = (runs_dir / killed.name / "log.txt").read_text()
    resumed = json.loads((runs_dir / killed.name / "summary.json").read_text())
    assert resumed["epochs_completed"] == 2 and resumed["steps"] > 3, log
    assert run_all(plan([0], ONLY), TINY, "digits", runs_dir, 2, 1) == {}  # all finished

    first = write_results(table, runs_dir, [], tmp_path / "a")
    assert {r["seed"] for r in first["runs"]} == {0}
    # Another invocation (seed 1, elsewhere) merges into the same table.
    other = tmp_path / "other"
    run_all(plan([1], ONLY), TINY, "digits", other, parallel=2, threads=1)
    write_results(table, other, [], tmp_path / "b")
    merged = write_results(table, runs_dir, [tmp_path / "b" / "results.json"], tmp_path / "c")
    assert len(merged["runs"]) == 6
    row = merged["summary"]["int4-stochastic-tensor"]
    assert len(row["metagrad_minus_plain"]) == 2 and len(row["plain_minus_fp32"]) == 2
    report = (tmp_path / "c" / "report.md").read_text()
    assert "int4-stochastic-tensor" in report and "(2)" in report
    assert (tmp_path / "c" / "curves.png").stat().st_size > 0
    record = merged["runs"][0]
    assert record["provenance"]["torch"] and record["provenance"]["threads"] == 1
    # A table of another length refuses to merge.
    with pytest.raises(ConfigError, match="epochs"):
        write_results({**table, "epochs": 3}, runs_dir, [tmp_path / "b" / "results.json"], tmp_path)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_run_is_filed_under_its_own_setting(tmp_path, setting):
    from metagrad.training.config import TrainConfig
    from metagrad.training.reproduce import run_record

    config = {**TrainConfig.defaults(), **SETTINGS[setting], "method": "plain"}
    summary = {
        "config": config,
        "epochs_completed": 4,
        "final_test_acc": 50.0,
        "best_test_acc": 50.0,
        "mean_step_seconds": 0.1,
        "peak_memory_mb": 1.0,
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert run_record(tmp_path / "run")["setting"] == setting


def test_the_committed_report_is_what_its_results_give():
    """report.md holds the paired intervals and p of its results.json (regenerate it with
    ``metagrad reproduce --report-only --merge .../results.json``)."""
    from pathlib import Path

    from metagrad.training.reproduce import report, summarize

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reproduce-cpu"
    results = json.loads((folder / "results.json").read_text())
    rows = summarize(results["runs"])
    assert json.loads(json.dumps(rows)) == results["summary"]  # tuples as JSON lists
    assert report(results["table"], results["runs"], rows) == (folder / "report.md").read_text()


def test_the_report_gives_paired_intervals_and_words():
    from metagrad.training.reproduce import summary_table

    rows = {
        "fp32": {"plain": [[0, 79.0], [1, 80.0]], "metagrad": []},
        "int4-stochastic-tensor": {
            "plain": [[0, 73.0], [1, 72.0]],
            "metagrad": [[0, 74.0], [1, 72.5]],
            "metagrad_minus_plain": [1.0, 0.5],
            "plain_minus_fp32": [-6.0, -8.0],
            "metagrad_minus_fp32": [-5.0, -7.5],
        },
    }
    table = summary_table(rows)
    # mean 0.75, sd 0.354: half-width 12.706 * 0.354 / sqrt(2) = 3.18
    assert "| +0.75 | [-2.43, +3.93] | 0.5 |" in table
    assert "int4-stochastic-tensor: +0.75 (no difference detected, 95% CI [-2.43, +3.93]" in table
    one = {"x": {**rows["int4-stochastic-tensor"], "metagrad_minus_plain": [1.0]}}
    assert "| +1.00 | - | - |" in summary_table(one) and "one seed (+1.00)" in summary_table(one)
