"""quantize_: handlers by type, coverage report, per-layer configs."""

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import (
    ConversionReport,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    QuantSpec,
    quantize,
    quantize_,
    register_handler,
    register_non_matmul,
)
from metagrad.nn import convert, coverage
from metagrad.nn import functional as QF
from metagrad.nn.convert import ConversionWarning
from metagrad.nn.coverage import ATTENTION_SCORES
from metagrad.nn.layers import twin

FULL = QuantConfig(grad=QuantSpec())
FOUR = QuantConfig(grad=QuantSpec(bits=4))
EIGHT = QuantConfig(grad=QuantSpec(bits=8))


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Handlers and non-matmul types registered by a test stay in that test."""
    monkeypatch.setattr(convert, "_HANDLERS", convert._HANDLERS.copy())
    monkeypatch.setattr(coverage, "_NON_MATMUL", coverage._NON_MATMUL.copy())


def _no_conversion_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        return fn(*args, **kwargs)


def _one_warning(fn, *args, **kwargs):
    with pytest.warns(ConversionWarning) as record:
        result = fn(*args, **kwargs)
    assert len([w for w in record if issubclass(w.category, ConversionWarning)]) == 1
    return result, str(record[0].message)


# ------------------------------------------------------------------------------ handlers


class Scale(nn.Module):
    """A module type of the user's: ``y = x @ weight.T``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return x @ self.weight.T


class QuantScale(Scale):
    def forward(self, x):
        return QF.linear(x, self.weight, config=self.config)


def _register_scale():
    @register_handler(Scale)
    def _(module, config):
        new = twin(module, QuantScale)
        new.config = config
        return new


def test_a_user_registered_handler_converts_its_type_and_keeps_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(Scale(4), nn.Linear(4, 2))
    weight = model[0].weight
    _register_scale()
    report = _no_conversion_warning(quantize_, model, FOUR)
    assert report.converted == {"0": "Scale", "1": "Linear"}
    assert isinstance(model[0], QuantScale) and model[0].weight is weight
    assert model[0].config == FOUR
    x = torch.randn(3, 4)
    torch.testing.assert_close(model[0](x), x @ weight.T)


def test_an_unregistered_custom_module_is_not_a_matmul():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4), nn.ReLU())
    report = _no_conversion_warning(quantize_, model, FOUR)
    assert report.converted == {"0": "Linear"} and report.unconverted == {}


def test_subclasses_are_converted_by_their_base_handler():
    class MyLinear(nn.Linear):
        pass

    class MyConv(nn.Conv2d):
        def extra_repr(self) -> str:
            return "mine"

    non_dynamic = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)
    model = nn.Sequential(MyLinear(4, 4), non_dynamic, MyConv(1, 1, 1))
    report = _no_conversion_warning(quantize_, model, FOUR)
    assert report.converted == {
        "0": "MyLinear",
        "1": "NonDynamicallyQuantizableLinear",
        "2": "MyConv",
    }
    assert [type(m) for m in model] == [QuantLinear, QuantLinear, QuantConv2d]


def test_a_subclass_overriding_forward_is_reported_until_it_has_its_own_handler():
    class Gated(nn.Linear):
        def forward(self, x):
            return super().forward(x) * torch.sigmoid(x)

    class OwnConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight.abs(), bias)

    model = nn.Sequential(Gated(4, 4), nn.Linear(4, 4))
    report, message = _one_warning(quantize_, model, FOUR)
    assert report.unconverted == {"0": "overrides forward; register a handler for Gated"}
    assert "0 (overrides forward; register a handler for Gated)" in message
    assert type(model[0]) is Gated and isinstance(model[1], QuantLinear)

    conv = nn.Sequential(OwnConv(1, 1, 1))
    report, _ = _one_warning(quantize_, conv, FOUR)
    assert report.unconverted == {"0": "overrides _conv_forward; register a handler for OwnConv"}

    register_handler(Gated)(lambda module, config: module)
    report = _no_conversion_warning(quantize_, model, FOUR)
    assert report.converted == {"0": "Gated"}
    assert report.already_converted == {"1": "QuantLinear"}


def test_a_handler_may_decline():
    register_handler(nn.Bilinear)(lambda module, config: None)
    report, _ = _one_warning(quantize_, nn.Sequential(nn.Bilinear(2, 2, 2)), FOUR)
    assert report.unconverted == {"0": "declined by the handler for Bilinear"}


def test_converted_layers_keep_parameters_hooks_and_sharing():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    calls = []
    shared.register_forward_hook(lambda m, i, o: calls.append(1))
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = quantize_(model, FOUR)
    assert list(report.converted) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], QuantLinear)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    before = shared.weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert len(calls) == 2 and not torch.equal(before, model[0].weight)


def test_a_bare_layer_cannot_be_converted_in_place():
    with pytest.raises(ValueError, match="inside a model"):
        quantize_(nn.MultiheadAttention(4, 2))
    assert isinstance(quantize(nn.Sequential(nn.MultiheadAttention(4, 2)), FOUR)[0], nn.Module)
    encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    assert len(_no_conversion_warning(quantize_, encoder, FOUR).converted) == 4


# ----------------------------------------------------------------------------- coverage


def _transformer_encoder(layers: int = 2, **kwargs) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, **kwargs)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _projections(prefix: str, attention: tuple[str, ...]) -> set[str]:
    names = {f"{prefix}.linear1", f"{prefix}.linear2"}
    for a in attention:
        names |= {f"{prefix}.{a}", f"{prefix}.{a}.out_proj"}
    return names


def test_transformer_encoder_and_decoder_are_fully_covered():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": _transformer_encoder(),
            "decoder": nn.TransformerDecoder(
                nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2
            ),
        }
    )
    report = _no_conversion_warning(quantize_, model, FOUR)
    expected = set()
    for i in range(2):
        expected |= _projections(f"encoder.layers.{i}", ("self_attn",))
        expected |= _projections(f"decoder.layers.{i}", ("self_attn", "multihead_attn"))
    assert set(report.converted) == expected and len(expected) == 2 * 4 + 2 * 6
    assert report.unconverted == {}
    assert report.converted["encoder.layers.0.self_attn"] == "MultiheadAttention"
    assert report.converted["encoder.layers.0.self_attn.out_proj"] == (
        "NonDynamicallyQuantizableLinear"
    )
    assert isinstance(model["decoder"].layers[1].multihead_attn, QuantMultiheadAttention)


class TinyGPT(nn.Module):
    """Token embedding, causal pre-norm transformer blocks, linear head."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 2, context: int = 8):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = _transformer_encoder(layers, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        x = self.tokens(idx) + self.position[:, :length]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def test_a_gpt_like_model_is_fully_covered_and_trains():
    torch.manual_seed(0)
    report, message = _one_warning(quantize_, TinyGPT(), FOUR)  # its raw position parameter
    assert report.gaps == {"": "no handler for TinyGPT, which holds 'position' (3-D)"}
    assert "<model> (no handler for TinyGPT" in message
    register_non_matmul(TinyGPT, "position")  # added to the tokens, never multiplied by
    original = TinyGPT()
    idx = torch.randint(0, 32, (4, 8))
    full = quantize(original, FULL)
    torch.testing.assert_close(full(idx), original(idx))

    model = TinyGPT()
    report = _no_conversion_warning(quantize_, model, FOUR)
    expected = {"head"}
    for i in range(2):
        expected |= _projections(f"blocks.layers.{i}", ("self_attn",))
    assert set(report.converted) == expected and report.unconverted == {}
    assert report.not_applicable == {"": "TinyGPT", "tokens": "Embedding"}
    logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.up = nn.ConvTranspose2d(1, 1, 2)
        self.head = nn.Linear(4, 2)


def test_unsupported_matmuls_are_reported_with_one_warning():
    model = Mixed()
    report, message = _one_warning(quantize_, model, FOUR)
    assert report.converted == {"head": "Linear"}
    assert report.unconverted == {
        "conv": "no handler for Conv1d",
        "rnn": "no handler for LSTM",
        "up": "no handler for ConvTranspose2d",
    }
    assert "3 module(s) with weights of 2 or more dimensions" in message
    assert "rnn (no handler for LSTM)" in message
    excluded = quantize_(Mixed(), FOUR, filter_fn=lambda m, name: name == "head")
    assert report.gaps and not excluded.gaps  # explicit exclusions do not warn


def test_the_warning_names_at_most_a_few_modules():
    model = nn.Sequential(*[nn.Conv1d(1, 1, 1) for _ in range(15)])
    report, message = _one_warning(quantize_, model, FOUR)
    assert len(report.unconverted) == 15 and "and 5 more" in message


def test_an_excluded_attention_keeps_its_output_projection():
    model = _transformer_encoder(1)
    report = quantize_(model, FOUR, filter_fn=lambda m, name: not name.endswith("self_attn"))
    attention = model.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention and type(attention.out_proj) is not QuantLinear
    assert report.unconverted == {
        "layers.0.self_attn": "excluded by filter",
        "layers.0.self_attn.out_proj": "excluded by filter",
    }
    assert set(report.converted) == {"layers.0.linear1", "layers.0.linear2"}


def test_an_encoder_layer_with_its_own_forward_is_reported():
    class MyLayer(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs)

    class Plain(nn.TransformerEncoderLayer):
        pass

    model = nn.Sequential(MyLayer(8, 2, 16, batch_first=True), Plain(8, 2, 16, batch_first=True))
    report, message = _one_warning(quantize_, model, FOUR)
    assert list(report.unconverted) == ["0"] and "register a handler for MyLayer" in message
    assert type(model[0]) is MyLayer
    assert isinstance(model[1], Plain) and type(model[1]).__name__ == "UnfusedPlain"


def test_report_formats():
    report, _ = _one_warning(quantize_, Mixed(), FOUR, filter_fn=lambda m, name: name != "rnn")
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["unconverted"]["rnn"] == "excluded by filter"
    assert data["attention_scores"] == report.attention_scores
    text = str(report)
    assert text.splitlines()[0] == "1 converted, 3 unconverted"
    assert "head" in text and "no handler for Conv1d" in text
    assert text.splitlines()[-1] == f"attention scores (QK^T, PV): {ATTENTION_SCORES}"
    assert str(ConversionReport()).splitlines()[0] == "0 converted, 0 unconverted"
    model, only_head = Mixed(), lambda m, name: name == "head"
    quantize_(model, FOUR, filter_fn=only_head)
    again = str(quantize_(model, FOUR, filter_fn=only_head))
    assert again.splitlines()[0] == "0 converted, 3 unconverted, 1 already converted"
    assert re.search(r"\nhead +QuantLinear +already converted\n", again)


def test_lazy_modules_are_reported_until_initialized():
    model = nn.Sequential(nn.LazyLinear(3))
    report, _ = _one_warning(quantize_, model, FOUR)
    assert "lazy" in report.unconverted["0"]
    model(torch.randn(2, 5))
    assert _no_conversion_warning(quantize_, model, FOUR).converted == {"0": "Linear"}


# ---------------------------------------------------------------------- per-layer configs


def test_per_layer_configs_by_pattern_first_match_wins():
    model = _transformer_encoder()
    configs = {
        "layers.0.*": FOUR,
        r"re:layers\.1\.linear[12]": EIGHT,
        "layers.1.self_attn*": None,
        "layers.*": FULL,  # never reached for layer 0
    }
    report = _no_conversion_warning(quantize_, model, configs)
    first, second = model.layers
    assert first.self_attn.config == FOUR and first.self_attn.out_proj.config == FOUR
    assert first.linear1.config == FOUR and second.linear2.config == EIGHT
    assert type(second.self_attn) is nn.MultiheadAttention
    assert report.unconverted == {
        "layers.1.self_attn": "excluded by config",
        "layers.1.self_attn.out_proj": "excluded by config",
    }
    assert len(report.converted) == 6


def test_a_module_no_pattern_matches_is_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    report, _ = _one_warning(quantize_, model, {"0": FOUR})
    assert report.unconverted == {"1": "no config pattern matches its name"}
    again = _no_conversion_warning(quantize_, model, {"0": FOUR, "*": None})
    assert again.already_converted == {"0": "QuantLinear"} and again.converted == {}
    assert again.unconverted == {"1": "excluded by config"}


def test_bad_config_mappings_are_rejected():
    with pytest.raises(TypeError, match=r"QuantConfig, a preset name .* or None, got int"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), {"*": 4})
    with pytest.raises(TypeError, match="patterns must be strings"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), {0: FOUR})
