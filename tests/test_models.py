"""Tests for the model registry, the CIFAR model families and the transformers."""

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
    model_task,
    register_model,
)
from metagrad.models.gpt import GPT_CHAR_CONTEXT
from metagrad.models.mobilenet import make_divisible
from metagrad.nn.convert import quantize_
from metagrad.nn.layers import quantized_layers
from metagrad.quant.spec import QuantConfig, QuantSpec

# Expected parameter counts at width 1 with 10 classes (inclusive bounds).
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "vgg16": (14_500_000, 15_000_000),
    "resnet20": (260_000, 285_000),
    "resnet56": (840_000, 875_000),
    "mobilenetv2": (2_100_000, 2_400_000),
    "small_cnn": (2_000, 100_000),
    "vit_tiny": (2_600_000, 2_800_000),
    "gpt_char": (750_000, 900_000),  # with a vocabulary of 96
}
MODELS = list_models()
IMAGE_MODELS = [name for name in MODELS if model_task(name) == "image"]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family() -> None:
    assert sorted(PARAM_RANGES) == MODELS


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def _sizes(name: str) -> dict[str, int]:
    """Default outputs and inputs: 10 classes of RGB images, or a vocabulary of 96."""
    return {} if model_task(name) == "image" else {"num_classes": 96, "in_channels": 96}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    if model_task(name) == "image":
        return torch.randn(batch, 3, 32, 32)
    return torch.randint(0, 96, (batch, 16))


@pytest.mark.parametrize("name", MODELS)
def test_param_counts_and_width(name: str) -> None:
    full = _num_params(create_model(name, **_sizes(name)))
    low, high = PARAM_RANGES[name]
    assert low <= full <= high
    narrow = create_model(name, width=0.25, **_sizes(name))
    assert _num_params(narrow) < full
    expected = (2, 10) if model_task(name) == "image" else (2, 16, 96)
    assert narrow(_input(name)).shape == expected


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_num_classes_and_in_channels(name: str) -> None:
    model = create_model(name, num_classes=7, in_channels=1, width=0.25)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.get_submodule(FIRST_CONV_NAME).in_channels == 1
    assert model.get_submodule(CLASSIFIER_NAME).out_features == 7


@pytest.mark.parametrize("name", IMAGE_MODELS)
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


def _attention_projections(model: nn.Module) -> set[nn.Module]:
    """Output projections of ``nn.MultiheadAttention``: run by the attention, not as modules."""
    return {m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_module_conventions(name: str) -> None:
    model = create_model(name, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.get_submodule(FIRST_CONV_NAME) is convs[0]
    assert model.get_submodule(CLASSIFIER_NAME) is linears[-1]
    assert model.classifier is linears[-1]
    inside_attention = _attention_projections(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and m not in inside_attention:
            assert type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_layer_runs_through_its_module(name: str) -> None:
    """Each Conv2d/Linear is called once per forward, so swapping the module swaps the op."""
    model = create_model(name, width=0.25)
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, *_: object) -> None:
        calls[module] = calls.get(module, 0) + 1

    inside_attention = _attention_projections(model)
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in inside_attention
    ]
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


@pytest.mark.parametrize("name", IMAGE_MODELS)
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


@pytest.mark.parametrize("name", MODELS)
def test_quantize_converts_the_layers_run_as_modules(name: str) -> None:
    model = create_model(name, width=0.25, **_sizes(name))
    # every Conv2d and Linear, attention's output projection included (quantize_ converts the
    # attention itself, which runs its projections through the quantized products)
    convertible = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch.manual_seed(0)
    x = _input(name)
    before = model(x)
    report = quantize_(model)
    assert not report.unconverted  # every matmul converted: nothing left out, silently or not
    assert len(quantized_layers(model)) == len(convertible)
    after = model(x)
    torch.testing.assert_close(after, before)  # full-precision settings: the same network
    after.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_every_model_has_a_task() -> None:
    assert {name: model_task(name) for name in MODELS if model_task(name) != "image"} == {
        "gpt_char": "charlm"
    }
    with pytest.raises(ValueError, match="unknown model"):
        model_task("gpt_huge")


def test_vit_tiny_layout() -> None:
    model = create_model("vit_tiny")
    blocks = list(model.blocks)
    assert len(blocks) == 6
    assert all(isinstance(b, nn.TransformerEncoderLayer) and b.norm_first for b in blocks)
    attention = blocks[0].self_attn
    assert isinstance(attention, nn.MultiheadAttention) and attention.num_heads == 3
    assert attention.batch_first and attention.embed_dim == 192
    assert blocks[0].linear1.out_features == 4 * 192
    patch = model.get_submodule(FIRST_CONV_NAME)
    assert (patch.kernel_size, patch.stride, patch.out_channels) == ((4, 4), (4, 4), 192)
    assert model.position.shape == (1, 192, 8, 8)  # 64 patches
    assert create_model("vit_tiny", width=0.5).classifier.in_features == 96
    assert create_model("vit_tiny", width=0.3).classifier.in_features % 3 == 0


def test_vit_takes_other_image_sizes() -> None:
    model = create_model("vit_tiny", width=0.25, in_channels=1, num_classes=5)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 5)  # 2x2 patches, resized positions
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)


def test_gpt_char_layout_and_shapes() -> None:
    model = create_model("gpt_char", num_classes=50, in_channels=50)
    assert model.context == GPT_CHAR_CONTEXT
    assert len(model.blocks) == 4
    assert isinstance(model.stem[0], nn.Embedding) and model.stem[0].num_embeddings == 50
    assert model.get_submodule(FIRST_CONV_NAME) is model.stem[0]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.get_submodule(CLASSIFIER_NAME) is linears[-1]
    assert model.classifier.out_features == 50
    attention = model.blocks[0].self_attn
    assert attention.num_heads == 4 and attention.embed_dim == 128
    ids = torch.randint(0, 50, (3, GPT_CHAR_CONTEXT))
    assert model(ids).shape == (3, GPT_CHAR_CONTEXT, 50)
    assert model(ids[:, :7]).shape == (3, 7, 50)
    with pytest.raises(ValueError, match="T <= 128"):
        model(torch.randint(0, 50, (1, GPT_CHAR_CONTEXT + 1)))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.randn(2, 8))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gpt_char_is_causal(mode: str) -> None:
    torch.manual_seed(0)
    model = create_model("gpt_char", width=0.25, num_classes=20, in_channels=20)
    model.train(mode == "train")
    ids = torch.randint(0, 20, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])  # earlier positions never see later ones
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_evaluation_runs_the_quantized_layers() -> None:
    """No fused inference kernel: in eval mode without autograd the blocks still run their
    (here 4-bit forward) layers, so the output equals the one with autograd on."""
    torch.manual_seed(0)
    model = create_model("gpt_char", width=0.25, num_classes=20, in_channels=20).eval()
    ids = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        full = model(ids)
    quantize_(model, QuantConfig(weight=QuantSpec(4, "nearest", "channel")))
    with torch.no_grad():
        fast = model(ids)
    assert torch.equal(fast, model(ids).detach())
    assert not torch.allclose(fast, full)


def test_gpt_char_is_deterministic_and_initialised_small() -> None:
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = create_model("gpt_char", width=0.5, num_classes=30, in_channels=30).eval()
        outputs.append(model(torch.arange(30)[None] % 30))
    assert torch.equal(outputs[0], outputs[1])
    # Small initial weights: close to a uniform prediction over the vocabulary.
    probs = outputs[0].softmax(-1)
    assert (probs - 1 / 30).abs().max() < 0.05
    assert model.blocks[0].linear2.weight.std() < model.blocks[0].linear1.weight.std()


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
