"""Inference pays nothing: without a recorded gradient a converted layer is the plain one."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad.nn import functional as QF
from metagrad.quant import quantize as Q

INT4 = mg.QuantConfig(grad=mg.QuantSpec(bits=4))
OPERANDS = mg.QuantConfig(grad=mg.QuantSpec(bits=4), backward_operand_bits=8)
QAT = mg.QuantConfig(
    grad=mg.QuantSpec(bits=4),
    weight=mg.QuantSpec(bits=8, granularity="channel"),
    activation=mg.QuantSpec(bits=8),
)
INT8_QAT = mg.QuantConfig(
    grad=mg.QuantSpec(bits=4),
    weight=mg.QuantSpec(bits=8, granularity="channel"),
    activation=mg.QuantSpec(bits=8),
    backend="int8",
)


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Name -> (a model of one layer, an input)."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    return {
        "linear": (nn.Sequential(nn.Linear(16, 8)), torch.randn(4, 5, 16)),
        "conv": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), torch.randn(2, 3, 8, 8)),
        "conv-same-reflect": (
            nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")),
            torch.randn(2, 3, 7, 7),
        ),
        "attention": (nn.ModuleDict({"mha": attention}), torch.randn(2, 6, 16)),
    }


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, nn.ModuleDict):
        return model["mha"](x, x, x)[0]  # self-attention: PyTorch's fast path in eval
    return model(x)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Grad mode on, but nothing requires grad (and saving a tensor for backward raises)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)

    def pack(t):
        raise AssertionError("a tensor was saved for a backward pass")

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


MODES = {"no_grad": lambda m: torch.no_grad(), "inference_mode": lambda m: torch.inference_mode()}
MODES["frozen"] = _frozen


@pytest.fixture
def no_functions(monkeypatch):
    """Entering metagrad's autograd Functions raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function was entered")

    for fn in (QF._QuantLinearFn, QF._QuantConv2dFn, Q._FakeQuantizeSTE):
        monkeypatch.setattr(fn, "apply", refuse)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("config", [INT4, OPERANDS], ids=["int4", "operands8"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_without_a_gradient_a_converted_layer_is_the_plain_one(
    name, mode, config, training, no_functions
):
    original, x = _layers()[name]
    original.train(training)
    model = mg.quantize(original, config)
    with MODES[mode](original):
        expected = _run(original, x)
    with MODES[mode](model):
        got = _run(model, x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["linear", "conv", "attention"])
def test_inference_under_autocast_is_the_plain_layers(name, no_functions):
    original, x = _layers()[name]
    original.eval()
    model = mg.quantize(original, INT4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _run(original, x), _run(model, x)
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.parametrize("config", [QAT, INT8_QAT], ids=["qat", "int8-qat"])
@pytest.mark.parametrize("name", list(_layers()))
def test_forward_quantization_still_applies_without_a_gradient(name, config, monkeypatch):
    original, x = _layers()[name]
    model = mg.quantize(original, config)
    trained = _run(model, x)  # with a gradient: through the autograd Functions
    plain = _run(original, x)
    for fn in (QF._QuantLinearFn, QF._QuantConv2dFn, Q._FakeQuantizeSTE):
        monkeypatch.setattr(fn, "apply", lambda *a, **k: pytest.fail("Function entered"))
    with torch.no_grad():
        inferred = _run(model, x)
    assert torch.equal(inferred, trained.detach()) and not torch.equal(inferred, plain.detach())


def test_with_a_gradient_the_quantized_function_runs(monkeypatch):
    model = mg.quantize(nn.Sequential(nn.Linear(4, 4)), INT4)
    entered = []
    apply = QF._QuantLinearFn.apply
    monkeypatch.setattr(QF._QuantLinearFn, "apply", lambda *a: entered.append(1) or apply(*a))
    model(torch.randn(2, 4)).sum().backward()
    model.requires_grad_(False)
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()  # the input's gradient
    assert entered == [1, 1]


def test_a_frozen_bias_alone_still_takes_the_quantized_path(monkeypatch):
    model = mg.quantize(nn.Sequential(nn.Linear(4, 4)), INT4)
    model[0].weight.requires_grad_(False)
    entered = []
    apply = QF._QuantLinearFn.apply
    monkeypatch.setattr(QF._QuantLinearFn, "apply", lambda *a: entered.append(1) or apply(*a))
    model(torch.randn(2, 4)).sum().backward()  # the bias gradient is the quantized error's sum
    assert entered == [1] and model[0].bias.grad is not None


def test_a_transformer_encoder_evaluates_the_same_numbers_converted():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    original = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    model = copy.deepcopy(original)
    mg.quantize_(model, INT4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-6)
