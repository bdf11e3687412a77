"""Hugging Face models: GPT-2's Conv1D converted by the built-in handler, checkpoints both ways."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad.meta.optim import meta_parameters
from metagrad.nn import convert, coverage
from metagrad.nn.convert import ConversionWarning
from metagrad.nn.hf import QuantConv1DMixin

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

FOUR = mg.QuantConfig(grad=mg.QuantSpec(bits=4))
NEAREST4 = mg.QuantConfig(grad=mg.QuantSpec(bits=4, rounding="nearest"))
MATMULS = {
    f"transformer.h.{i}.{name}"
    for i in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    monkeypatch.setattr(convert, "_HANDLERS", convert._HANDLERS.copy())
    monkeypatch.setattr(coverage, "_NON_MATMUL", coverage._NON_MATMUL.copy())


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(seed))


def _convert(model: nn.Module, config=FOUR) -> mg.ConversionReport:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        return mg.quantize_(model, config)


def test_every_matmul_of_gpt2_is_converted_and_the_outputs_stay_the_same():
    original = _gpt2().eval()
    model = copy.deepcopy(original)
    report = _convert(model)
    assert set(report.converted) == MATMULS | {"lm_head"} and report.unconverted == {}
    assert report.converted["transformer.h.0.attn.c_attn"] == "Conv1D"
    assert report.not_applicable == {"transformer.wte": "Embedding", "transformer.wpe": "Embedding"}
    block = model.transformer.h[1]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(layer, Conv1D) and isinstance(layer, QuantConv1DMixin)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    idx = _tokens()
    assert torch.equal(model(idx).logits, original(idx).logits)  # quantized path, forward
    with torch.no_grad():
        assert torch.equal(model(idx).logits, original(idx).logits)  # inference path
    names = {name for name, _ in mg.nn.layers.quantized_weights(model)}
    assert names == {f"{n}.weight" for n in MATMULS} | {"lm_head.weight"}


def test_gpt2_state_dicts_and_checkpoints_load_both_ways(tmp_path):
    original = _gpt2().eval()
    model = copy.deepcopy(original)
    _convert(model)
    ours, theirs = model.state_dict(), original.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours)
    model.save_pretrained(tmp_path / "converted")  # a converted model writes an HF checkpoint
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "converted").eval()
    assert not any(isinstance(m, QuantConv1DMixin) for m in plain.modules())
    idx = _tokens()
    assert torch.equal(plain(idx).logits, original(idx).logits)
    other = _gpt2(seed=5).eval()
    other.save_pretrained(tmp_path / "other")  # ... and one converted later reads one
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "other").eval()
    _convert(loaded)
    assert torch.equal(loaded(idx).logits, other(idx).logits)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model(idx).logits, other(idx).logits)


def test_a_converted_gpt2_trains_plain_and_with_metagrad():
    idx = _tokens()
    for method in ("adam", "metagrad"):
        model = _gpt2()
        _convert(model)
        if method == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        else:
            opt = mg.MetaGrad(model, lr=3e-3, base="adam", hyper_lr=1e-3)
            meta = {id(p) for p in opt.meta_params}
            assert {id(model.get_parameter(f"{n}.weight")) for n in MATMULS} <= meta

        def closure(model=model, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            loss = model(idx, labels=idx).loss
            loss.backward()
            return loss

        losses = [float(opt.step(closure).detach()) for _ in range(8)]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses


def _conv1d_and_linear(config: mg.QuantConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 5))
    nn.init.normal_(conv[0].bias)
    linear = nn.Sequential(nn.Linear(5, 6))
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.t())
        linear[0].bias.copy_(conv[0].bias)
    _convert(conv, config)
    _convert(linear, config)
    return conv, linear


@pytest.mark.parametrize(
    "config",
    [
        NEAREST4,
        mg.QuantConfig(grad=mg.QuantSpec(bits=4, rounding="nearest", granularity="sample")),
        mg.QuantConfig(grad=mg.QuantSpec(bits=8, rounding="nearest"), backend="int8"),
        mg.QuantConfig(grad=mg.QuantSpec(bits=4, rounding="nearest"), backward_operand_bits=8),
    ],
    ids=["int4", "int4-sample", "int8-backend", "operands8"],
)
def test_a_conv1d_gradient_is_quantized_as_a_quant_linears(config):
    conv, linear = _conv1d_and_linear(config)
    x = torch.randn(3, 4, 5)
    e = torch.randn(3, 4, 6)  # the error reaching the layer
    grads = []
    for model in (conv, linear):
        xi = x.clone().requires_grad_(True)
        model(xi).backward(e)
        grads.append((xi.grad, model[0].weight.grad, model[0].bias.grad))
    (gx, gw, gb), (lx, lw, lb) = grads
    # the same codes and scales; the float products of a transposed weight may round differently
    for conv_grad, linear_grad in ((gw.t(), lw), (gx, lx), (gb, lb)):
        torch.testing.assert_close(conv_grad, linear_grad, rtol=1e-6, atol=1e-7)
    full = e.reshape(-1, 6).t() @ x.reshape(-1, 5)  # the full-precision dL/dW
    assert not torch.allclose(lw, full, atol=1e-4)  # it is quantized


def test_a_conv1d_of_another_library_or_shape_is_reported_not_covered():
    class Conv1D(nn.Module):  # same name, not transformers' class
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

    with pytest.warns(ConversionWarning, match=r"Conv1D, which holds 'weight' \(2-D\)"):
        report = mg.quantize_(nn.Sequential(Conv1D()), FOUR)
    assert report.unconverted == {"0": "no handler for Conv1D, which holds 'weight' (2-D)"}

    odd = transformers.pytorch_utils.Conv1D(6, 5)
    odd.nf = 7  # its weight no longer has the shape (nx, nf)
    with pytest.warns(ConversionWarning):
        report = mg.quantize_(nn.Sequential(odd), FOUR)
    assert report.unconverted == {"0": "declined by the handler for Conv1D"}


def test_a_converted_gpt2_pickles_and_turns_back():
    original = _gpt2().eval()
    model = copy.deepcopy(original)
    _convert(model)
    idx = _tokens()
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(idx).logits, model(idx).logits)
    layer = model.transformer.h[0].mlp.c_fc
    weight = layer.weight
    report = mg.unquantize_(model)
    assert set(report.restored) == MATMULS | {"lm_head"}
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    assert model.transformer.h[0].mlp.c_fc.weight is weight
    assert not hasattr(model.transformer.h[0].mlp.c_fc, "config")
    assert type(model.lm_head) is nn.Linear and not meta_parameters(model)
    assert torch.equal(model(idx).logits, original(idx).logits)


def test_importing_metagrad_does_not_import_transformers():
    code = "import sys, metagrad; assert 'transformers' not in sys.modules"
    src = str(Path(mg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_gpt2_inference_runs_no_quantized_function(mode, monkeypatch):
    from metagrad.nn import functional as QF

    original = _gpt2().eval()
    model = copy.deepcopy(original)
    _convert(model)
    monkeypatch.setattr(QF._QuantLinearFn, "apply", lambda *a: pytest.fail("Function entered"))
    idx = _tokens()
    if mode == "frozen":
        model.requires_grad_(False)
        original.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with context.get(mode, contextlib.nullcontext)():
        assert torch.equal(model(idx).logits, original(idx).logits)
