"""The published gradient quantizers as named presets (their papers' defaults), and their registry.

Each preset fixes how the backward error is quantized in each backward product; forward
quantization, the backend and MetaGrad are set separately (``--method metagrad --grad-quant
rht-mxfp4`` composes them). The other operand of each backward product stays in full precision.

================  ===========================================================================
``plain``         INT4, one float32 scale per tensor, stochastic rounding.
``psq``           INT4, one scale per sample, stochastic rounding (per-sample quantization,
                  Chen et al. 2020, "A Statistical Framework for Low-bitwidth Training").
``bhq``           ``psq`` after a block Householder transform across samples (groups of 8):
                  block Householder quantization, same paper.
``luq``           logarithmic 4-bit format (zero and seven powers of two, one scale per
                  tensor), stochastic rounding between powers of two and stochastic underflow
                  below the smallest (Chmiel et al., ICLR 2023).
``rht-mxfp4``     FP4 E2M1 in blocks of 32 with power-of-two (E8M0) scales along the
                  contraction axis, after a randomized Hadamard transform of blocks of 32, in
                  both products, stochastic rounding (Quartet, Castro et al. 2025; Tseng et al.
                  2025).
``rht-nvfp4``     FP4 E2M1 in blocks of 16 with FP8 E4M3 scales under a float32 tensor scale,
                  stochastic rounding; a 16-point randomized Hadamard transform in the
                  weight-gradient product only (NVIDIA's NVFP4 training recipe, 2025).
``fp8-e5m2``      FP8 E5M2 with one float32 scale per tensor, rounded to nearest: the gradient
                  format of production FP8 training (torchao float8, Transformer Engine).
================  ===========================================================================

A new method is one function returning a :class:`~metagrad.nn.functional.QuantConfig` (its
gradient settings), registered with :func:`register_preset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.registry import Registry

PresetFn = Callable[[], QuantConfig]

_PRESETS: Registry[PresetFn] = Registry("gradient preset")


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Register ``fn() -> QuantConfig`` as the gradient preset ``name`` (decorator)."""
    return lambda fn: _PRESETS.add(name, fn)


def list_presets() -> list[str]:
    """Names of the registered presets, in registration order."""
    return list(_PRESETS)


def preset_config(name: str, base: QuantConfig | None = None) -> QuantConfig:
    """The preset ``name``'s gradient settings on top of ``base`` (its forward and backend).

    The preset's backward specs replace ``base``'s; ``base`` defaults to ``QuantConfig()``.
    """
    preset = _PRESETS.lookup(name)()
    return preset if base is None else base.with_backward_of(preset)


@register_preset("plain")
def plain() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(bits=4, rounding="stochastic"))


@register_preset("psq")
def psq() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(bits=4, rounding="stochastic", granularity="sample"))


@register_preset("bhq")
def bhq() -> QuantConfig:
    spec = QuantSpec(
        bits=4, rounding="stochastic", granularity="sample", transform="bhq", transform_block=8
    )
    return QuantConfig(grad=spec)


@register_preset("luq")
def luq() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(format="log4", rounding="stochastic"))


MXFP4 = QuantSpec(
    format="fp4_e2m1",
    rounding="stochastic",
    granularity="block",
    block_size=32,
    scale_format="e8m0",
)
NVFP4 = QuantSpec(
    format="fp4_e2m1",
    rounding="stochastic",
    granularity="block",
    block_size=16,
    scale_format="e4m3",
)


@register_preset("rht-mxfp4")
def rht_mxfp4() -> QuantConfig:
    return QuantConfig(grad=dataclasses.replace(MXFP4, transform="rht", transform_block=32))


@register_preset("rht-nvfp4")
def rht_nvfp4() -> QuantConfig:
    wgrad = dataclasses.replace(NVFP4, transform="rht", transform_block=16)
    return QuantConfig(grad=NVFP4, grad_for_weight_grad=wgrad)


@register_preset("fp8-e5m2")
def fp8_e5m2() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(format="fp8_e5m2", rounding="nearest"))
