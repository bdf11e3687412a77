"""A training run never loses or hides anything: non-finite steps, output folder, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_run import DIGITS
from PIL import Image
from torch import nn

from metagrad import models
from metagrad.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagrad.cli import main
from metagrad.models import create_model
from metagrad.training.config import ConfigError, build_config
from metagrad.training.run_files import CHECKPOINT
from metagrad.training.trainer import Trainer, train

POISON_AT_STEP = 25  # in epoch 2 (22 steps an epoch)


class _PoisonGradient(torch.autograd.Function):
    """Identity whose backward returns NaN at one step: a finite loss, a NaN gradient."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _PoisonGradient.calls += 1
        return grad * float("nan") if _PoisonGradient.calls == POISON_AT_STEP else grad


class _Poisoned(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem, self.features, self.classifier = inner.stem, inner.features, inner.classifier
        self.pool = inner.pool

    def forward(self, x):
        x = self.pool(self.features(self.stem(x))).flatten(1)
        return self.classifier(_PoisonGradient.apply(x))


def poisoned_cnn(**kwargs) -> nn.Module:
    """small_cnn with a NaN gradient (and a finite loss) at step POISON_AT_STEP."""
    return _Poisoned(create_model("small_cnn", **kwargs))


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned_cnn`` in the model registry for one test; the poison counter reset."""
    monkeypatch.setitem(models.MODELS, "poisoned_cnn", poisoned_cnn)
    _PoisonGradient.calls = 0


def _cfg(out: Path, **overrides):
    return build_config({**DIGITS, "out": str(out), **overrides})


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(name: str):
        raise ValueError(f"{path} holds {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _finite_model(path: Path) -> bool:
    state = load_checkpoint(path)
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["plain", "metagrad"])
def test_a_nan_gradient_stops_the_run_before_it_reaches_the_weights(tmp_path, method, poisoned):
    out = tmp_path / "run"
    cfg = _cfg(out, model="poisoned_cnn", epochs=2, method=method, grad_bits=8)
    with pytest.raises(FloatingPointError, match="before applying them"):
        train(cfg)
    assert _finite_model(out / CHECKPOINT)
    assert load_checkpoint(out / CHECKPOINT)["position"]["epoch"] == 1  # the last good epoch
    assert len(_strict_json_lines(out / "metrics.jsonl")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_step"] == POISON_AT_STEP - 1
    _PoisonGradient.calls = 100  # the poison is spent: the run resumes and finishes
    resumed = _cfg(out, model="poisoned_cnn", epochs=2, method=method, grad_bits=8, resume=True)
    assert train(resumed)["epochs_completed"] == 2


@pytest.mark.parametrize("method", ["plain", "metagrad"])
def test_nonfinite_skip_skips_and_counts_the_step(tmp_path, method, poisoned):
    out = tmp_path / "run"
    cfg = _cfg(out, model="poisoned_cnn", epochs=2, method=method, nonfinite="skip")
    summary = train(cfg)
    assert summary["nonfinite_steps"] == 1 and summary["epochs_completed"] == 2
    assert _finite_model(out / CHECKPOINT)
    records = _strict_json_lines(out / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in records] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) for r in records)


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1, max_steps=3))
    before = (out / CHECKPOINT).read_bytes()
    trainer = Trainer(_cfg(out, epochs=2, resume=True))
    with torch.no_grad():
        trainer.model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"classifier\.weight.*not written"):
        trainer._save()
    trainer.close()
    assert (out / CHECKPOINT).read_bytes() == before


def test_an_unusable_out_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # The data path does not exist either: the output folder is checked first.
    for out in (afile, afile / "run"):
        cfg = _cfg(out, data=str(tmp_path / "missing"))
        with pytest.raises(CheckpointError, match=str(afile)):
            Trainer(cfg)
    code = main(["train", "--data", "digits", "--out", str(afile), "--no-progress"])
    assert code == 2


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    first = Trainer(_cfg(out, epochs=1, max_steps=2))
    with pytest.raises(CheckpointError, match="in use"):
        Trainer(_cfg(out, epochs=1, max_steps=2))
    first.fit()  # releases the lock at the end
    assert not (out / ".lock").exists()
    (out / ".checkpoint.pt.k1ll3dzz").write_bytes(b"torn")  # left by a killed run
    train(_cfg(out, epochs=1, max_steps=3, resume=True))
    assert not (out / ".checkpoint.pt.k1ll3dzz").exists()


def test_resume_restores_the_runs_own_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", "small_cnn", "--data", "digits", "--batch-size", "64"]
    args += ["--lr", "0.05", "--grad-bits", "4", "--epochs", "1", "--compile", "off"]
    assert main([*args, "--max-steps", "3", "--out", out, "--no-progress"]) == 0
    # Only the resumable settings are typed again.
    assert main(["train", "--resume", "--out", out, "--max-steps", "5", "--no-progress"]) == 0
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["steps"] == 5
    assert (summary["config"]["lr"], summary["config"]["grad_bits"]) == (0.05, 4)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", out, "--lr", "0.1"]) == 2
    assert "lr (saved 0.05, given 0.1)" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", out, "--lr", "0.05", "--no-progress"]) == 0


def _image_folder(root: Path, classes: int) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_resume_with_another_dataset_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--model", "small_cnn", "--batch-size", "8", "--compile", "off"]
    first = _image_folder(tmp_path / "three", 3)
    args = [*base, "--data", str(first), "--max-steps", "2", "--out", out, "--no-progress"]
    assert main(args) == 0
    other = _image_folder(tmp_path / "five", 5)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", out, "--data", str(other)]) == 2
    assert "dataset differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("position"), "lacks 'position'"),
        (lambda s: s.update(position={"epoch": "one", "batch": 0, "step": 0}), "damaged"),
        (lambda s: s["position"].update(batch=10**6), "out of range"),
        (lambda s: s["model"].pop("classifier.weight"), "damaged"),
    ],
    ids=["missing-key", "wrong-type", "out-of-range", "missing-weight"],
)
def test_hand_edited_checkpoints_give_one_line_errors(tmp_path, capsys, edit, message):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1, max_steps=2))
    state = load_checkpoint(out / CHECKPOINT)
    edit(state)
    save_checkpoint(state, out / CHECKPOINT)
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_comm_and_nonfinite_settings_are_rejected():
    with pytest.raises(ConfigError, match="nonfinite must be one of"):
        build_config({"nonfinite": "ignore"})
    with pytest.raises(ConfigError, match="comm_bits must be one of"):
        build_config({"comm_bits": 2})


def test_download_into_an_existing_empty_directory_downloads(tmp_path, monkeypatch):
    import functools

    from test_data import _served_release

    from metagrad import data
    from metagrad.training import tasks

    url, md5, _ = _served_release(tmp_path)
    monkeypatch.setattr(
        tasks, "download_cifar10", functools.partial(data.download_cifar10, url=url, md5=md5)
    )
    empty = tmp_path / "cifar"
    empty.mkdir()
    dataset = tasks.load_dataset(build_config({"data": str(empty), "download": True}))
    assert len(dataset.classes) >= 2 and (empty / "cifar-10-python.tar.gz").is_file()


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the model (weights and buffers) and of the optimizer state."""
    tensors = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value.clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("optimizer", trainer.optimizer.state_dict())
    return tensors


@pytest.mark.parametrize("method", ["plain", "metagrad"])
def test_skipped_steps_change_no_weight_state_or_buffer(tmp_path, method):
    """A learning rate of 1000 makes most steps non-finite, some through the batch-norm
    statistics of a finite forward pass: every skipped step leaves the model's weights and
    buffers and the optimizer's state exactly as they were, and the run ends with a finite
    checkpoint."""
    cfg = build_config(
        {**DIGITS, "batch_size": 32, "epochs": 2, "lr": 1000.0, "nonfinite": "skip",
         "method": method, "out": str(tmp_path / "run")}
    )  # fmt: skip
    trainer = Trainer(cfg)
    step = trainer.train_step
    skipped = 0

    def checked(x, y, n):
        nonlocal skipped
        before = _state(trainer)
        result = step(x, y, n)
        if result is None:
            skipped += 1
            after = _state(trainer)
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), trainer.step
        return result

    trainer.train_step = checked
    summary = trainer.fit()
    assert skipped > 10 and summary["nonfinite_steps"] == skipped
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_stop_with_no_checkpoint_yet_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "small_cnn", "--data", "digits", "--batch-size", "32"]
    argv += ["--compile", "off", "--no-progress", "--lr", "1000", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint was written yet in {out}" in err
    assert "keeps the last good state" not in err
