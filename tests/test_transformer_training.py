"""``metagrad train`` on the transformers: ViT-Tiny on images, the character GPT on text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from metagrad.checkpoint import CheckpointError, load_checkpoint
from metagrad.cli import main
from metagrad.data.corpus import pydoc_text
from metagrad.training.config import ConfigError, build_config
from metagrad.training.trainer import Trainer, train

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"
ADAM = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0}
GPT = {
    "model": "gpt_char",
    "width": 0.25,
    "batch_size": 16,
    "compile": "off",
    "progress": False,
    **ADAM,
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 characters of the built-in corpus: an epoch of 8 steps at batch 16."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(pydoc_text()[:20_000], encoding="utf-8")
    return path


def _gpt(out: Path, **overrides) -> object:
    return build_config({**GPT, "out": str(out), **overrides})


def test_gpt_char_learns_the_default_corpus(tmp_path):
    cfg = _gpt(tmp_path / "run", epochs=1, max_steps=30, warmup_epochs=0.0)
    trainer = Trainer(cfg)
    initial, _ = trainer.task.evaluate(trainer.model, trainer.eval_split, None, None)
    assert initial / math.log(2) == pytest.approx(math.log2(103), abs=0.1)  # ~uniform at init
    summary = trainer.fit()
    assert summary["task"] == "charlm" and summary["steps"] == 30
    assert summary["corpus"]["source"] == "pydoc" and summary["corpus"]["vocab_size"] == 103
    assert summary["final_test_bpc"] < initial / math.log(2) - 1.5
    assert summary["final_test_acc"] is None and summary["best_test_acc"] is None
    record = _records(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["test_bpc"] == pytest.approx(record["test_loss"] / math.log(2))
    assert record["train_bpc"] == pytest.approx(record["train_loss"] / math.log(2))
    assert "test_acc" not in record and 0 < record["test_char_acc"] < 100


def test_cli_trains_the_gpt_with_every_feature(tmp_path, small_text, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model", "gpt_char", "--width", "0.25", "--data", str(small_text)]
    args += ["--optimizer", "adam", "--lr", "3e-3", "--weight-decay", "0", "--batch-size", "16"]
    args += ["--epochs", "2", "--compile", "off", "--amp", "bf16", "--grad-bits", "4"]
    args += ["--grad-rounding", "stochastic", "--diag-every", "4", "--fp-first-last"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test bpc" in printed and "final test bpc" in printed
    summary = json.loads((out / "summary.json").read_text())
    history = _records(out / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2] and summary["steps"] == 16
    assert summary["final_test_bpc"] == history[-1]["test_bpc"]
    assert summary["best_test_bpc"] == min(r["test_bpc"] for r in history)
    assert summary["amp"] == "bfloat16" and summary["task"] == "charlm"
    # 4 blocks x (out_proj, linear1, linear2) and their attention's q/k/v projections; the head
    # stays full precision (--fp-first-last), and nothing else is left out
    assert summary["quantized_layers"] == 12
    coverage = summary["quantization_coverage"]
    assert {f"blocks.{i}.self_attn" for i in range(4)} <= set(coverage["converted"])
    assert set(coverage["unconverted"]) == {"classifier"}
    gradients = _records(out / "gradients.jsonl")
    assert [r["step"] for r in gradients] == [4, 8, 12, 16]
    names = ("self_attn.out_proj", "linear1", "linear2")
    layers = {f"blocks.{i}.{name}" for i in range(4) for name in names}
    assert set(gradients[0]["layers"]) == layers
    assert 0.5 < gradients[-1]["mean_quantized"]["cosine"] < 1.0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["dataset"]["vocab"] == "".join(sorted(set(small_text.read_text())))


@pytest.mark.parametrize(
    "settings",
    [
        {"grad_bits": 4, "grad_rounding": "stochastic"},
        {"grad_bits": 4, "method": "metagrad", "hyper_lr": 1e-3, "amp": "bf16"},
    ],
    ids=["plain-int4-stochastic", "metagrad-bf16"],
)
def test_lm_resume_after_max_steps_reproduces_an_uninterrupted_run(tmp_path, small_text, settings):
    settings = {"data": str(small_text), "epochs": 2, **settings}
    straight = train(_gpt(tmp_path / "straight", **settings))
    first = train(_gpt(tmp_path / "split", max_steps=11, **settings))  # inside epoch 2
    assert first["stopped_early"] and first["steps"] == 11
    assert _records(tmp_path / "split" / "metrics.jsonl")[-1]["partial"] is True
    resumed = train(_gpt(tmp_path / "split", resume=True, **settings))
    assert resumed["steps"] == straight["steps"] == 16
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in b["history"]
    ]
    assert resumed["final_test_bpc"] == straight["final_test_bpc"]


def test_resume_refuses_another_text(tmp_path, small_text):
    out = tmp_path / "run"
    train(_gpt(out, data=str(small_text), epochs=1, max_steps=2))
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1], encoding="utf-8")  # same characters
    with pytest.raises(CheckpointError, match=r"the dataset differs.*\(sha256 '") as info:
        train(_gpt(out, data=str(other), epochs=1, resume=True))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"the dataset differs.*\(vocab '") as info:
        train(_gpt(out, epochs=1, resume=True))  # the default corpus
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.txt"], "missing.txt: no such file"),
        (["--data", "digits"], "digits: no such file; expected a UTF-8 text file"),
        (["--download"], "--download fetches CIFAR-10"),
        (["--data", "tiny.txt"], "fewer than one window of context 128"),
    ],
)
def test_cli_reports_bad_lm_data_in_one_line(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("just a few characters\n" * 20, encoding="utf-8")
    args = ["train", "--model", "gpt_char", "--width", "0.25", "--out", "run", "--no-progress"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metagrad: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_diverging_lm_stops_with_a_clear_error(tmp_path, small_text):
    out = tmp_path / "run"
    cfg = _gpt(out, data=str(small_text), epochs=1, optimizer="sgd", lr=1e6, momentum=0.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_step"] >= 1
    assert summary["final_test_bpc"] is None and summary["task"] == "charlm"
    skipping = train(_gpt(tmp_path / "skip", data=str(small_text), epochs=1, optimizer="sgd",
                          lr=1e6, momentum=0.0, nonfinite="skip"))  # fmt: skip
    assert skipping["nonfinite_steps"] >= 1


def test_vit_trains_on_digits_with_metagrad(tmp_path):
    settings = {"model": "vit_tiny", "width": 0.25, "data": "digits", "batch_size": 64}
    settings |= {"epochs": 1, "max_steps": 4, "compile": "off", "progress": False, **ADAM}
    settings |= {"grad_bits": 4, "method": "metagrad", "hyper_lr": 1e-3, "diag_every": 2}
    summary = train(build_config({**settings, "out": str(tmp_path / "vit")}))
    assert summary["task"] == "image" and summary["steps"] == 4
    assert summary["final_test_acc"] is not None and "final_test_bpc" not in summary
    # patch embedding + 6 blocks x (linear1, linear2) + classifier
    assert summary["quantized_layers"] == 20
    assert summary["hypernet"]["kind"] == "grad+weight"
    assert [r["step"] for r in _records(tmp_path / "vit" / "gradients.jsonl")] == [2, 4]


def test_vit_needs_an_image_dataset(tmp_path):
    with pytest.raises(ConfigError, match="no dataset"):
        train(build_config({"model": "vit_tiny", "out": str(tmp_path / "a"), "progress": False}))


@pytest.mark.slow
def test_vit_on_the_shared_cifar10_zip(tmp_path, monkeypatch):
    if not SHARED_ZIP.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the shared CIFAR-10 zip at {SHARED_ZIP}")
        pytest.skip(f"shared CIFAR-10 zip not found at {SHARED_ZIP}")
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "vit"
    args = ["train", "--model", "vit_tiny", "--width", "0.25", "--data", str(SHARED_ZIP)]
    args += ["--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "0", "--batch-size", "64"]
    args += ["--grad-bits", "4", "--grad-rounding", "stochastic", "--compile", "off"]
    args += ["--epochs", "1", "--max-steps", "5", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["task"] == "image"
    assert 0 <= summary["final_test_acc"] <= 100


def test_the_gpt_trains_under_the_attention_kernel_it_is_given(tmp_path, small_text):
    """``--attention-kernel math`` runs the attention of every forward pass, training and
    evaluation, on the math kernel and is saved with the run; the default leaves PyTorch's."""
    from torch.profiler import ProfilerActivity, profile

    seen = {}
    for kernel in ("default", "math"):
        cfg = _gpt(tmp_path / kernel, data=str(small_text), epochs=1, max_steps=1)
        cfg.attention_kernel = kernel
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            summary = train(cfg)
        seen[kernel] = {e.name for e in prof.events()}
        assert summary["config"]["attention_kernel"] == kernel
    assert "aten::_scaled_dot_product_attention_math" in seen["math"]
    assert "aten::_scaled_dot_product_attention_math" not in seen["default"]
    assert not any("flash_attention" in name for name in seen["math"])
