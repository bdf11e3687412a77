"""Every spec from the command line and config files: --grad-spec and the per-product specs,
their composition with --grad-quant and the bits flags, --plugin, and --resume."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from metagrad.cli import build_parser, main
from metagrad.meta.updates import BASE_RULES
from metagrad.quant import formats, presets
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.spec import QuantSpec
from metagrad.training.config import ConfigError, build_config, read_config_file

DIGITS = {"model": "small_cnn", "data": "digits", "compile": "off", "progress": False}
RUN = ["train", "--model", "small_cnn", "--data", "digits", "--compile", "off", "--no-progress"]
RUN += ["--epochs", "1", "--batch-size", "64", "--threads", "1"]


def _config(**settings):
    return build_config({**DIGITS, **settings})


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------ config level


@pytest.mark.parametrize(
    ("specs", "bits"),
    [
        ({"grad_spec": "int4:stochastic"}, {"grad_bits": 4}),
        (
            {"grad_spec": "int4:sample"},
            {"grad_bits": 4, "grad_rounding": "nearest", "grad_granularity": "sample"},
        ),
        ({"grad_spec": "int8:channel:stochastic"}, {"grad_bits": 8, "grad_granularity": "channel"}),
        ({"grad_spec": "fp32"}, {}),
        ({"weight_spec": "int8:channel", "act_spec": "int8"}, {"weight_bits": 8, "act_bits": 8}),
    ],
)
def test_a_spec_gives_the_config_of_the_bits_settings(specs, bits):
    assert _config(**specs).quant_config() == _config(**bits).quant_config()


@pytest.mark.parametrize("name", list_presets())
def test_specs_spell_out_every_preset(name):
    preset = preset_config(name)
    specs = {"grad_spec": str(preset.grad)}
    if preset.grad_for_weight_grad is not None:
        specs["grad_spec_wgrad"] = str(preset.grad_for_weight_grad)
    assert _config(**specs).quant_config() == _config(grad_quant=name).quant_config()


def test_operand_specs_compose_with_a_preset():
    config = _config(grad_quant="rht-mxfp4", input_spec_wgrad="int8", weight_spec_dgrad="fp8_e4m3")
    quant = config.quant_config()
    assert quant.grad == preset_config("rht-mxfp4").grad
    assert quant.input_for_weight_grad == QuantSpec(bits=8)
    assert quant.weight_for_input_grad == QuantSpec(format="fp8_e4m3")


def test_spec_settings_are_kept_in_their_canonical_form():
    config = _config(grad_spec=" int4 : tensor : stochastic ", grad_spec_wgrad="off")
    assert (config.grad_spec, config.grad_spec_wgrad) == ("int4:stochastic", "fp32")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grad_spec": "int4", "grad_bits": 4}, "grad_spec 'int4' replaces grad_bits; grad_bits 4"),
        (
            {"grad_spec": "int4", "grad_granularity": "sample"},
            "grad_spec 'int4' replaces grad_granularity",
        ),
        ({"weight_spec": "int8", "weight_bits": 4}, "weight_spec 'int8' replaces weight_bits"),
        ({"act_spec": "int8", "act_bits": 8}, "act_spec 'int8' replaces act_bits"),
        (
            {"grad_quant": "luq", "grad_spec": "int4"},
            "grad_quant 'luq' fixes the gradient quantizer; grad_spec 'int4' would be ignored",
        ),
        (
            {"grad_quant": "psq", "grad_spec_wgrad": "int8"},
            "grad_quant 'psq' fixes the gradient quantizer; grad_spec_wgrad 'int8'",
        ),
        ({"grad_spec": "int4:fast"}, r"^grad_spec: spec 'int4:fast': unknown option 'fast'"),
        ({"grad_spec_wgrad": "int9"}, r"^grad_spec_wgrad: spec 'int9': unknown number format"),
        ({"weight_spec": "fp8_e4m3", "grad_bits": 4, "backend": "int8"}, "takes integer specs"),
        ({"grad_spec": "fp4_e2m1:block32", "backend": "int8"}, "backend 'int8' takes integer"),
        ({"grad_bits": 4, "input_spec_wgrad": "int8", "backend": "int8"}, "no per-product specs"),
        ({"plugins": ["metagrad_no_such_plugin"]}, "plugin 'metagrad_no_such_plugin' could not"),
        ({"plugins": [3]}, "plugins must be a list of names"),
    ],
)
def test_contradictions_and_bad_specs_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        _config(**settings)
    assert "\n" not in str(info.value)


def test_a_config_file_takes_specs_and_a_list_of_plugins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "grad-spec: fp4_e2m1:block32:e8m0-floor:stochastic:rht32\n"
        "input_spec_wgrad: int8\n"
        "plugins: [json, textwrap]\n"
    )
    config = build_config({}, {**DIGITS, **read_config_file(path)})
    assert config.plugins == ["json", "textwrap"]
    assert config.quant_config().grad == preset_config("rht-mxfp4").grad
    toml = tmp_path / "run.toml"
    toml.write_text('plugins = "json"\ngrad_spec = "int4:sample:stochastic"\n')
    config = build_config({}, {**DIGITS, **read_config_file(toml)})
    assert config.plugins == ["json"] and config.grad_spec == "int4:sample:stochastic"


def test_registered_choices_are_accepted_and_named_in_the_help(monkeypatch, capsys):
    monkeypatch.setitem(BASE_RULES, "sgd2", BASE_RULES["sgd"])
    monkeypatch.setattr(presets, "_PRESETS", presets._PRESETS.copy())
    presets.register_preset("int3-sr")(lambda: preset_config("plain"))
    assert _config(optimizer="sgd2", grad_quant="int3-sr").optimizer == "sgd2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(sgd, adam, sgd2)" in text and "fp8-e5m2, int3-sr)" in text
    assert "--plugin MODULE" in text and "--grad-spec SPEC" in text


# ------------------------------------------------------------------------------ command line


def test_cli_trains_with_every_spec_flag_and_resumes_comparing_specs(tmp_path, capsys):
    out = tmp_path / "specs"
    specs = ["--grad-spec", "int4:sample:stochastic", "--grad-spec-wgrad", "fp8_e5m2"]
    specs += ["--weight-spec-dgrad", "int8", "--input-spec-wgrad", "fp8_e4m3:block16:e8m0"]
    specs += ["--weight-spec", "int8:channel", "--act-spec", "int8"]
    assert main([*RUN, *specs, "--max-steps", "2", "--out", str(out)]) == 0
    summary = _summary(out)
    assert summary["config"]["grad_spec"] == "int4:sample:stochastic"
    spec = summary["quantization_spec"]
    assert (spec["grad_for_input_grad"]["granularity"], spec["path"]) == ("sample", "emulated")
    assert spec["grad_for_weight_grad"]["format"] == "fp8_e5m2"
    assert spec["weight_for_input_grad"]["bits"] == 8
    assert spec["input_for_weight_grad"]["block_size"] == 16
    assert spec["weight"]["bits"] == 8 and spec["activation"]["bits"] == 8
    capsys.readouterr()
    # the same spec in other words is the same setting; another spec is refused
    resume = ["train", "--resume", "--out", str(out), "--no-progress"]
    assert main([*resume, "--grad-spec", "int4:stochastic:sample", "--max-steps", "3"]) == 0
    assert _summary(out)["steps"] == 3
    assert main([*resume, "--grad-spec", "int4:stochastic"]) == 2
    err = capsys.readouterr().err
    assert "grad_spec (saved 'int4:sample:stochastic', given 'int4:stochastic')" in err


def test_cli_refuses_a_bad_spec_and_a_bad_plugin_in_one_line(tmp_path, capsys):
    assert main([*RUN, "--grad-spec", "int4:sampel", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metagrad: error: grad_spec: spec 'int4:sampel': unknown option")
    assert "\n" not in err
    assert main([*RUN, "--plugin", "metagrad_no_such_plugin", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "metagrad: error: plugin 'metagrad_no_such_plugin' could not be imported "
        "(ModuleNotFoundError: No module named 'metagrad_no_such_plugin')"
    )


PLUGIN = '''
    """A user's number format and gradient preset."""
    from metagrad.quant import QuantConfig, QuantSpec, register_preset
    from metagrad.quant.formats import FloatFormat, register_format

    register_format("fp6_e3m2", FloatFormat(3, 2))


    @register_preset("fp6-block")
    def fp6_block():
        return QuantConfig(grad=QuantSpec.parse("fp6_e3m2:block32:e8m0:stochastic"))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module on sys.path whose registrations (and import) end with the test."""
    name = "metagrad_test_fp6_plugin"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))

    def forget() -> None:  # as a new process: the module and its registrations gone
        monkeypatch.setattr(formats, "_FORMATS", formats._FORMATS.copy())
        monkeypatch.setattr(presets, "_PRESETS", presets._PRESETS.copy())
        formats._FORMATS.pop("fp6_e3m2", None)
        presets._PRESETS.pop("fp6-block", None)
        sys.modules.pop(name, None)

    forget()
    yield name, forget
    forget()


def test_a_plugin_registers_a_format_and_a_preset_that_train_by_name(plugin, tmp_path):
    name, forget = plugin
    out, spec_out = tmp_path / "preset", tmp_path / "spec"
    assert main([*RUN, "--grad-quant", "fp6-block", "--out", str(out), "--max-steps", "2"]) == 2
    args = ["--plugin", name, "--grad-quant", "fp6-block", "--max-steps", "2"]
    assert main([*RUN, *args, "--out", str(out)]) == 0
    summary = _summary(out)
    assert summary["config"]["plugins"] == [name]
    assert summary["quantization_spec"]["grad_for_input_grad"]["format"] == "fp6_e3m2"
    # the format alone, by name in a spec; plugins given twice import once
    args = ["--plugin", name, "--plugin", name, "--grad-spec", "fp6_e3m2:channel:stochastic"]
    assert main([*RUN, *args, "--max-steps", "1", "--out", str(spec_out)]) == 0
    assert _summary(spec_out)["quantization_spec"]["grad_for_input_grad"]["format"] == "fp6_e3m2"
    # --resume imports the run's plugins again (a new process would not have them)
    forget()
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 0
    assert _summary(out)["steps"] == 3
