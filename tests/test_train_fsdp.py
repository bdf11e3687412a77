"""``--shard fsdp``: FSDP2 training under torchrun (gloo, CPU) and its sharded checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metagrad.checkpoint import CheckpointError, load_checkpoint
from metagrad.training.config import ConfigError, build_config, resume_config
from metagrad.training.sharded import read_shards
from metagrad.training.trainer import Trainer, train

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DIGITS = {
    "model": "small_cnn",
    "data": "digits",
    "epochs": 1,
    "batch_size": 64,
    "compile": "off",
    "threads": 1,
    "device": "cpu",
    "progress": False,
    "shard": "fsdp",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``nproc`` processes started by torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _flags(settings: dict) -> list[str]:
    flags = ["-m", "metagrad", "train"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("shards-"))


def _weights(out: Path) -> dict:
    """The full model and optimizer state of the run in ``out``, from the shards it names."""
    name = load_checkpoint(out / "checkpoint.pt")["shards"]["name"]
    return read_shards(out / name)


def _assert_equal(a: dict, b: dict, prefix: str = "") -> None:
    assert a.keys() == b.keys(), prefix
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_equal(value, b[key], f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), f"{prefix}{key}"
        else:
            assert value == b[key], f"{prefix}{key}"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"comm_bits": 8}, "comm_bits 8 is a DDP communication hook"),
        ({"amp": "fp16"}, "amp 'fp16' with shard 'fsdp'"),
        ({"diag_every": 5}, "diag_every runs the model on rank 0 alone"),
        ({"shard": "zero3"}, "shard must be one of ddp, fsdp"),
    ],
)
def test_what_fsdp_does_not_combine_with_is_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config({**DIGITS, **settings})
    assert "\n" not in str(err.value)


def test_one_process_trains_unsharded_and_resumes_exactly_from_its_shards(tmp_path):
    settings = {**DIGITS, "epochs": 2, "grad_bits": 4, "grad_rounding": "stochastic"}
    settings |= {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0}
    straight = tmp_path / "straight"
    train(build_config({**settings, "out": str(straight)}))
    split = tmp_path / "split"
    first = train(build_config({**settings, "out": str(split), "max_steps": 30}))
    assert first["steps"] == 30 and _shards(split) == ["shards-step000030"]
    state = load_checkpoint(split / "checkpoint.pt")
    assert "model" not in state and state["shards"]["parts"] == ["model", "optimizer"]
    # a run killed while writing the shards of a later step leaves them incomplete
    (split / "shards-step000040").mkdir()
    (split / "shards-step000040" / "__0_0.distcp").write_bytes(b"torn")
    summary = train(build_config({**settings, "out": str(split), "resume": True}))
    assert summary["steps"] == 44 and _shards(split) == _shards(straight) == ["shards-step000044"]
    _assert_equal(_weights(straight), _weights(split))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]


def test_damaged_or_missing_shards_are_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    train(build_config({**DIGITS, "out": str(out), "max_steps": 3}))
    again = build_config({**DIGITS, "out": str(out), "resume": True})
    data = out / "shards-step000003" / "__0_0.distcp"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: damaged \(its checksum"):
        train(again)
    data.unlink()
    with pytest.raises(CheckpointError, match=r"shards-step000003 lacks __0_0\.distcp"):
        train(again)
    with pytest.raises(ConfigError, match=r"cannot change: shard \(saved 'fsdp', given 'ddp'\)"):
        resume_config(load_checkpoint(out / "checkpoint.pt")["config"], {"shard": "ddp"})


def test_a_non_finite_state_writes_no_shards(tmp_path):
    trainer = Trainer(build_config({**DIGITS, "out": str(tmp_path)}))
    try:
        with torch.no_grad():
            trainer.model.classifier.bias[0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"non-finite values in model\.classifier"):
            trainer._save()
    finally:
        trainer.close()
    assert not _shards(tmp_path) and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("method", ["plain", "metagrad"])
def test_two_fsdp_processes_match_ddp(tmp_path, method):
    """Nearest rounding with a scale per sample: the ranks' gradients are those of one process;
    FSDP reduce-scatters them where DDP all-reduces, so the weights agree to float tolerance
    (MetaGrad: its hypernetwork on the shards, with whole-layer statistics)."""
    settings = {**DIGITS, "model": "ddp_mlp", "max_steps": 12, "lr": 0.05, "method": method}
    if method == "metagrad":
        settings["hyper_lr"] = 1e-2
    settings |= {"grad_bits": 8, "grad_rounding": "nearest", "grad_granularity": "sample"}
    runs = {}
    for shard in ("fsdp", "ddp"):
        out = tmp_path / shard
        out.mkdir()
        cmd = _run(2, str(WORKER), str(out), json.dumps({**settings, "shard": shard}))
        assert cmd.returncode == 0, cmd.stderr[-3000:]
        runs[shard] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        summary = json.loads((out / "run" / "summary.json").read_text())
        assert summary["communication"]["shard"] == shard and summary["steps"] == 12
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    for key, value in fsdp[0]["model"].items():
        assert torch.equal(value, fsdp[1]["model"][key]), f"ranks differ in {key}"
        torch.testing.assert_close(value, ddp[0]["model"][key], rtol=1e-5, atol=1e-6)
    losses = [
        json.loads((tmp_path / shard / "run" / "metrics.jsonl").read_text())["train_loss"]
        for shard in ("fsdp", "ddp")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_two_processes_resume_exactly_on_a_transformer(tmp_path):
    text = tmp_path / "text.txt"  # shorter than the built-in corpus: less to evaluate
    text.write_text((ROOT / "docs" / "training.md").read_text(encoding="utf-8")[:20000])
    settings = {**DIGITS, "model": "gpt_char", "width": 0.25, "data": text, "batch_size": 16}
    settings |= {"grad_bits": 4, "grad_rounding": "stochastic", "optimizer": "adam", "lr": 3e-3}
    settings |= {"weight_decay": 0.0, "max_steps": 8}
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = _run(2, *_flags({**settings, "out": straight}))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(2, *_flags({**settings, "out": split, "max_steps": 3}))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(2, *_flags({"resume": True, "out": split, "max_steps": 8, "progress": False}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_equal(_weights(straight), _weights(split))
    assert _shards(split) == ["shards-step000008"]
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["partial"]["loss_sum"] == b["partial"]["loss_sum"]


def test_metagrad_under_fsdp_resumes_exactly(tmp_path):
    settings = {**DIGITS, "method": "metagrad", "hyper_lr": 1e-2}
    settings |= {"grad_bits": 4, "grad_rounding": "stochastic", "lr": 0.05, "max_steps": 8}
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps in ((straight, 8), (split, 3)):
        done = _run(2, *_flags({**settings, "out": out, "max_steps": steps}))
        assert done.returncode == 0, done.stderr[-3000:]
    done = _run(2, *_flags({"resume": True, "out": split, "max_steps": 8, "progress": False}))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(straight), _weights(split)
    assert a["optimizer"]["state"]  # the pending gradients, momentum, hypernetwork
    _assert_equal(a, b)


def test_a_sharded_run_resumes_with_another_number_of_processes(tmp_path):
    """1 -> 2 -> 1 processes on a batch-norm CNN: the same batches, resharded weights."""
    out = tmp_path / "run"
    train(build_config({**DIGITS, "out": str(out), "max_steps": 5}))
    done = _run(2, *_flags({"resume": True, "out": out, "max_steps": 12, "progress": False}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["world_size"] == 2
    summary = train(build_config({**DIGITS, "out": str(out), "resume": True}))
    assert summary["epochs_completed"] == 1 and summary["steps"] == 22  # 1347 digits by 64
    assert _shards(out) == ["shards-step000022"] and summary["final_test_acc"] > 20
