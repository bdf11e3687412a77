"""The published training recipes: each preset's paper, beyond its gradient quantizer.

A preset (:mod:`metagrad.quant.presets`) quantizes the backward error only; the paper it comes
from also quantizes the other operand of each backward product, the forward pass, and keeps some
layers in high precision. A :class:`Recipe` holds all of it: one :class:`QuantConfig` for every
quantized layer and the layers kept in full precision. Registered under the preset's name:
``get_recipe("rht-nvfp4")``, ``recipe_config("rht-nvfp4")``, ``metagrad train --grad-quant
rht-nvfp4 --recipe``; ``quantize_(model, get_recipe(name).layer_configs())`` converts a model.

==============  =============================================================================
``psq``, ``bhq``  Chen et al. 2020: the preset's error quantizer; forward weights and
                activations in INT8 (one scale per tensor, to nearest), which are also the
                other operand of each backward product; first and last layer in full
                precision. BHQ's recipe adds the per-group diagonal scaling of its
                reference code (the ``bhqs`` transform of :mod:`metagrad.quant.transforms`).
``luq``         Chmiel et al. 2023: the LUQ error quantizer; forward weights and activations
                in INT4 (one scale per tensor, to nearest; max scaling where the paper uses
                SAWB), which are also the other backward operands; first and last layer in
                full precision. SMP (averaged samples) and FNT (high-precision fine-tuning)
                are not reproduced.
``rht-mxfp4``   Tseng et al. 2025: every operand of both backward products in MXFP4 (OCP
                floor scales, the 3/4 pre-scale that keeps them from clipping, stochastic
                rounding) after a 64-point randomized Hadamard transform shared by the two
                operands of each product; the forward pass in full precision (bf16 under
                autocast); first and last layer in full precision.
``rht-nvfp4``   NVIDIA 2025: forward weights in NVFP4 with 16x16 tiles (the same quantized
                weight in the forward and the input-gradient product) and activations in 1x16
                blocks, rounded to nearest; the error as the preset (stochastic, a 16-point
                RHT in the weight-gradient product), and the activations of that product
                quantized from their high-precision values along the tokens after the same
                RHT; first and last layer in full precision (the paper keeps a few first and
                last blocks in BF16).
``fp8-e5m2``    Transformer Engine's and torchao's hybrid FP8 recipe: forward weights and
                activations in FP8 E4M3, the error in E5M2, one scale per tensor computed
                from the current tensor (not TE's delayed scaling), to nearest; the
                backward products use the forward's E4M3 tensors; first and last layer in full
                precision.
==============  =============================================================================

``plain`` comes from no paper and has no recipe. A new recipe is one function returning a
:class:`Recipe`, registered with :func:`register_recipe` under a registered preset's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from metagrad.quant.presets import MXFP4, NVFP4, list_presets, preset_config
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.registry import Registry

FIRST_AND_LAST: tuple[str, ...] = ("stem.0", "classifier")
"""The first layer and the final linear layer of the registered models
(``metagrad.models.FIRST_CONV_NAME``, ``CLASSIFIER_NAME``): what the recipes keep in full
precision unless told other names."""


@dataclass(frozen=True)
class Recipe:
    """A paper's training recipe: every quantized layer's config, and the layers it keeps in
    full precision (qualified-name patterns of :func:`~metagrad.nn.convert.quantize_`)."""

    config: QuantConfig
    high_precision: tuple[str, ...] = FIRST_AND_LAST

    def layer_configs(
        self, high_precision: tuple[str, ...] | None = None
    ) -> dict[str, QuantConfig | None]:
        """``quantize_``'s mapping: the high-precision layers (default :attr:`high_precision`:
        pass your model's names) to None, every other layer to :attr:`config`."""
        keep = self.high_precision if high_precision is None else high_precision
        return {**dict.fromkeys(keep), "*": self.config}


RecipeFn = Callable[[], Recipe]

_RECIPES: Registry[RecipeFn] = Registry("recipe")


def register_recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    """Register ``fn() -> Recipe`` as the recipe of the preset ``name`` (decorator)."""

    def register(fn: RecipeFn) -> RecipeFn:
        if name not in list_presets():
            raise ValueError(f"recipe {name!r} names no preset; available: {list_presets()}")
        return _RECIPES.add(name, fn)

    return register


def list_recipes() -> list[str]:
    """The presets that have a recipe, in registration order."""
    return list(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe of the preset ``name``."""
    return _RECIPES.lookup(name)()


def recipe_config(name: str, base: QuantConfig | None = None) -> QuantConfig:
    """The config of the recipe ``name``'s quantized layers, with ``base``'s backend."""
    config = get_recipe(name).config
    return config if base is None else dataclasses.replace(config, backend=base.backend)


def _forward(base: str, weight: QuantSpec, activation: QuantSpec) -> QuantConfig:
    """The preset ``base``'s backward, with ``weight`` and ``activation`` forward."""
    return dataclasses.replace(preset_config(base), weight=weight, activation=activation)


@register_recipe("psq")
def psq() -> Recipe:
    int8 = QuantSpec(bits=8)
    return Recipe(_forward("psq", int8, int8))


@register_recipe("bhq")
def bhq() -> Recipe:
    int8 = QuantSpec(bits=8)
    config = _forward("bhq", int8, int8)
    scaled = dataclasses.replace(config.grad, transform="bhqs")  # the per-group diagonal scaling
    return Recipe(dataclasses.replace(config, grad=scaled))


@register_recipe("luq")
def luq() -> Recipe:
    int4 = QuantSpec(bits=4)
    return Recipe(_forward("luq", int4, int4))


MXFP4_RECIPE_BLOCK = 64
"""Tseng et al.'s randomized Hadamard transform size."""
MXFP4_PRESCALE = 0.75
"""Tseng et al.'s pre-scale: OCP-scaled FP4 values reach below 8, times 3/4 below 6."""


@register_recipe("rht-mxfp4")
def rht_mxfp4() -> Recipe:
    operand = dataclasses.replace(
        MXFP4, prescale=MXFP4_PRESCALE, transform="rht", transform_block=MXFP4_RECIPE_BLOCK
    )
    config = QuantConfig(
        grad=operand,
        weight=QuantSpec(),
        weight_for_input_grad=operand,
        input_for_weight_grad=operand,
    )
    return Recipe(config)


NVFP4_WEIGHT = dataclasses.replace(NVFP4, rounding="nearest", granularity="tile")
"""NVIDIA's weights: 16x16 tiles, so both products of a linear layer see the same values."""
NVFP4_ACTIVATION = dataclasses.replace(NVFP4, rounding="nearest")


@register_recipe("rht-nvfp4")
def rht_nvfp4() -> Recipe:
    wgrad_input = dataclasses.replace(NVFP4_ACTIVATION, transform="rht", transform_block=16)
    config = dataclasses.replace(
        preset_config("rht-nvfp4"),
        weight=NVFP4_WEIGHT,
        activation=NVFP4_ACTIVATION,
        input_for_weight_grad=wgrad_input,
    )
    return Recipe(config)


@register_recipe("fp8-e5m2")
def fp8_e5m2() -> Recipe:
    e4m3 = QuantSpec(format="fp8_e4m3")
    return Recipe(_forward("fp8-e5m2", e4m3, e4m3))
