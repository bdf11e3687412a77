"""The papers' training recipes (metagrad.quant.recipes): each quantizes what its docs say, on a
small layer, and keeps its high-precision layers out."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg
from metagrad.backward import emulated
from metagrad.models import CLASSIFIER_NAME, FIRST_CONV_NAME
from metagrad.nn.functional import linear
from metagrad.quant import recipes
from metagrad.quant.presets import preset_config
from metagrad.quant.quantize import quantize_along, quantize_input, quantize_weight
from metagrad.quant.recipes import get_recipe, list_recipes, recipe_config, register_recipe
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.training.config import ConfigError, build_config

RECIPES = ["psq", "bhq", "luq", "rht-mxfp4", "rht-nvfp4", "fp8-e5m2"]


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    e = torch.randn(4, 8, 48, generator=g)
    return x, w, b, e


def _spy(monkeypatch) -> list[tuple[QuantSpec, torch.Tensor]]:
    """Record every operand the emulated backward quantizes, with its spec (laid back, or as
    transformed rows)."""
    calls: list[tuple[QuantSpec, torch.Tensor]] = []

    def spying(real):
        def spy(t, spec, *args, **kwargs):
            calls.append((spec, t.detach().clone()))
            return real(t, spec, *args, **kwargs)

        return spy

    for name in ("quantize_along", "quantize_transformed"):
        monkeypatch.setattr(emulated, name, spying(getattr(emulated, name)))
    return calls


def test_every_paper_preset_has_a_recipe_and_plain_has_none():
    assert list_recipes() == RECIPES
    with pytest.raises(ValueError, match="unknown recipe 'plain'"):
        get_recipe("plain")
    assert recipes.FIRST_AND_LAST == (FIRST_CONV_NAME, CLASSIFIER_NAME)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_keeps_its_presets_error_format(name):
    """The recipe adds to the preset: its error quantizers are the preset's (Tseng et al.'s
    MXFP4 recipe with its own Hadamard size and pre-scale; BHQ's with its diagonal scaling)."""
    config, preset = get_recipe(name).config, preset_config(name)
    if name == "rht-mxfp4":
        ours, theirs = config.grad, preset.grad
        same = ("format", "block_size", "scale_format", "scale_rounding", "rounding")
        assert all(getattr(ours, f) == getattr(theirs, f) for f in same)
    elif name == "bhq":
        scaled = dataclasses.replace(preset.grad, transform="bhqs")
        assert config.backward_specs[:2] == (scaled, scaled)
    else:
        assert config.backward_specs[:2] == preset.backward_specs[:2]


@pytest.mark.parametrize("name", ["psq", "bhq", "luq", "fp8-e5m2"])
def test_forward_recipes_quantize_weight_and_input_and_reuse_them_backward(name, monkeypatch):
    """PSQ/BHQ (INT8), LUQ (INT4), FP8 (E4M3): forward weight and activation quantized; the
    backward products multiply the error by those same forward-quantized tensors."""
    config = get_recipe(name).config
    bits = {"psq": 8, "bhq": 8, "luq": 4}.get(name)
    expected = QuantSpec(bits=bits) if bits else QuantSpec(format="fp8_e4m3")
    assert config.weight == expected and config.activation == expected
    x, w, b, e = _case()
    xq, wq = quantize_input(x, expected, -1), quantize_weight(w, expected)
    y = linear(x, w, b, config=config)
    assert torch.equal(y, F.linear(xq, wq, b))
    calls = _spy(monkeypatch)
    y.backward(e)
    others = [t for spec, t in calls if not spec.enabled]  # the non-error operands
    if config.uses_integer_path:  # PSQ: the error's integer codes times the saved operands
        assert not calls
    else:
        assert any(torch.equal(t, wq) for t in others) and any(torch.equal(t, xq) for t in others)


def test_mxfp4_recipe_quantizes_both_backward_operands_with_one_transform(monkeypatch):
    """Tseng et al.: every operand of both backward products in MXFP4 (OCP floor scales, 3/4
    pre-scale, stochastic, a 64-point RHT), the forward in full precision."""
    config = get_recipe("rht-mxfp4").config
    spec = config.grad
    assert (spec.scale_format, spec.scale_rounding, spec.prescale) == ("e8m0", "floor", 0.75)
    assert (spec.transform, spec.transform_block, spec.rounding) == ("rht", 64, "stochastic")
    assert config.backward_specs == (spec,) * 4
    assert not config.quantizes_forward
    x, w, b, e = _case()
    y = linear(x, w, b, config=config)
    assert torch.equal(y, F.linear(x, w, b))
    calls = _spy(monkeypatch)
    y.backward(e)
    quantized = [t for s, t in calls if s == spec]
    assert len(quantized) == 4  # error and weight in dL/dx, error and input in dL/dW
    assert any(torch.equal(t, w.detach()) for t in quantized)
    assert any(torch.equal(t, x.detach()) for t in quantized)


def test_the_three_quarter_prescale_keeps_ocp_scaled_blocks_unbiased():
    """OCP floor scales map block maxima with mantissa above 1.5 past FP4's 6: stochastic
    rounding then clips them (biased); times 3/4 they fit, and the mean of many draws is the
    input."""
    x = torch.full((20000, 32), 0.5, dtype=torch.float64)
    x[:, 0] = 7.5  # mantissa 1.875: X = 2^(2 - 2) = 1, 7.5 / X > 6
    floor = dataclasses.replace(get_recipe("rht-mxfp4").config.grad, transform=None)
    g = torch.Generator().manual_seed(0)
    with_prescale = quantize_along(x, floor, (1,), 0, generator=g).mean(0)
    clipped = quantize_along(x, dataclasses.replace(floor, prescale=1.0), (1,), 0, generator=g)
    assert abs(with_prescale[0].item() - 7.5) < 0.02 and abs(with_prescale[1].item() - 0.5) < 0.01
    assert clipped.mean(0)[0].item() == 6.0  # saturated every time


def test_nvfp4_recipe_quantizes_what_nvidia_quantizes(monkeypatch):
    """NVIDIA: weights in 16x16 tiles and activations in 1x16 blocks, to nearest, forward; the
    input-gradient product uses the same quantized weight; the weight-gradient product takes
    the activations from their high-precision values, quantized along the tokens after the
    16-point RHT it shares with the error."""
    config = get_recipe("rht-nvfp4").config
    assert (config.weight.granularity, config.weight.block_size) == ("tile", 16)
    assert config.weight.rounding == config.activation.rounding == "nearest"
    assert config.activation.scale_rounding == "nearest" and config.weight_for_input_grad is None
    wgrad_input = config.input_for_weight_grad
    assert (wgrad_input.transform, wgrad_input.transform_block) == ("rht", 16)
    x, w, b, e = _case()
    xq, wq = quantize_input(x, config.activation, -1), quantize_weight(w, config.weight)
    y = linear(x, w, b, config=config)
    assert torch.equal(y, F.linear(xq, wq, b))
    calls = _spy(monkeypatch)
    y.backward(e)
    by_spec = {}
    for spec, t in calls:
        by_spec.setdefault(spec, []).append(t)
    assert any(torch.equal(t, wq) for t in by_spec[QuantSpec()])  # dL/dx: the forward weight
    assert any(torch.equal(t, x.detach()) for t in by_spec[wgrad_input])  # full precision x
    assert len(by_spec[config.grad_for_weight_grad]) == 1 and len(by_spec[config.grad]) == 1


def test_nvfp4_weight_tiles_quantize_the_weight_and_its_transpose_alike():
    tile = get_recipe("rht-nvfp4").config.weight
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    w[5, 7] = 40.0
    assert torch.equal(
        quantize_along(w, tile, (1,)), quantize_along(w.t().contiguous(), tile, (1,)).t()
    )


def test_recipes_keep_the_first_and_last_layer_in_full_precision():
    model = mg.create_model("small_cnn", num_classes=10)
    recipe = get_recipe("rht-nvfp4")
    report = mg.quantize_(model, recipe.layer_configs())
    assert FIRST_CONV_NAME not in report.converted and CLASSIFIER_NAME not in report.converted
    assert type(model.stem[0]) is torch.nn.Conv2d and type(model.classifier) is torch.nn.Linear
    quantized = [m for m in model.modules() if isinstance(m, mg.QuantConv2d)]
    assert quantized and all(m.config == recipe.config for m in quantized)
    custom = recipe.layer_configs(high_precision=("features.0.0",))
    assert custom == {"features.0.0": None, "*": recipe.config}


def test_recipes_train_a_small_cnn_through_the_command_line_settings():
    cfg = build_config({"grad_quant": "rht-nvfp4", "recipe": True, "model": "small_cnn"})
    assert cfg.quant_config() == recipe_config("rht-nvfp4")
    assert set(cfg.high_precision_layers()) == {FIRST_CONV_NAME, CLASSIFIER_NAME}
    with pytest.raises(ConfigError, match="'plain' has no recipe"):
        build_config({"grad_quant": "plain", "recipe": True})
    with pytest.raises(ConfigError, match="recipe needs grad_quant"):
        build_config({"recipe": True})
    with pytest.raises(ConfigError, match="fixes the forward and backward quantizers"):
        build_config({"grad_quant": "luq", "recipe": True, "weight_bits": 8})


def test_a_conv_layer_runs_every_recipe_and_stays_close_to_full_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, generator=g, requires_grad=True) / 10
    e = torch.randn(4, 32, 6, 6, generator=g)
    ref_y = F.conv2d(x, w, padding=1)
    ref_x, ref_w = torch.autograd.grad(ref_y, (x, w), e)
    for name in RECIPES:
        torch.manual_seed(0)
        y = mg.nn.functional.conv2d(x, w, padding=1, config=get_recipe(name).config)
        gx, gw = torch.autograd.grad(y, (x, w), e)
        for got, ref in ((y, ref_y), (gx, ref_x), (gw, ref_w)):
            cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
            assert cos > 0.9 and math.isfinite(got.sum().item()), name


def test_a_recipe_is_one_registration_under_a_preset_name(monkeypatch):
    monkeypatch.setattr(recipes, "_RECIPES", recipes._RECIPES.copy())
    with pytest.raises(ValueError, match="names no preset"):
        register_recipe("no-such-preset")(lambda: recipes.Recipe(QuantConfig()))
    with pytest.raises(ValueError, match="already registered"):
        register_recipe("luq")(lambda: recipes.Recipe(QuantConfig()))
