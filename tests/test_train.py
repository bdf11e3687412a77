import json
import os
from pathlib import Path

import pytest
import torch
from digits_run import DIGITS

from metagrad import kernels
from metagrad.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagrad.cli import main
from metagrad.training.config import ConfigError, build_config, read_config_file
from metagrad.training.setup import build_model
from metagrad.training.tasks import load_dataset
from metagrad.training.trainer import train

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


def _cfg(out: Path, **overrides):
    return build_config({**DIGITS, "out": str(out), **overrides})


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flags_override_a_yaml_or_toml_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: resnet20\ngrad-bits: 4\nlr: 1\n")
    (tmp_path / "c.toml").write_text('model = "resnet20"\ngrad_bits = 4\n')
    for name in ("c.yaml", "c.toml"):
        cfg = build_config({"grad_bits": 8}, read_config_file(tmp_path / name))
        assert (cfg.model, cfg.grad_bits) == ("resnet20", 8)
    assert build_config({}, read_config_file(tmp_path / "c.yaml")).lr == 1.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grad_bits": 33}, "bits must be 2..8"),
        ({"grad_rounding": "up"}, "rounding must be one of"),
        ({"grad_granularity": "row"}, "grad_granularity must be one of"),
        ({"model": "vgg99"}, "model must be one of"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"lr": "fast"}, "lr must be a float"),
        ({"learning_rate": 0.1}, "unknown setting"),
        ({"method": "meta"}, "method must be one of"),
    ],
)
def test_bad_settings_are_rejected_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_a_broken_config_file_names_itself(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    code = main(["train", "--data", "digits", "--grad-bits", "0", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("metagrad: error: bits must be 2..8")
    assert len(err.strip().splitlines()) == 1
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_train_writes_metrics_summary_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(out, epochs=2, grad_bits=4, grad_rounding="stochastic"))
    history = _records(out / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2]
    for key in ("train_loss", "train_acc", "test_acc", "seconds", "lr"):
        assert all(key in r for r in history)
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert summary["config"]["grad_bits"] == 4
    assert summary["quantized_layers"] == 4
    coverage = summary["quantization_coverage"]
    assert len(coverage["converted"]) == 4 and coverage["unconverted"] == {}
    assert summary["final_test_acc"] == history[-1]["test_acc"]
    assert summary["best_test_acc"] >= summary["final_test_acc"]
    assert summary["mean_step_seconds"] > 0 and summary["peak_memory_mb"] > 0
    assert load_checkpoint(out / "checkpoint.pt")["position"]["epoch"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_the_model_records_its_quantization_coverage(tmp_path):
    cfg = _cfg(tmp_path / "run", fp_first_last=True)
    model = build_model(cfg, load_dataset(cfg), torch.device("cpu"))
    coverage = model.quantization_coverage
    assert coverage["unconverted"] == {
        "stem.0": "excluded by filter",
        "classifier": "excluded by filter",
    }
    assert len(coverage["converted"]) == 2


def test_a_diverging_run_stops_with_a_clear_error_and_a_summary(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "small_cnn", "--lr", "1e6", "--epochs", "2"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metagrad: error: non-finite loss") and "\n" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_step"] >= 1 and summary["final_test_acc"] is None
    if (out / "checkpoint.pt").exists():  # only completed epochs are checkpointed
        model = load_checkpoint(out / "checkpoint.pt")["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_training_learns_the_digits(tmp_path):
    summary = train(_cfg(tmp_path / "run", epochs=3, lr=0.05, batch_size=32))
    assert summary["final_test_acc"] > 80


def test_resume_after_max_steps_reproduces_an_uninterrupted_run(tmp_path):
    settings = {"epochs": 2, "grad_bits": 4, "grad_rounding": "stochastic"}
    straight_summary = train(_cfg(tmp_path / "straight", **settings))
    first = train(_cfg(tmp_path / "split", max_steps=30, **settings))  # stops inside epoch 2
    assert first["stopped_early"] and first["steps"] == 30
    partial = _records(tmp_path / "split" / "metrics.jsonl")
    assert partial[-1]["partial"] is True
    resumed = train(_cfg(tmp_path / "split", resume=True, **settings))
    assert resumed["steps"] == straight_summary["steps"] > 30
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    drop = {"seconds"}
    straight = [{k: v for k, v in r.items() if k not in drop} for r in a["history"]]
    split = [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]
    assert straight == split


def test_existing_runs_are_never_overwritten_and_resume_checks_settings(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1, max_steps=3))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(out, epochs=1))
    with pytest.raises(CheckpointError, match=r"settings differ.*lr"):
        train(_cfg(out, epochs=1, lr=0.5, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(tmp_path / "empty", resume=True))


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path):
    out = tmp_path / "run"
    settings = {"epochs": 1, "grad_bits": 4, "method": "metagrad"}
    train(_cfg(out, max_steps=3, **settings))
    state = load_checkpoint(out / "checkpoint.pt")
    del state["config"]["hyper_form"]  # as written before the setting existed
    save_checkpoint(state, out / "checkpoint.pt")
    assert train(_cfg(out, resume=True, max_steps=5, **settings))["steps"] == 5
    with pytest.raises(CheckpointError, match=r"hyper_form: 'residual' -> 'gain'"):
        train(_cfg(out, resume=True, hyper_form="gain", **settings))


def test_cli_train_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)]
    args += ["--compile", "off"]
    assert main([*args, "--grad-bits", "8", "--no-progress"]) == 0
    assert "final test acc" in capsys.readouterr().out
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "-o", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_demo_runs_every_setting_side_by_side(tmp_path, capsys):
    from metagrad.demo import DEMO_RUNS, run_demo

    results = run_demo(out=str(tmp_path / "demo"), epochs=1, seeds=1)
    assert [r["run"] for r in results] == [label for label, _ in DEMO_RUNS]
    assert (tmp_path / "demo" / "demo.json").is_file()
    assert (tmp_path / "demo" / "demo.png").is_file()
    assert "vs fp32" in capsys.readouterr().out


@pytest.mark.slow
def test_train_command_on_the_shared_cifar10_zip(tmp_path, monkeypatch):
    if not SHARED_ZIP.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the shared CIFAR-10 zip at {SHARED_ZIP}")
        pytest.skip(f"shared CIFAR-10 zip not found at {SHARED_ZIP}")
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cifar"
    # The command contract, shortened to 20 steps.
    args = ["train", "--model", "vgg16", "--width", "0.25", "--data", str(SHARED_ZIP)]
    args += ["--grad-bits", "4", "--grad-rounding", "stochastic", "--grad-granularity", "tensor"]
    args += ["--epochs", "4", "--batch-size", "128", "--lr", "0.1", "--seed", "0"]
    args += ["--out", str(out), "--no-progress"]
    assert main([*args, "--max-steps", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["stopped_early"]
    # The defaults: compiled kernels wherever torch.compile works, no autocast on the CPU.
    assert summary["compile"] == ("kernels" if kernels.available("cpu")[0] else "off")
    assert summary["amp"] == "off" and summary["provenance"]["device"] == "cpu"
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoint.pt").is_file()
    assert main([*args, "--max-steps", "25", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 25


def test_metagrad_runs_from_the_command_line_and_records_its_settings(tmp_path):
    out = tmp_path / "mg"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)]
    args += ["--compile", "off"]
    args += ["--grad-bits", "3", "--method", "metagrad", "--hyper", "grad+weight"]
    args += ["--hyper-hidden", "4", "--hyper-lr", "1e-3", "--diag-every", "5", "--no-progress"]
    assert main([*args, "--hyper-form", "gain"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hypernet"]["kind"] == "grad+weight" and summary["hypernet"]["hidden"] == 4
    assert summary["hypernet"]["form"] == "gain"
    assert 0 < summary["hyper_share_of_step_time"] < 1
    records = _records(out / "gradients.jsonl")
    assert [r["step"] for r in records] == [5, 10]
    layer = next(iter(records[-1]["layers"].values()))
    assert set(layer) == {"quantized", "used", "correction"}
    assert records[-1]["mean_correction"] > 0  # the hypernetwork trained away from the identity


def test_gradient_diagnostics_measure_quantization_without_changing_the_run(tmp_path):
    settings = {"epochs": 1, "grad_bits": 4, "grad_rounding": "stochastic", "max_steps": 12}
    train(_cfg(tmp_path / "plain", **settings))
    train(_cfg(tmp_path / "diag", diag_every=4, **settings))
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "diag" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = _records(tmp_path / "diag" / "gradients.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert r["mean_used"] == r["mean_quantized"]  # plain training uses the quantized gradient
        assert r["mean_correction"] == 0
        assert 0.5 < r["mean_quantized"]["cosine"] < 1.0
        assert 0 < r["mean_quantized"]["rel_error"] < 1.0


def test_int8_backend_trains_and_reports_its_fallbacks(tmp_path):
    summary = train(_cfg(tmp_path / "int8", epochs=1, grad_bits=4, backend="int8", max_steps=5))
    assert summary["backend"] == "int8"
    assert summary["int8_fallbacks"] == {}  # small_cnn has no grouped convolutions
    settings = {"grad_bits": 4, "backend": "int8", "method": "metagrad", "max_steps": 5}
    summary = train(_cfg(tmp_path / "int8-mg", epochs=1, weight_bits=8, act_bits=8, **settings))
    assert summary["steps"] == 5 and summary["hypernet"]["kind"] == "grad+weight"
    summary = train(
        build_config(
            {
                "model": "mobilenetv2",
                "width": 0.25,
                "data": "digits",
                "grad_bits": 4,
                "backend": "int8",
                "max_steps": 1,
                "progress": False,
                "out": str(tmp_path / "mnv2"),
            }
        )
    )
    assert summary["int8_fallbacks"]
    assert all("group" in reason for reason in summary["int8_fallbacks"].values())


def test_metagrad_composes_with_a_preset_chosen_by_name(tmp_path):
    """--grad-quant selects a published quantizer; summary.json records every resolved spec."""
    out = tmp_path / "preset"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)]
    args += ["--compile", "off", "--max-steps", "6", "--no-progress", "--diag-every", "3"]
    assert main([*args, "--grad-quant", "rht-nvfp4", "--method", "metagrad"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["grad_quant"] == "rht-nvfp4"
    spec = summary["quantization_spec"]
    assert spec["path"] == "emulated"
    assert spec["grad_for_input_grad"]["format"] == "fp4_e2m1"
    assert spec["grad_for_input_grad"]["transform"] is None
    assert spec["grad_for_weight_grad"]["transform"] == "rht"
    assert spec["grad_for_weight_grad"]["scale_format"] == "e4m3"
    records = _records(out / "gradients.jsonl")
    assert 0.5 < records[-1]["mean_used"]["cosine"] < 1.0  # quantized, yet close to fp32
