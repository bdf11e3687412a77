"""Every quantizer takes any layout: a strided view, a transpose, channels-last, an expanded or a
zero-size tensor quantizes exactly as its contiguous copy does (same codes, same dither)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from metagrad import kernels
from metagrad.nn.functional import conv2d, linear
from metagrad.quant import QuantConfig, QuantSpec, fake_quantize, quantize_along, quantize_codes
from metagrad.quant.columns import MIN_COLUMNS
from metagrad.quant.presets import list_presets, preset_config

SHAPE = (8, 6, 4, 4)


def _specs() -> dict[str, QuantSpec]:
    specs = {}
    for name in list_presets():
        config = preset_config(name)
        specs[f"{name}"] = config.grad
        if config.grad_for_weight_grad is not None:
            specs[f"{name}-wgrad"] = config.grad_for_weight_grad
    for granularity in ("tensor", "channel", "sample"):
        for rounding in ("nearest", "stochastic"):
            specs[f"int4-{granularity}-{rounding}"] = QuantSpec(4, rounding, granularity)
    specs["fp8-e4m3-stochastic"] = QuantSpec(format="fp8_e4m3", rounding="stochastic")
    block = QuantSpec(format="fp4_e2m1", rounding="stochastic", granularity="block", block_size=8)
    specs["fp4-block8-e8m0"] = replace(block, scale_format="e8m0")
    specs["fp4-block8-rht8"] = replace(block, transform="rht", transform_block=8)
    return specs


SPECS = _specs()


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t``'s values in other memory layouts."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:])
    sliced = wide[:, ::2]
    sliced.copy_(t)
    reversed_strides = t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    return {
        "strided-slice": sliced,
        "reversed-strides": reversed_strides,
        "channels-last": t.contiguous(memory_format=torch.channels_last),
        "expanded": t[:1].expand_as(t),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize(
    "layout", ["strided-slice", "reversed-strides", "channels-last", "expanded"]
)
def test_a_view_quantizes_as_its_contiguous_copy(name, layout):
    spec = SPECS[name]
    t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    view = _layouts(t)[layout]
    dense = view.contiguous()
    for fn in (
        lambda x, g: fake_quantize(x, spec, 1, generator=g),
        lambda x, g: quantize_along(x, spec, (1, 2, 3), 1, generator=g),
    ):
        got = fn(view, torch.Generator().manual_seed(1))
        want = fn(dense, torch.Generator().manual_seed(1))
        assert _same(got, want)
    if spec.is_integer:
        got = quantize_codes(view, spec, 1, generator=torch.Generator().manual_seed(2))
        want = quantize_codes(dense, spec, 1, generator=torch.Generator().manual_seed(2))
        assert all(_same(a, b) for a, b in zip(got, want, strict=True))


ROTATED = sorted(name for name, spec in SPECS.items() if spec.transform == "rht")


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ROTATED)
def test_a_channels_last_error_quantizes_along_its_samples_as_its_contiguous_copy(
    name, dtype, compile_kernels
):
    """The operand of a convolution's weight gradient: rows along the samples and pixels run down
    a channels-last error's memory, and are quantized there instead of in a transposed copy: the
    same values, laid out as the error."""
    if compile_kernels and not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(3)
    shape = (8, MIN_COLUMNS, 4, 4)  # as many channels as the column path needs
    t = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 3
    t = t.to(dtype)
    error = t.contiguous(memory_format=torch.channels_last)
    with kernels.compiled(compile_kernels):
        got = quantize_along(error, spec, (0, 2, 3), 1, generator=torch.Generator().manual_seed(4))
        want = quantize_along(t, spec, (0, 2, 3), 1, generator=torch.Generator().manual_seed(4))
    assert _same(got, want)
    assert got.stride() == error.stride()


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (8, 0, 4, 4), (8, 6, 0, 4)])
def test_a_zero_size_tensor_quantizes_to_an_empty_one(name, shape):
    spec = SPECS[name]
    x = torch.empty(shape)
    assert fake_quantize(x, spec, 1).shape == shape
    if spec.is_integer:
        codes, scale = quantize_codes(x, spec, 1)
        assert codes.shape == shape and torch.isfinite(scale).all()


def test_the_issue_reproduction_quantizes():
    x = torch.randn(4, 10)[:, :5]
    spec = QuantSpec(bits=4, rounding="stochastic")
    got = fake_quantize(x, spec, generator=torch.Generator().manual_seed(0))
    want = fake_quantize(x.contiguous(), spec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)


def _configs() -> dict[str, QuantConfig]:
    configs = {name: preset_config(name) for name in list_presets()}
    configs["int8-backend"] = QuantConfig(grad=QuantSpec(4, "stochastic"), backend="int8")
    configs["operands8"] = QuantConfig(
        grad=QuantSpec(4, "stochastic", "sample"), backward_operand_bits=8
    )
    return configs


@pytest.mark.parametrize("name", sorted(_configs()))
def test_a_layer_backward_takes_a_strided_error(name):
    """The error reaching a quantized layer as a transposed view (as after ``torch.cat`` or a
    transpose downstream) gives the gradients of the same error made contiguous."""
    config = _configs()[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    a = torch.randn(12, 16, generator=g)
    v = torch.randn(8, 16, generator=g)
    conv_error = torch.randn(6, 5, 5, 4, generator=g).permute(0, 3, 1, 2)  # channels-last
    linear_error = torch.randn(8, 12, generator=g).t()  # a transpose
    results = []
    for make in (lambda e: e, lambda e: e.contiguous()):
        torch.manual_seed(3)
        leaves = [t.clone().requires_grad_() for t in (x, w, a, v)]
        conv2d(leaves[0], leaves[1], padding=1, config=config).backward(make(conv_error))
        linear(leaves[2], leaves[3], config=config).backward(make(linear_error))
        results.append([t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
