"""The spec syntax: ``str(spec)`` and ``QuantSpec.parse`` invert each other; bad text is named."""

from __future__ import annotations

import random

import pytest

from metagrad.quant import formats, scaling, transforms
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.spec import (
    BACKWARD_FIELDS,
    GRANULARITIES,
    ROUNDINGS,
    QuantConfig,
    QuantSpec,
)

# transform -> block sizes it takes
TRANSFORM_BLOCKS = {
    "rht": [2, 4, 16, 32, 128, 1024],
    "bhq": [2, 3, 8, 100, 1024],
    "bhqs": [2, 3, 8, 100, 1024],
}


def _random_spec(rng: random.Random) -> QuantSpec:
    """Any valid spec: every format, granularity, block size, scale format and its roundings,
    rounding, dither, pre-scale, transform."""
    name = rng.choice([*formats.list_formats(), "fp32"])
    transform = rng.choice([None, *transforms.list_transforms()])
    scale_format = rng.choice(scaling.list_scale_formats())
    return QuantSpec(
        bits=rng.choice([2, 3, 4, 5, 6, 7, 8, 32]),
        format=None if name == "fp32" else name,
        rounding=rng.choice(ROUNDINGS),
        granularity=rng.choice(GRANULARITIES),
        block_size=rng.choice([1, 2, 16, 32, 33, 64, 1 << 16]),
        scale_format=scale_format,
        scale_rounding=rng.choice(scaling.list_scale_roundings(scale_format)),
        dither_bits=rng.choice([8, 16]),
        prescale=rng.choice([1.0, 0.75, 0.5, 1 / 3, 1e-05]),
        transform=transform,
        transform_block=rng.choice(TRANSFORM_BLOCKS[transform]) if transform else 128,
    )


def test_parse_inverts_str_for_many_random_specs():
    rng = random.Random(0)
    seen = set()
    for _ in range(6000):
        spec = _random_spec(rng)
        text = str(spec)
        assert QuantSpec.parse(text) == spec, text
        assert str(QuantSpec.parse(text)) == text  # str is canonical
        seen.add((spec.format, spec.granularity, spec.scale_format, spec.transform))
    named = [
        f
        for f in formats.list_formats()
        if not isinstance(formats.get_format(f), formats.IntFormat)
    ]
    combinations = (len(named) + 1) * len(GRANULARITIES) * len(scaling.list_scale_formats())
    assert len(seen) == combinations * (len(transforms.list_transforms()) + 1)  # all drawn


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("fp32", QuantSpec()),
        ("off", QuantSpec()),
        ("int4", QuantSpec(bits=4)),
        ("int4:sample:stochastic", QuantSpec(4, "stochastic", "sample")),
        ("int4:stochastic:sample", QuantSpec(4, "stochastic", "sample")),  # any order
        (" int8 : channel ", QuantSpec(8, granularity="channel")),
        ("fp8_e5m2", QuantSpec(format="fp8_e5m2")),
        ("fp4_e2m1:block", QuantSpec(format="fp4_e2m1", granularity="block")),
        (
            "fp4_e2m1:block32:e8m0:stochastic:rht32",
            QuantSpec(
                rounding="stochastic",
                granularity="block",
                format="fp4_e2m1",
                block_size=32,
                scale_format="e8m0",
                transform="rht",
                transform_block=32,
            ),
        ),
        ("int4:rht", QuantSpec(bits=4, transform="rht", transform_block=128)),
        (
            "int4:sample:bhq8",
            QuantSpec(4, granularity="sample", transform="bhq", transform_block=8),
        ),
        ("int4:nearest:tensor:float32", QuantSpec(bits=4)),  # defaults may be written
        ("int4:e8m0-up:dither8:pre1", QuantSpec(bits=4, scale_format="e8m0")),
        (
            "fp4_e2m1:block32:e8m0-floor:stochastic:pre0.75:rht64",
            QuantSpec(
                format="fp4_e2m1",
                rounding="stochastic",
                granularity="block",
                scale_format="e8m0",
                scale_rounding="floor",
                prescale=0.75,
                transform="rht",
                transform_block=64,
            ),
        ),
        (
            "fp4_e2m1:tile16:e4m3-nearest",
            QuantSpec(
                format="fp4_e2m1",
                granularity="tile",
                block_size=16,
                scale_format="e4m3",
                scale_rounding="nearest",
            ),
        ),
        (
            "log4:dither16:stochastic",
            QuantSpec(format="log4", rounding="stochastic", dither_bits=16),
        ),
        ("log4:dither16", QuantSpec(format="log4")),  # no dither without stochastic rounding
    ],
)
def test_spec_text(text, spec):
    assert QuantSpec.parse(text) == spec


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (QuantSpec(), "fp32"),
        (QuantSpec(32, "stochastic", "sample"), "fp32"),
        (QuantSpec(4, "stochastic"), "int4:stochastic"),
        (QuantSpec(format="fp8_e5m2"), "fp8_e5m2"),
        (QuantSpec(format="int4", granularity="channel"), "int4:channel"),
        (QuantSpec(format="log4", granularity="block", block_size=16), "log4:block16"),
        (QuantSpec(4, transform="rht"), "int4:rht128"),
        (
            QuantSpec(format="fp4_e2m1", granularity="tile", scale_format="e8m0", prescale=0.75),
            "fp4_e2m1:tile32:e8m0:pre0.75",
        ),
        (
            QuantSpec(4, "stochastic", scale_format="e8m0", scale_rounding="floor", dither_bits=16),
            "int4:e8m0-floor:stochastic:dither16",
        ),
    ],
)
def test_str_writes_the_canonical_form(spec, text):
    assert str(spec) == text


def test_settings_that_do_not_apply_take_their_defaults():
    assert QuantSpec(32, "stochastic", "sample", transform="rht") == QuantSpec()
    assert QuantSpec(bits=4, format="fp8_e5m2") == QuantSpec(format="fp8_e5m2")
    assert QuantSpec(4, block_size=16) == QuantSpec(4)
    assert QuantSpec(4, transform_block=16) == QuantSpec(4)
    assert QuantSpec(4, granularity="block", block_size=16) != QuantSpec(4, granularity="block")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int9", r"unknown number format 'int9'; available: fp32, off, int2, .*fp4_e2m1"),
        ("", "unknown number format ''"),
        (
            "int4:stochastc",
            r"unknown option 'stochastc'; expected a granularity .*block<N>.*"
            r"scale format \(float32, e8m0, e4m3\).*rounding \(nearest, stochastic\).*rht<N>",
        ),
        ("int4::sample", "empty option"),
        ("int4:nearest:stochastic", "'stochastic' gives the rounding again"),
        ("int4:sample:block16", "'block16' gives the granularity again"),
        ("int4:rht16:bhq8", "'bhq8' gives the transform again"),
        ("int4:block0", "block_size must be an integer in 1..65536, got 0"),
        ("int4:rht3", "rht block must be a power of two"),
        ("fp32:stochastic", r"fp32 \(full precision\) takes no options"),
        ("int4:e8m0:e4m3", "'e4m3' gives the scale format again"),
        ("int4:e8m0-floor:e4m3", "'e4m3' gives the scale format again"),
        ("int4:e4m3-floor", "scale format 'e4m3' has no scale rounding 'floor'; it has: up, n"),
        ("int4:float32-nearest", "scale format 'float32' has no scale rounding 'nearest'"),
        ("int4:e8m0-down", "unknown option 'e8m0-down'"),
        ("int4:stochastic:dither12", r"dither_bits must be one of \(8, 16\), got 12"),
        ("int4:pre1.5", r"prescale must be in \(0, 1\], got 1.5"),
        ("int4:pre0", r"prescale must be in \(0, 1\], got 0.0"),
        ("int4:pre0.5:pre0.75", "'pre0.75' gives the pre-scale again"),
        ("int4:tile0", "block_size must be an integer in 1..65536, got 0"),
    ],
)
def test_bad_text_is_one_line_naming_the_token(text, message):
    with pytest.raises(ValueError, match=message) as info:
        QuantSpec.parse(text)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"spec {text!r}")


def test_a_registered_scale_format_is_usable_by_name(monkeypatch):
    monkeypatch.setattr(scaling, "_SCALE_RULES", scaling._SCALE_RULES.copy())

    def doubled(scale, amax, max_value, tensor_amax):  # twice the headroom
        return scale * 2

    scaling.register_scale_format("double", doubled)
    spec = QuantSpec.parse("int4:block16:double")
    assert spec.scale_format == "double" and str(spec) == "int4:block16:double"
    import torch

    from metagrad.quant.quantize import quantize_along

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_along(x, spec, (1,))
    amax = x.reshape(4, 4, 16).abs().amax(-1, keepdim=True)
    step = (2 * amax / 7).expand(4, 4, 16).reshape(4, 64)  # doubled scales: steps of 2 amax / 7
    assert torch.allclose(torch.round(q / step) * step, q, atol=1e-6)
    with pytest.raises(ValueError, match="unknown scale format 'half'; available: float32, e8m0"):
        QuantSpec(4, scale_format="half")


def test_names_written_in_specs_are_checked_when_registered(monkeypatch):
    monkeypatch.setattr(formats, "_FORMATS", formats._FORMATS.copy())
    monkeypatch.setattr(transforms, "_TRANSFORMS", transforms._TRANSFORMS.copy())
    with pytest.raises(ValueError, match="number format name 'fp32' is reserved"):
        formats.register_format("fp32", formats.FloatFormat(8, 7))
    with pytest.raises(ValueError, match="number format name 'a:b' is not valid"):
        formats.register_format("a:b", formats.FloatFormat(4, 3))
    with pytest.raises(ValueError, match=r"transform name .had2. is not valid.*not ending in a"):
        transforms.register_transform("had2", transforms.RandomizedHadamard)


def test_an_option_two_registries_claim_is_ambiguous(monkeypatch):
    monkeypatch.setattr(scaling, "_SCALE_RULES", scaling._SCALE_RULES.copy())
    scaling.register_scale_format("rht", scaling.float32_scales)
    with pytest.raises(ValueError, match="option 'rht' is ambiguous"):
        QuantSpec.parse("int4:rht")


# ------------------------------------------------------------------------------ QuantConfig


def test_config_from_spec_strings():
    config = QuantConfig.from_specs(
        grad="fp4_e2m1:block16:e4m3-nearest:stochastic",
        grad_for_weight_grad="fp4_e2m1:block16:e4m3-nearest:stochastic:rht16",
        input_for_weight_grad=QuantSpec(bits=8),
        backend="simulate",
    )
    nvfp4 = preset_config("rht-nvfp4")
    assert config == nvfp4.with_backward_of(nvfp4, input_for_weight_grad=QuantSpec(bits=8))
    assert config.grad == QuantSpec.parse("fp4_e2m1:block16:e4m3-nearest:stochastic")
    assert config.weight_for_input_grad is None
    with pytest.raises(ValueError, match="spec 'int4:fast'"):
        QuantConfig.from_specs(grad="int4:fast")


@pytest.mark.parametrize("name", list_presets())
def test_a_preset_is_its_backward_fields(name):
    base = QuantConfig(grad=QuantSpec(bits=8), weight=QuantSpec(bits=4, granularity="channel"))
    config = preset_config(name, base)
    preset = preset_config(name)
    for field in BACKWARD_FIELDS:
        assert getattr(config, field) == getattr(preset, field)
    assert config.weight == base.weight
    plain = config.without_backward()
    assert not plain.quantizes_backward and plain.weight == base.weight
    assert plain.with_backward_of(preset) == config
