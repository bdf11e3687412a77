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
