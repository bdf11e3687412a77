"""Tests for the model registry and the CIFAR model families."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metagrad.models import (
    CLASSIFIER_NAME,
    FIRST_CONV_NAME,
    create_model,
    list_models,
    register_model,
)
from metagrad.models.mobilenet import make_divisible

# Expected parameter counts at width 1 with 10 classes (inclusive bounds).
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "vgg16": (14_500_000, 15_000_000),
    "resnet20": (260_000, 285_000),
    "resnet56": (840_000, 875_000),
    "mobilenetv2": (2_100_000, 2_400_000),
    "small_cnn": (2_000, 100_000),
}
MODELS = list_models()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family() -> None:
    assert sorted(PARAM_RANGES) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", MODELS)
def test_param_counts_and_width(name: str) -> None:
    full = _num_params(create_model(name))
    low, high = PARAM_RANGES[name]
    assert low <= full <= high
    narrow = create_model(name, width=0.25)
    assert _num_params(narrow) < full
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_and_in_channels(name: str) -> None:
    model = create_model(name, num_classes=7, in_channels=1, width=0.25)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.get_submodule(FIRST_CONV_NAME).in_channels == 1
    assert model.get_submodule(CLASSIFIER_NAME).out_features == 7


@pytest.mark.parametrize("name", MODELS)
def test_tiny_width_still_builds(name: str) -> None:
    model = create_model(name, width=0.01)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert all(m.out_channels >= 1 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_small_cnn_on_small_inputs() -> None:
    model = create_model("small_cnn", num_classes=5, in_channels=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 5)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_mobilenet_channels_are_multiples_of_eight() -> None:
    model = create_model("mobilenetv2", width=0.3)
    hidden = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % 8 == 0 and c >= 8 for c in hidden)
    assert make_divisible(1.0) == 8
    assert make_divisible(32 * 0.75) == 24


@pytest.mark.parametrize("name", MODELS)
def test_module_conventions(name: str) -> None:
    model = create_model(name, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.get_submodule(FIRST_CONV_NAME) is convs[0]
    assert model.get_submodule(CLASSIFIER_NAME) is linears[-1]
    assert model.classifier is linears[-1]
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            assert type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_runs_through_its_module(name: str) -> None:
    """Each Conv2d/Linear is called once per forward, so swapping the module swaps the op."""
    model = create_model(name, width=0.25)
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, *_: object) -> None:
        calls[module] = calls.get(module, 0) + 1

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        m.register_forward_hook(hook)
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == len(layers)
    assert set(calls.values()) == {1}


def test_init() -> None:
    torch.manual_seed(0)
    model = create_model("resnet56")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.layer3[1].conv1  # 64 -> 64 channels, 3×3: fan_out = 576
    expected = math.sqrt(2.0 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_for_fixed_seed(name: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    outputs, states = [], []
    for _ in range(2):
        torch.manual_seed(123)
        model = create_model(name, width=0.25).eval()
        states.append(model.state_dict())
        outputs.append(model(x))
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert torch.equal(outputs[0], outputs[1])


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="resnet21") as info:
        create_model("resnet21")
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf"), "1", None, True])
def test_bad_width(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        create_model("small_cnn", width=width)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": -3}, "in_channels"),
    ],
)
def test_bad_num_classes_or_in_channels(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        create_model("small_cnn", **kwargs)  # type: ignore[arg-type]


def test_integer_width_accepted() -> None:
    model = create_model("small_cnn", width=2)
    assert model.get_submodule(FIRST_CONV_NAME).out_channels == 32


def test_duplicate_registration_rejected() -> None:
    def resnet20() -> nn.Module:  # same name as a registered model
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet20)
    assert list_models() == MODELS
