"""Quantized layers and MetaGrad under mixed precision (torch.autocast, GradScaler)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MetaGrad, QuantConfig, QuantConv2d, QuantLinear, QuantSpec, quantize
from metagrad.cli import main
from metagrad.models import create_model
from metagrad.quant.quantize import quantize_codes

GRANULARITIES = ["tensor", "channel", "sample"]
ROUNDINGS = ["nearest", "stochastic"]
BF16 = torch.bfloat16
# The bf16 product is rounded to bf16 once, then its float32 scaling once more.
BF16_RTOL = 2.0**-7


def _round(t: torch.Tensor, dtype=BF16) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and held in float64."""
    return t.to(dtype).double()


def _reference_operands(x, weight, scale, granularity, channel_dim):
    """The operands of each product as the layer builds them: the error scale folded in where it
    lies on the contraction axis (per channel: into W for dL/dx; per sample: into x for dL/dW),
    then rounded to bf16."""
    w_for_x = _round(weight)
    x_for_w = _round(x)
    if granularity == "channel":
        fold = scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        w_for_x = _round(weight.to(BF16).float() * fold)
    if granularity == "sample":
        x_for_w = _round(x.to(BF16).float() * scale)
    factor_x = torch.ones(()) if granularity == "channel" else scale
    factor_w = scale if granularity != "sample" else torch.ones(())
    if granularity == "channel" and channel_dim == 1:
        factor_w = scale.reshape(-1, 1, 1, 1)
    elif granularity == "channel":
        factor_w = scale.reshape(-1, 1)
    return w_for_x, x_for_w, factor_x.double(), factor_w.double()


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_bf16_conv_backward_equals_float64_on_the_same_bf16_operands_and_codes(
    granularity, rounding
):
    torch.manual_seed(0)
    spec = QuantSpec(4, rounding, granularity)
    layer = QuantConv2d(6, 8, 3, padding=1, config=QuantConfig(grad=spec))
    x = torch.randn(4, 6, 7, 7).requires_grad_()
    e = torch.randn(4, 8, 7, 7, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    torch.manual_seed(11)
    y.backward(e)
    torch.manual_seed(11)  # the same noise as the layer drew
    codes, scale = quantize_codes(e, spec, 1)
    w, xw, factor_x, factor_w = _reference_operands(
        x.detach(), layer.weight.detach(), scale, granularity, 1
    )
    codes = codes.double()
    grad_x = torch.nn.grad.conv2d_input(x.shape, w, codes, padding=1) * factor_x
    grad_w = torch.nn.grad.conv2d_weight(xw, layer.weight.shape, codes, padding=1) * factor_w
    grad_b = (codes * scale.double()).sum((0, 2, 3))
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    _close(x.grad, grad_x, BF16_RTOL)
    _close(layer.weight.grad, grad_w, BF16_RTOL)
    _close(layer.bias.grad, grad_b, 1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_bf16_linear_backward_equals_float64_on_the_same_bf16_operands_and_codes(
    granularity, rounding
):
    torch.manual_seed(0)
    spec = QuantSpec(4, rounding, granularity)
    layer = QuantLinear(12, 7, config=QuantConfig(grad=spec))
    x = torch.randn(5, 12).requires_grad_()
    e = torch.randn(5, 7, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    torch.manual_seed(3)
    y.backward(e)
    torch.manual_seed(3)
    codes, scale = quantize_codes(e, spec, -1)
    w, xw, factor_x, factor_w = _reference_operands(
        x.detach(), layer.weight.detach(), scale, granularity, -1
    )
    codes = codes.double()
    _close(x.grad, (codes @ w) * factor_x, BF16_RTOL)
    _close(layer.weight.grad, (codes.t() @ xw) * factor_w, BF16_RTOL)


def test_codes_of_a_bf16_error_are_those_of_its_float32_value():
    torch.manual_seed(0)
    e = torch.randn(3, 5, 4, 4, dtype=BF16)
    for spec in (QuantSpec(4), QuantSpec(8, granularity="channel"), QuantSpec(3, "stochastic")):
        torch.manual_seed(1)
        codes, scale = quantize_codes(e, spec)
        torch.manual_seed(1)
        codes32, scale32 = quantize_codes(e.float(), spec)
        assert codes.dtype == BF16 and scale.dtype == torch.float32
        assert torch.equal(codes.float(), codes32) and torch.equal(scale, scale32)


@pytest.mark.parametrize("backend", ["simulate", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_changes_gradients_less_than_quantization_noise(backend, dtype):
    torch.manual_seed(0)
    config = QuantConfig(grad=QuantSpec(4, "stochastic", "sample"), backend=backend)
    model = quantize(create_model("small_cnn", width=0.5), config)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def grads(seed: int, amp: torch.dtype | None) -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        torch.manual_seed(seed)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    mixed, full, other_noise = grads(5, dtype), grads(5, None), grads(6, None)
    for p, g, f, o in zip(model.parameters(), mixed, full, other_noise, strict=True):
        assert g.dtype == p.dtype and torch.isfinite(g).all()
        assert (g - f).norm() < (o - f).norm()


def test_fp16_grad_scaler_unscales_and_skips_non_finite_steps():
    torch.manual_seed(0)
    model = quantize(create_model("small_cnn", width=0.5), QuantConfig(grad=QuantSpec(8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def step(inputs):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(inputs).float(), y)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        return before

    before = step(x)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    scale = scaler.get_scale()
    before = step(bad)  # the quantized error turns NaN: the scaler must see it and skip
    assert scaler.get_scale() < scale
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)


def test_metagrad_steps_under_bf16_autocast_with_a_float32_hypernet():
    torch.manual_seed(0)
    config = QuantConfig(grad=QuantSpec(4, "stochastic"))
    model = quantize(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), config)
    twin = quantize(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), config)
    twin.load_state_dict(model.state_dict())
    opts = [MetaGrad(m, lr=0.1, momentum=0.9, hyper_lr=1e-3) for m in (model, twin)]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for step in range(4):
        for m, opt, amp in ((model, opts[0], True), (twin, opts[1], False)):

            def closure(m=m, opt=opt, amp=amp):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=BF16, enabled=amp):
                    loss = F.cross_entropy(m(x).float(), y)
                loss.backward()
                return loss

            torch.manual_seed(step)
            opt.step(closure)
    for p in list(model.parameters()) + list(opts[0].hypernet.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    moved = [
        not torch.equal(a, b)
        for a, b in zip(opts[0].hypernet.parameters(), opts[1].hypernet.parameters(), strict=True)
    ]
    assert any(moved)  # the bf16 run learned something of its own ...
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.02)  # ... close to float32's


@pytest.mark.slow
def test_train_command_with_bf16_on_cpu_records_it(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            "small_cnn",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--grad-bits",
            "4",
            "--grad-rounding",
            "stochastic",
            "--amp",
            "bf16",
            "--compile",
            "off",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bfloat16"
    assert summary["final_test_acc"] > 50
    assert summary["provenance"]["torch"] == torch.__version__


def test_gradient_diagnostics_run_the_forward_under_the_runs_autocast(tmp_path, monkeypatch):
    """--diag-every under --amp bf16: the diagnostic forward passes are the training step's."""
    from metagrad.meta.diagnostics import paired_gradients
    from metagrad.nn.layers import quantized_layers
    from metagrad.training import trainer
    from metagrad.training.config import build_config

    outputs: list[torch.dtype] = []
    original = trainer.gradient_report

    def spy(model, x, y, *args, **kwargs):
        """gradient_report, noting the dtype of every quantized layer's output."""
        hooks = [
            layer.register_forward_hook(lambda m, inputs, out: outputs.append(out.dtype))
            for _, layer in quantized_layers(model)
        ]
        try:
            return original(model, x, y, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(trainer, "gradient_report", spy)
    settings = {"model": "small_cnn", "data": "digits", "batch_size": 32, "epochs": 1}
    settings |= {"grad_bits": 4, "compile": "off", "progress": False, "max_steps": 2}
    out = tmp_path / "run"
    trainer.train(build_config({**settings, "amp": "bf16", "diag_every": 1, "out": str(out)}))
    records = [json.loads(line) for line in (out / "gradients.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert outputs and set(outputs) == {torch.bfloat16}

    # The full-precision reference of a bf16 forward is not the float32 forward's.
    torch.manual_seed(0)
    model = quantize(create_model("small_cnn", num_classes=10, in_channels=1), QuantConfig())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bf16 = paired_gradients(model, x, y, amp=torch.bfloat16)
    fp32 = paired_gradients(model, x, y)
    assert bf16.keys() == fp32.keys()
    assert all(not torch.equal(bf16[k][0], fp32[k][0]) for k in bf16)
