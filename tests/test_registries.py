"""Every kind of named entry is a Registry: one registration makes a new one usable by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import models
from metagrad.meta import forms, hyper, updates
from metagrad.meta.optim import MetaGrad
from metagrad.nn import convert
from metagrad.nn.convert import quantize, register_handler
from metagrad.quant import formats, presets, scaling, transforms
from metagrad.quant.spec import BACKENDS, QuantConfig, QuantSpec
from metagrad.registry import Registry
from metagrad.training.config import ConfigError, build_config


def test_every_registry_is_a_registry():
    registries = [
        models.MODELS,
        convert._HANDLERS,
        hyper.HYPERNET_KINDS,
        forms.HYPERNET_FORMS,
        updates.BASE_RULES,
        BACKENDS,
        formats._FORMATS,
        scaling._SCALE_RULES,
        transforms._TRANSFORMS,
        presets._PRESETS,
    ]
    assert all(isinstance(r, Registry) for r in registries)
    assert len({r.kind for r in registries}) == len(registries)


def test_a_type_keyed_registry_names_the_class(monkeypatch):
    monkeypatch.setattr(convert, "_HANDLERS", convert._HANDLERS.copy())
    with pytest.raises(ValueError, match="conversion handler 'Linear' is already registered"):
        register_handler(nn.Linear)(lambda module, config: None)


def _trained(base: str, steps: int = 3) -> tuple[nn.Module, nn.Module]:
    """A quantized linear layer before and after ``steps`` MetaGrad steps with ``base``."""
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(4, 3)), QuantConfig(grad=QuantSpec(bits=4)))
    start = copy.deepcopy(model)
    opt = MetaGrad(model, 0.1, base=base)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return start, model


def test_a_new_base_rule_is_one_registration(monkeypatch):
    def sign_sgd(param, grad, state, group):
        return param - group["lr"] * torch.sign(grad), {}

    monkeypatch.setitem(updates.BASE_RULES, "sign-sgd", updates.BaseRule(sign_sgd, ()))
    start, model = _trained("sign-sgd")
    for name, before in start.named_parameters():
        moved = (model.get_parameter(name) - before).abs().detach() / 0.1
        # steps of +-lr only: two on the weight (meta weights lag one step), three on the bias
        torch.testing.assert_close(moved, moved.round(), rtol=0, atol=1e-4)
        assert moved.max() == pytest.approx(2 if name.endswith("weight") else 3, abs=1e-4)
    with pytest.raises(ValueError, match="unknown base rule 'rmsprop'; available: sgd, adam"):
        MetaGrad(nn.Linear(2, 2), 0.1, base="rmsprop")
    # by name in a run's settings: MetaGrad only, as it has no torch.optim twin
    settings = {"model": "small_cnn", "optimizer": "sign-sgd"}
    assert build_config({**settings, "method": "metagrad"}).optimizer == "sign-sgd"
    with pytest.raises(ConfigError, match="'sign-sgd' is a MetaGrad base rule with no optimizer"):
        build_config(settings)


def test_a_new_hypernetwork_kind_and_form_are_one_registration(monkeypatch):
    monkeypatch.setitem(
        forms.HYPERNET_FORMS, "squared-gain", forms.HyperForm(lambda g, w: g * g.abs(), True)
    )
    monkeypatch.setitem(
        hyper.HYPERNET_KINDS,
        "wide",
        lambda *, hidden, layers, form, eps: hyper.MLPHypernet(hidden=4 * hidden, form=form),
    )
    net = hyper.create_hypernet("wide", hidden=2, form="squared-gain")
    assert net.body[0].out_features == 8 and net.correction.gain
    g, w = torch.randn(10), torch.randn(10)
    corrected, _ = net(g, w)
    torch.testing.assert_close(corrected, g)  # a fresh hypernetwork is the identity
    with pytest.raises(ValueError, match="unknown hypernetwork kind 'fc'"):
        hyper.create_hypernet("fc")
