"""The published gradient quantizers as named presets (their papers' defaults), and their registry.

Each preset fixes how the backward error is quantized in each backward product, with the
number format, scale convention and rounding its paper or specification defines; forward
quantization, the backend and MetaGrad are set separately (``--method metagrad --grad-quant
rht-mxfp4`` composes them). The other operand of each backward product stays in full precision.
The paper's whole training recipe (both backward operands, the forward pass, the layers kept in
high precision) is a separate option: :mod:`metagrad.quant.recipes`.

================  ===========================================================================
``plain``         INT4, one float32 scale per tensor, stochastic rounding.
``psq``           INT4, one scale per sample, stochastic rounding (per-sample quantization,
                  Chen et al. 2020, "A Statistical Framework for Low-bitwidth Training").
``bhq``           ``psq`` after a block Householder transform across samples (groups of 8):
                  block Householder quantization, same paper.
``luq``           logarithmic 4-bit format (zero and seven powers of two, one scale per
                  tensor), stochastic rounding between powers of two and stochastic underflow
                  below the smallest, with a 16-bit dither so that underflow keeps small values
                  at their probability (Chmiel et al., ICLR 2023).
``rht-mxfp4``     FP4 E2M1 in blocks of 32 with power-of-two (E8M0) scales by the OCP MX v1.0
                  rule (shared exponent ``floor(log2 amax) - 2``; the top values saturate)
                  along the contraction axis, after a randomized Hadamard transform of blocks of
                  32, in both products, stochastic rounding (OCP Microscaling Formats v1.0;
                  Quartet, Castro et al. 2025; Tseng et al. 2025).
``rht-nvfp4``     FP4 E2M1 in blocks of 16 with FP8 E4M3 scales rounded to nearest (at most
                  448) under a float32 tensor scale, elements saturating, stochastic rounding; a
                  16-point randomized Hadamard transform in the weight-gradient product only
                  (NVIDIA, "Pretraining Large Language Models with NVFP4", 2025).
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


LUQ_DITHER_BITS = 16
"""LUQ's dither: at 8 bits every value below 1/512 of the smallest level would flush to zero."""


@register_preset("luq")
def luq() -> QuantConfig:
    """Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications at Standard
    Formats" (ICLR 2023): radix-2 levels, stochastic rounding and stochastic underflow."""
    spec = QuantSpec(format="log4", rounding="stochastic", dither_bits=LUQ_DITHER_BITS)
    return QuantConfig(grad=spec)


MXFP4 = QuantSpec(
    format="fp4_e2m1",
    rounding="stochastic",
    granularity="block",
    block_size=32,
    scale_format="e8m0",
    scale_rounding="floor",
)
"""MXFP4 with stochastic rounding: the OCP MX v1.0 format and shared-exponent rule."""
NVFP4 = QuantSpec(
    format="fp4_e2m1",
    rounding="stochastic",
    granularity="block",
    block_size=16,
    scale_format="e4m3",
    scale_rounding="nearest",
)
"""NVFP4 with stochastic rounding: NVIDIA's blocks of 16 with E4M3 scales rounded to nearest
under a float32 tensor scale."""


@register_preset("rht-mxfp4")
def rht_mxfp4() -> QuantConfig:
    """MXFP4 (OCP Microscaling Formats v1.0: E8M0 shared exponent ``floor(log2 amax) - 2``)
    after a 32-point randomized Hadamard transform, stochastic rounding, in both products
    (Quartet, Castro et al. 2025; Tseng et al., "Training LLMs with MXFP4", 2025)."""
    return QuantConfig(grad=dataclasses.replace(MXFP4, transform="rht", transform_block=32))


@register_preset("rht-nvfp4")
def rht_nvfp4() -> QuantConfig:
    """NVFP4 as NVIDIA's recipe quantizes gradients ("Pretraining Large Language Models with
    NVFP4", 2025): E4M3 block scales rounded to nearest, stochastic rounding, and a 16-point
    randomized Hadamard transform in the weight-gradient product only."""
    wgrad = dataclasses.replace(NVFP4, transform="rht", transform_block=16)
    return QuantConfig(grad=NVFP4, grad_for_weight_grad=wgrad)


@register_preset("fp8-e5m2")
def fp8_e5m2() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(format="fp8_e5m2", rounding="nearest"))
