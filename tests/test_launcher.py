"""The run launcher (metagrad.training.launcher): what it starts, skips, resumes and records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from metagrad.cli import build_parser
from metagrad.training.launcher import (
    Launch,
    has_result,
    launch_runs,
    train_command,
    train_flags,
)
from metagrad.training.run_files import is_finished

TINY = {
    "model": "small_cnn",
    "width": 0.5,
    "epochs": 1,
    "batch_size": 64,
    "compile": "off",
    "amp": "off",
    "threads": 1,
}


def _summary(out: Path, **fields: object) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"in_progress": False, "epochs_completed": 2, "diverged_at_step": None, **fields}
    (out / "summary.json").write_text(json.dumps(summary))


def test_command_resumes_from_a_checkpoint_and_takes_threads_and_torchrun(tmp_path):
    run = Launch("a", {"grad_bits": 4, "max_steps": 3}, tmp_path / "a")
    cmd = train_command(run, "digits")
    assert cmd[:4] == [sys.executable, "-m", "metagrad", "train"]
    assert cmd[4:] == [
        "--grad-bits", "4", "--max-steps", "3",
        "--data", "digits", "--out", str(tmp_path / "a"), "--no-progress",
    ]  # fmt: skip
    run.out.mkdir()
    (run.out / "checkpoint.pt").write_bytes(b"")
    assert train_command(run, "digits", threads=2)[-3:] == ["--threads", "2", "--resume"]
    torchrun = train_command(run, "digits", nproc=2)
    assert torchrun[2:6] == ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert torchrun[6:8] == ["metagrad", "train"]


@pytest.mark.parametrize(
    ("fields", "finished", "result"),
    [
        ({}, True, True),
        ({"epochs_completed": 3}, True, True),
        ({"in_progress": True}, False, False),
        ({"epochs_completed": 1, "stopped_early": True}, False, False),  # --max-steps
        ({"epochs_completed": 1, "diverged_at_step": 17}, False, True),  # its result
    ],
)
def test_one_rule_for_finished_and_diverged(tmp_path, fields, finished, result):
    run = Launch("a", {"epochs": 2}, tmp_path / "a")
    assert not has_result(run)  # no summary yet
    _summary(run.out, **fields)
    assert is_finished(json.loads((run.out / "summary.json").read_text()), 2) == finished
    assert has_result(run) == result


def test_runs_with_results_are_read_not_started(tmp_path, capsys):
    runs = [Launch(name, {"epochs": 2}, tmp_path / name) for name in ("done", "diverged")]
    _summary(runs[0].out)
    _summary(runs[1].out, epochs_completed=0, diverged_at_step=5)
    seen: list[str] = []
    status = launch_runs(runs, "digits", label="test", on_result=lambda r: seen.append(r.name))
    assert status == {} and seen == ["done", "diverged"]
    assert "test: 0 runs to train, 2 finished" in capsys.readouterr().out
    assert not any((r.out / "log.txt").exists() for r in runs)
    with pytest.raises(ValueError, match="parallel"):
        launch_runs(runs, "digits", parallel=0)


@pytest.mark.slow
def test_benchmark_runs_train_then_read_their_records(tmp_path):
    from benchmarks.runner import train_runs

    runs = [("fp32", TINY), ("int4", {**TINY, "grad_bits": 4})]
    seen: list[str] = []
    first = train_runs(runs, "digits", tmp_path, parallel=2, on_record=lambda n, r: seen.append(n))
    assert sorted(seen) == ["fp32", "int4"] and set(first) == {"fp32", "int4"}
    assert first["int4"]["grad_spec"] == "int4:stochastic" and first["int4"]["epochs"] == 1
    assert not (tmp_path / "fp32" / "log.txt").exists()  # output goes to the terminal
    mtime = (tmp_path / "fp32" / "checkpoint.pt").stat().st_mtime_ns
    again = train_runs(runs, "digits", tmp_path)
    assert again == first  # read, not trained again
    assert (tmp_path / "fp32" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_train_flags_are_what_the_command_line_parses():
    """Every setting a benchmark passes reaches ``metagrad train`` as given: switches as
    ``--NAME`` / ``--no-NAME``, everything else as ``--NAME VALUE``."""
    settings = {"grad_quant": "bhq", "recipe": True, "progress": False, "lr": 0.05, "epochs": 2}
    flags = train_flags(settings)
    assert flags[:3] == ["--grad-quant", "bhq", "--recipe"] and "--no-progress" in flags
    parsed = vars(build_parser().parse_args(["train", *flags]))
    assert {k: parsed[k] for k in settings} == settings
