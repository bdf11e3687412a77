"""Malformed input gives one line that names the file and the problem, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metagrad: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for part in expected:
        assert part in err, err
    return err


def _metrics(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"epoch": 1, "test_acc": 50.0}', "{truncated"], "line 2: not a JSON record"),
        (['{"epoch": 1, "test_acc": 50.0}', "[1, 2]"], "line 2: not an epoch record"),
        (['{"test_acc": 50.0}'], "line 1: not an epoch record"),
        (['{"epoch": 1, "test_acc": 50.0}', '{"epoch": 2}'], "no key 'test_acc'"),
    ],
    ids=["truncated", "list", "no-epoch", "missing-metric"],
)
def test_plot_names_a_bad_metrics_line(tmp_path, capsys, lines, problem):
    run = _metrics(tmp_path / "run", lines)
    _one_line_error(capsys, ["plot", str(run), "-o", str(tmp_path / "c.png")], problem)


def test_plot_reads_a_non_utf8_metrics_file_as_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 1, "x": "\xff"}\n')
    _one_line_error(capsys, ["plot", str(run)], "metrics.jsonl: unreadable")


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--epochs", "0"], ["--seeds", "-2"]])
def test_demo_refuses_zero_seeds_or_epochs(tmp_path, capsys, flag):
    _one_line_error(capsys, ["demo", "--out", str(tmp_path), *flag], "must be an integer >= 1")
    assert not (tmp_path / "demo.json").exists()


def test_a_good_metrics_file_still_plots(tmp_path, capsys):
    records = [json.dumps({"epoch": e, "test_acc": 10.0 * e}) for e in (1, 2)]
    run = _metrics(tmp_path / "run", records)
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("delay", [0.3, 0.8])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, delay):
    """While torch still loads, Ctrl-C ends ``python -m metagrad`` without a traceback."""
    command = [sys.executable, "-m", "metagrad", "train", "--model", "small_cnn", "--data"]
    command += ["digits", "--out", str(tmp_path / "run"), "--compile", "off", "--no-progress"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if "Could not import runpy module" in err:  # before the interpreter ran any package code
        pytest.skip(f"Ctrl-C after {delay} s landed while Python itself started (a busy machine)")
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) <= 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--lr", "1e300"], "lr must be <= 1e+06"),
        (["--hyper-lr", "1e300"], "hyper_lr must be <= 1e+06"),
        (["--warmup-epochs", "1e308"], "warmup_epochs must be <= epochs (4)"),
        (["--out", ""], "out must name a directory"),
        (["--out", "   "], "out must name a directory"),
    ],
)
def test_out_of_range_settings_are_one_line(tmp_path, capsys, flags, problem):
    argv = ["train", "--model", "small_cnn", "--data", "digits", "--out", str(tmp_path / "r")]
    _one_line_error(capsys, [*argv, *flags], problem)
    assert not (tmp_path / "r").exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b'lr: 0.1\nmodel: "sm\xffall"\n')
    _one_line_error(capsys, ["train", "--config", str(config)], f"{config}: not UTF-8 text", "0xff")


# --------------------------------------------------------------------------- reproduce --merge

_TABLE = {"profile": "cpu", "model": "vgg16", "width": 0.25, "epochs": 6}
_RECORD = {
    "run": "fp32-seed0",
    "setting": "fp32",
    "method": "plain",
    "seed": 0,
    "model": "vgg16",
    "width": 0.25,
    "epochs": 6,
    "epochs_completed": 6,
    "final_test_acc": 50.0,
    "best_test_acc": 51.0,
    "diverged_at_step": None,
    "test_acc_per_epoch": [40.0, 45.0, 47.0, 48.0, 51.0, 50.0],
    "mean_step_seconds": 0.1,
    "peak_memory_mb": 100.0,
    "amp": "off",
    "compile": "off",
    "provenance": {"commit": "0123456789abcdef", "torch": "2", "device": "cpu"},
}


def _reproduce_argv(tmp_path: Path, *merge: Path) -> list[str]:
    argv = ["reproduce", "--profile", "cpu", "--report-only", "--runs-dir", str(tmp_path / "runs")]
    return [*argv, "--out", str(tmp_path / "out"), "--merge", *map(str, merge)]


def _without(key: str) -> dict:
    return {k: v for k, v in _RECORD.items() if k != key}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "no such file"),
        ('{"table": {', "not valid JSON: Expecting property name"),
        ("[1, 2]", "expected a results.json object with a table and runs, got a list"),
        (json.dumps({"table": _TABLE}), "no 'runs'"),
        (json.dumps({"table": _TABLE, "runs": "x"}), "'runs' is the string 'x', expected a list"),
        (json.dumps({"table": _TABLE, "runs": [7]}), "runs[0]: expected a run record"),
        (
            json.dumps({"table": _TABLE, "runs": [_without("final_test_acc")]}),
            "runs[0] (run 'fp32-seed0'): the record lacks final_test_acc",
        ),
        (
            json.dumps({"table": _TABLE, "runs": [{**_RECORD, "setting": "int3-magic"}]}),
            "runs[0] (run 'fp32-seed0'): unknown setting the string 'int3-magic' (one of fp32,",
        ),
        (
            json.dumps({"table": _TABLE, "runs": [{**_RECORD, "final_test_acc": "50"}]}),
            "(run 'fp32-seed0'): final_test_acc is the string '50', expected a percentage",
        ),
        (
            json.dumps({"table": _TABLE, "runs": [{**_RECORD, "final_test_acc": float("nan")}]}),
            "(run 'fp32-seed0'): final_test_acc is NaN, expected a percentage in [0, 100]",
        ),
        (
            json.dumps({"table": _TABLE, "runs": [{**_RECORD, "test_acc_per_epoch": [1, None]}]}),
            "test_acc_per_epoch is a list, expected a list of percentages in [0, 100]",
        ),
        (
            json.dumps({"table": _TABLE, "runs": [{**_RECORD, "seed": True}]}),
            "seed is a boolean, expected an integer",
        ),
    ],
    ids=[
        "missing",
        "invalid-json",
        "list",
        "no-runs",
        "runs-not-a-list",
        "record-not-an-object",
        "missing-field",
        "unknown-setting",
        "string-accuracy",
        "nan-accuracy",
        "bad-curve",
        "bool-seed",
    ],
)
def test_reproduce_names_a_bad_merge_file(tmp_path, capsys, text, problem):
    merge = tmp_path / "other" / "results.json"
    if text is not None:
        merge.parent.mkdir()
        merge.write_text(text)
    _one_line_error(capsys, _reproduce_argv(tmp_path, merge), f"{merge}", problem)
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_good_merge_file_still_merges(tmp_path, capsys):
    merge = tmp_path / "results.json"
    merge.write_text(json.dumps({"table": _TABLE, "runs": [_without("amp")]}))
    assert main(_reproduce_argv(tmp_path, merge)) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [(r["run"], r["final_test_acc"], r["amp"]) for r in runs] == [
        ("fp32-seed0", 50.0, "off")
    ]


# --------------------------------------------------------------------------- run folders


def _run_folder(runs: Path, name: str, summary: str | None, metrics: list[str] = ()) -> Path:
    """A run folder as ``metagrad train`` leaves it, of the ``cpu`` profile's fp32 setting."""
    from metagrad.training.config import TrainConfig

    folder = runs / name
    folder.mkdir(parents=True)
    if summary is None:
        config = {**TrainConfig.defaults(), "model": "vgg16", "width": 0.25, "epochs": 6}
        config |= {"grad_bits": 32, "method": "plain", "seed": int(name[-1])}
        summary = json.dumps(
            {
                "config": config,
                "epochs_completed": 6,
                "final_test_acc": 50.0,
                "best_test_acc": 51.0,
                "diverged_at_step": None,
                "mean_step_seconds": 0.1,
                "peak_memory_mb": 1.0,
            }
        )
    (folder / "summary.json").write_text(summary)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    return folder


def test_report_only_leaves_out_a_run_whose_summary_is_torn(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run_folder(runs, "fp32-seed0", None)
    torn = _run_folder(runs, "fp32-seed1", '{"config": {"model": "vg')
    assert main(_reproduce_argv(tmp_path)) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        f"metagrad: warning: {torn / 'summary.json'}: not valid JSON: Unterminated string "
        "starting at (line 1, column 22); fp32-seed1 is left out of the report"
    )
    runs_found = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["run"] for r in runs_found] == ["fp32-seed0"]


@pytest.mark.parametrize(
    ("summary", "problem"),
    [
        ("[]", "expected a JSON object, got a list"),
        ('{"config": []}', "config is a list, expected an object"),
        ('{"config": {"seed": 0}}', "lacks config.method, config.model"),
    ],
    ids=["list", "config-list", "missing-fields"],
)
def test_report_only_names_what_is_wrong_with_a_summary(tmp_path, capsys, summary, problem):
    folder = _run_folder(tmp_path / "runs", "fp32-seed0", summary)
    assert main(_reproduce_argv(tmp_path)) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"metagrad: warning: {folder / 'summary.json'}: ") and "\n" not in err
    assert problem in err and "left out of the report" in err


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"epoch": 1, "test_acc": 40.0}', "{torn"], "metrics.jsonl, line 2: not a JSON record"),
        (['{"epoch": 1, "test_acc": "40"}'], "metrics.jsonl: test_acc of epoch 1 is the string"),
    ],
    ids=["torn-line", "string-accuracy"],
)
def test_a_bad_metrics_line_leaves_only_that_runs_curve_out(tmp_path, capsys, lines, problem):
    runs = tmp_path / "runs"
    good = ['{"epoch": 1, "test_acc": 40.0}', '{"epoch": 2, "test_acc": 50.0}']
    _run_folder(runs, "fp32-seed0", None, good)
    bad = _run_folder(runs, "fp32-seed1", None, lines)
    assert main(_reproduce_argv(tmp_path)) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"metagrad: warning: {bad / 'metrics.jsonl'}") and "\n" not in err
    assert problem in err and err.endswith("the curve of fp32-seed1 is left out")
    records = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["test_acc_per_epoch"] for r in records] == [[40.0, 50.0], []]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_the_launcher_trains_again_a_run_whose_summary_is_torn(tmp_path, capsys):
    from metagrad.training.launcher import Launch, has_result, launch_runs

    settings = {"model": "small_cnn", "batch_size": 32, "compile": "off", "epochs": 1}
    torn = Launch("torn", {**settings, "max_steps": 3}, tmp_path / "torn")
    torn.out.mkdir()
    (torn.out / "summary.json").write_text('{"config": {"model": "small')
    assert not has_result(torn)
    assert "torn/summary.json: not valid JSON" in capsys.readouterr().err
    status = launch_runs([torn], "digits", threads=1, label="test")
    assert status == {"torn": 0}, (torn.out / "log.txt").read_text()
    err = capsys.readouterr().err.strip()
    assert err.startswith("metagrad: warning: ") and "torn counts as not finished" in err
    assert json.loads((torn.out / "summary.json").read_text())["steps"] == 3


def test_run_files_are_parsed_in_one_place():
    """``reproduce``, ``plot`` and the launcher read run files through ``run_files`` only."""
    package = SRC / "metagrad"
    for module in ("training/reproduce.py", "training/launcher.py", "plot.py"):
        assert "json.load" not in (package / module).read_text(), module


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: s.update(partial={}), "partial lacks 'loss_sum'"),
        (lambda s: s.update(step_seconds="abc"), "step_seconds is 'abc', expected a list, each"),
        (lambda s: s["step_seconds"].append("x"), "step_seconds[3] is 'x', expected a finite"),
        (lambda s: s["partial"].update(seen=-1), "partial.seen is -1, expected an integer >= 0"),
        (lambda s: s.update(history=[{}]), "history[0] is a dict, expected an epoch record"),
        (lambda s: s.update(hyper_seconds="1"), "hyper_seconds is '1', expected a finite number"),
        (lambda s: s.update(skipped_steps=1.5), "skipped_steps is 1.5, expected an integer"),
        (lambda s: s.update(torch_rng=torch.zeros(3)), "torch_rng is a Tensor, expected a uint8"),
        (lambda s: s.update(grad_scaler=[]), "grad_scaler is a list, expected a state dict"),
        (lambda s: s.update(optimizer=None), "optimizer is None, expected a state dict"),
        (lambda s: s["position"].update(step=True), "position.step is True, expected an integer"),
    ],
    ids=[
        "empty-partial",
        "string-step-seconds",
        "string-step-time",
        "negative-seen",
        "history-dict",
        "string-hyper-seconds",
        "float-count",
        "float-rng",
        "scaler-list",
        "no-optimizer",
        "bool-step",
    ],
)
def test_a_hand_edited_checkpoint_names_the_bad_field(tmp_path, capsys, edit, problem):
    from metagrad.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--batch-size", "32"]
    args += ["--compile", "off", "--no-progress", "--max-steps", "3", "--out", str(out)]
    assert main(args) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    edit(state)
    save_checkpoint(state, out / "checkpoint.pt")
    capsys.readouterr()
    resume = ["train", "--resume", "--out", str(out), "--no-progress", "--max-steps", "5"]
    _one_line_error(capsys, resume, f"{out / 'checkpoint.pt'}: damaged or incompatible ({problem}")


# --------------------------------------------------------------------------- corpora


def test_a_corpus_with_too_many_distinct_characters_is_refused(tmp_path, capsys, monkeypatch):
    from metagrad.data import corpus

    text = "".join(chr(0x400 + i) for i in range(300)) * 4
    path = tmp_path / "many.txt"
    path.write_text(text, encoding="utf-8")
    assert corpus.load_char_corpus(path).vocab_size == 300
    monkeypatch.setattr(corpus, "MAX_VOCAB", 256)
    argv = ["train", "--model", "gpt_char", "--data", str(path), "--out", str(tmp_path / "r")]
    _one_line_error(
        capsys,
        [*argv, "--compile", "off", "--no-progress"],
        f"{path}: has 300 distinct characters, more than the 256 a character vocabulary",
    )
