"""Multi-process training under torchrun (gloo, CPU): ranks agree, match one process, resume."""

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

from metagrad.checkpoint import load_checkpoint
from metagrad.parallel.distributed import is_collective_failure

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = {
    "data": "digits",
    "epochs": 1,
    "batch_size": 64,
    "lr": 0.05,
    "warmup_epochs": 0.0,
    "compile": "off",
    "threads": 1,
    "device": "cpu",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", *args]


def _run_worker(out: Path, nproc: int, settings: dict) -> list[dict]:
    out.mkdir(parents=True)
    cmd = _torchrun(nproc, str(WORKER), str(out), json.dumps({**COMMON, **settings}))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.mark.parametrize(
    "settings",
    [
        {
            "method": "plain",
            "grad_bits": 8,
            "grad_rounding": "nearest",
            "grad_granularity": "sample",
        },
        {
            "method": "metagrad",
            "grad_bits": 8,
            "grad_rounding": "nearest",
            "grad_granularity": "sample",
            "hyper_lr": 1e-2,
        },
        # The language model's loss is weighted per character over the ranks. Full-precision
        # gradients: one rounding flip of a quantizer would exceed the tolerance here.
        {"model": "gpt_char", "width": 0.25, "data": "pydoc", "method": "plain"},
    ],
    ids=["plain", "metagrad", "charlm"],
)
def test_two_processes_agree_bitwise_and_match_one_process(tmp_path, settings):
    settings = {"model": "ddp_mlp", "max_steps": 12, **settings}
    two = _run_worker(tmp_path / "two", 2, settings)
    one = _run_worker(tmp_path / "one", 1, settings)
    for key, value in two[0]["model"].items():
        assert torch.equal(value, two[1]["model"][key]), f"ranks differ in {key}"
        torch.testing.assert_close(value, one[0]["model"][key], rtol=1e-4, atol=1e-5)
    if settings["method"] == "metagrad":
        for key, value in two[0]["hypernet"].items():
            assert torch.equal(value, two[1]["hypernet"][key]), f"hypernets differ in {key}"
            torch.testing.assert_close(value, one[0]["hypernet"][key], rtol=1e-4, atol=1e-5)
        assert len(two[0]["pending"]) == 3
        for a, b in zip(two[0]["pending"], two[1]["pending"], strict=True):
            assert torch.equal(a, b)
    # Every rank wrote nothing but its own dump: metrics and checkpoint come from rank 0 only.
    assert (tmp_path / "two" / "run" / "checkpoint.pt").is_file()
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in _children(launcher):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("method", "comm_bits"),
    # uncompressed; compressed (the dither's generator is the state that resumes, the same
    # at any width); MetaGrad's state with the compressor's
    [("plain", 32), ("plain", 8), ("metagrad", 4)],
)
def test_cli_under_torchrun_resumes_exactly_after_one_rank_is_killed(tmp_path, method, comm_bits):
    args = ["-m", "metagrad", "train", "--model", "small_cnn", "--data", "digits"]
    args += ["--method", method, "--hyper-lr", "1e-3", "--comm-bits", str(comm_bits)]
    args += ["--epochs", "3", "--batch-size", "32", "--grad-bits", "4"]
    args += ["--grad-rounding", "stochastic", "--compile", "off", "--threads", "1"]
    args += ["--device", "cpu", "--no-progress"]
    straight = tmp_path / "straight"
    done = subprocess.run(
        _torchrun(2, *args, "--out", str(straight)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1  # rank 0 reports

    killed = tmp_path / "killed"
    launcher = subprocess.Popen(
        _torchrun(2, *args, "--out", str(killed)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint.pt").exists() and launcher.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim = _rank_pid(launcher.pid, 1)
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    launcher.wait(timeout=120)
    assert victim is not None and launcher.returncode != 0  # the run was cut short
    assert load_checkpoint(killed / "checkpoint.pt")["position"]["epoch"] < 3
    resumed = subprocess.run(
        _torchrun(2, "-m", "metagrad", "train", "--resume", "--out", str(killed), "--no-progress"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    if method == "metagrad":
        for key, value in a["optimizer"]["hypernet"].items():
            assert torch.equal(value, b["optimizer"]["hypernet"][key]), key
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]
    assert not list(killed.glob(".checkpoint.pt.*")) and not (killed / ".lock").exists()


def test_a_run_resumes_with_another_number_of_processes(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "metagrad", "train", "--model", "small_cnn", "--data", "digits", "--epochs", "1"]
    args += ["--batch-size", "32", "--compile", "off", "--threads", "1", "--device", "cpu"]
    one = [sys.executable, *args, "--max-steps", "5", "--out", str(out), "--no-progress"]
    done = subprocess.run(one, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = _torchrun(2, "-m", "metagrad", "train", "--resume", "--out", str(out), "--no-progress")
    done = subprocess.run(two, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["communication"]["world_size"] == 2
    assert summary["steps"] == 43  # the same batches: 1347 digits in batches of 32


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_frozen_rank_stops_the_others_with_one_line_naming_it(tmp_path):
    """SIGSTOP of rank 1: within --dist-timeout rank 0 stops, and says rank 1 did not report."""
    args = ["-m", "metagrad", "train", "--model", "small_cnn", "--data", "digits"]
    args += ["--epochs", "50", "--batch-size", "32", "--compile", "off", "--threads", "1"]
    args += ["--device", "cpu", "--no-progress", "--dist-timeout", "4", "--out", str(tmp_path)]
    launcher = subprocess.Popen(
        _torchrun(2, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    frozen, main = _rank_pid(launcher.pid, 1), _rank_pid(launcher.pid, 0)
    assert frozen is not None and main is not None
    os.kill(frozen, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while Path(f"/proc/{main}").exists() and "Z" not in _state(main):
            assert time.monotonic() - stopped < 60, "rank 0 still waits"
            time.sleep(0.1)
    finally:
        os.kill(frozen, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("metagrad: error: rank 0:")]
    assert len(lines) == 1, err[-3000:]
    assert "waited more than 4 s (--dist-timeout)" in lines[0]
    assert "rank 1 did not report" in lines[0]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


@pytest.mark.parametrize(
    ("message", "collective"),
    [
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 4000ms", True),
        ("Application timeout caused pair closure", True),  # a peer stopped mid-broadcast
        ("[pair.cc:598] Connection closed by peer [127.0.0.1]:4567", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
    ],
)
def test_backend_errors_of_a_lost_peer_count_as_collective_failures(message, collective):
    assert is_collective_failure(RuntimeError(message)) is collective
    assert not is_collective_failure(ValueError(message))
