"""Quantizers: number formats, scales, transforms and rounding, composed by a :class:`QuantSpec`.

The bottom layer of the package (it imports only :mod:`metagrad.registry` and
:mod:`metagrad.kernels`): :mod:`~metagrad.quant.spec` (specs, their text, and layer configs),
:mod:`~metagrad.quant.formats`, :mod:`~metagrad.quant.scaling`, :mod:`~metagrad.quant.transforms`,
:mod:`~metagrad.quant.quantize` (the quantizers; :mod:`~metagrad.quant.transformed` after a
transform), :mod:`~metagrad.quant.presets` (the published gradient quantizers by name) and
:mod:`~metagrad.quant.recipes` (their papers' whole training recipes).
"""

from metagrad.quant.formats import register_format
from metagrad.quant.presets import list_presets, preset_config, register_preset
from metagrad.quant.quantize import (
    fake_quantize,
    fake_quantize_ste,
    prepare_transform,
    quantize_along,
    quantize_codes,
    quantize_transformed,
)
from metagrad.quant.recipes import get_recipe, list_recipes, recipe_config, register_recipe
from metagrad.quant.scaling import register_scale_format
from metagrad.quant.spec import FULL_PRECISION_BITS, QuantConfig, QuantSpec
from metagrad.quant.transforms import register_transform

__all__ = [
    "FULL_PRECISION_BITS",
    "QuantConfig",
    "QuantSpec",
    "fake_quantize",
    "fake_quantize_ste",
    "get_recipe",
    "list_presets",
    "list_recipes",
    "prepare_transform",
    "preset_config",
    "quantize_along",
    "quantize_codes",
    "quantize_transformed",
    "recipe_config",
    "register_format",
    "register_preset",
    "register_recipe",
    "register_scale_format",
    "register_transform",
]
