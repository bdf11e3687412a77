"""quantize_ again, per-layer None and unquantize_; what quantize_ accepts as a config."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad.nn import convert, coverage
from metagrad.nn.convert import ConversionWarning
from metagrad.quant.presets import preset_config

FOUR = mg.QuantConfig(grad=mg.QuantSpec(bits=4))
EIGHT = mg.QuantConfig(grad=mg.QuantSpec(bits=8))


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    monkeypatch.setattr(convert, "_HANDLERS", convert._HANDLERS.copy())
    monkeypatch.setattr(coverage, "_NON_MATMUL", coverage._NON_MATMUL.copy())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1
        )
        self.classifier = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.features(x).view(x.shape[0], -1, 8)))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        return fn(*args, **kwargs)


def _snapshot(model: nn.Module) -> list:
    return [
        (name, type(m), getattr(m, "config", None), dict(m._parameters), dict(m._modules))
        for name, m in model.named_modules()
    ]


def test_quantize_again_with_the_same_config_changes_nothing():
    model = Net()
    first = _quiet(mg.quantize_, model, FOUR)
    before = _snapshot(model)
    again = _quiet(mg.quantize_, model, FOUR)
    assert _snapshot(model) == before
    assert again.already_converted == {
        name: type(model.get_submodule(name)).__name__ for name in first.converted
    }
    assert again.converted == {} and again.unconverted == {} and again.restored == {}
    assert again.already_converted["classifier"] == "QuantLinear"
    assert isinstance(model.encoder.layers[0], nn.TransformerEncoderLayer)
    assert not model.encoder.use_nested_tensor


def test_a_none_config_turns_a_converted_module_back_with_its_parameters_and_hooks():
    model = Net()
    original_type = type(model.classifier)
    mg.quantize_(model, FOUR)
    head = model.classifier
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    weight, bias = head.weight, head.bias
    report = _quiet(mg.quantize_, model, {"classifier": None, "*": EIGHT})
    assert type(model.classifier) is original_type and not hasattr(model.classifier, "config")
    assert model.classifier.weight is weight and model.classifier.bias is bias
    assert report.restored == {"classifier": "NonDynamicallyQuantizableLinear"}
    assert report.unconverted == {"classifier": "excluded by config"}
    assert model.features[0].config == EIGHT  # the others take the new config
    model(torch.randn(2, 3, 6, 6))
    assert calls == [original_type]


def test_a_none_config_on_attention_turns_its_output_projection_back_too():
    model = Net()
    mg.quantize_(model, FOUR)
    report = _quiet(mg.quantize_, model, {"encoder.layers.0.self_attn": None, "*": FOUR})
    attention = model.encoder.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(report.restored) == {
        "encoder.layers.0.self_attn",
        "encoder.layers.0.self_attn.out_proj",
    }


def test_unquantize_turns_every_converted_module_back():
    original = Net().eval()
    model = copy.deepcopy(original)
    params = list(model.parameters())
    mg.quantize_(model, FOUR)
    report = mg.unquantize_(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == [
        (n, type(m)) for n, m in original.named_modules()
    ]
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert "classifier" in report.restored and "encoder.layers.0.linear1" in report.restored
    assert model.encoder.use_nested_tensor == original.encoder.use_nested_tensor
    assert not any(
        hasattr(m, "config") or hasattr(m, "_metagrad_original") for m in model.modules()
    )
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    with pytest.raises(ValueError, match="MetaGrad needs a model with quantized layers"):
        mg.MetaGrad(model, 0.1)
    assert mg.unquantize_(model).restored == {}
    with pytest.raises(ValueError, match="wrap a bare layer"):
        mg.unquantize_(mg.QuantLinear(2, 2))


def test_quantized_layers_built_directly_turn_back_into_their_base():
    model = nn.Sequential(mg.QuantLinear(4, 4, config=FOUR), mg.QuantMultiheadAttention(4, 2))
    report = mg.unquantize_(model)
    assert [type(m) for m in model] == [nn.Linear, nn.MultiheadAttention]
    assert type(model[1].out_proj) is nn.Linear
    assert report.restored == {"0": "Linear", "1": "MultiheadAttention", "1.out_proj": "Linear"}


def test_a_preset_name_is_a_config():
    model = Net()
    mg.quantize_(model, "rht-nvfp4")
    assert model.classifier.config == preset_config("rht-nvfp4")
    mg.quantize_(model, {"classifier": "luq", "*": FOUR})
    assert model.classifier.config == preset_config("luq")
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    with pytest.raises(ValueError, match="unknown gradient preset 'int4'; available: plain"):
        mg.quantize_(Net(), "int4")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (mg.QuantSpec(bits=4), r"quantize_'s config is a QuantSpec .*QuantConfig\(grad=spec\)"),
        ({"*": mg.QuantSpec(bits=4)}, r"the config for '\*' is a QuantSpec"),
        (4, r"must be a QuantConfig, a preset name \(plain, .*\) or a mapping .*got int"),
        ([FOUR], "got list"),
    ],
)
def test_anything_else_is_refused_before_converting(config, message):
    model = Net()
    with pytest.raises(TypeError, match=message):
        mg.quantize_(model, config)
    assert not any(isinstance(m, mg.QuantLinear) for m in model.modules())


def test_modules_holding_weights_no_handler_knows_are_reported():
    class Gate(nn.Module):  # multiplies by its weight: no handler, no declaration
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.scale = nn.Parameter(torch.ones(4))  # 1-D: not a matmul weight

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Parameter(torch.randn(3, 4))

    model = nn.Sequential(
        Gate(), Table(), nn.Embedding(3, 4), nn.LayerNorm((2, 4)), nn.BatchNorm1d(4)
    )
    with pytest.warns(ConversionWarning, match="Gate, which holds 'weight'"):
        report = mg.quantize_(model, FOUR)
    assert report.unconverted == {
        "0": "no handler for Gate, which holds 'weight' (2-D)",
        "1": "no handler for Table, which holds 'rows' (2-D)",
    }
    assert report.not_applicable == {"2": "Embedding", "3": "LayerNorm"}
    mg.register_non_matmul(Table, "rows")
    report = _quiet(mg.quantize_, model, {"0": None, "*": FOUR})
    assert report.unconverted == {"0": "excluded by config"}
    assert report.not_applicable == {"1": "Table", "2": "Embedding", "3": "LayerNorm"}


def test_public_names_and_the_typed_marker():
    import tomllib
    from pathlib import Path

    from metagrad.quant import presets

    assert mg.preset_config is presets.preset_config and mg.list_presets is presets.list_presets
    assert mg.unquantize_ is convert.unquantize_ and "rht-nvfp4" in mg.list_presets()
    assert (Path(mg.__file__).parent / "py.typed").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["metagrad"]
