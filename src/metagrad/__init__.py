"""metagrad: low-precision backward passes for PyTorch, with MetaGrad's hypernetwork correction."""

from metagrad import (
    _moved,
    _startup,  # first, before torch loads: see its docstring
    kernels,
)
from metagrad._version import __version__ as __version__
from metagrad.meta.hyper import create_hypernet
from metagrad.meta.optim import MetaGrad
from metagrad.models import create_model, list_models
from metagrad.nn.attention import QuantMultiheadAttention
from metagrad.nn.convert import (
    ConversionReport,
    quantize,
    quantize_,
    register_handler,
    unquantize_,
)
from metagrad.nn.coverage import register_non_matmul
from metagrad.nn.layers import QuantConv2d, QuantLinear
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.quantize import fake_quantize, quantize_codes
from metagrad.quant.recipes import get_recipe, list_recipes
from metagrad.quant.spec import QuantConfig, QuantSpec

__all__ = [
    "ConversionReport",
    "MetaGrad",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSpec",
    "create_hypernet",
    "create_model",
    "fake_quantize",
    "get_recipe",
    "kernels",
    "list_models",
    "list_presets",
    "list_recipes",
    "preset_config",
    "quantize",
    "quantize_",
    "quantize_codes",
    "register_handler",
    "register_non_matmul",
    "unquantize_",
]


_moved.install()
_startup.started()
