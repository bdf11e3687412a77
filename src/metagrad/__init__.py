"""metagrad: low-precision backward passes for PyTorch, with MetaGrad's hypernetwork correction."""

from metagrad import kernels
from metagrad.functional import QuantConfig
from metagrad.hyper import create_hypernet
from metagrad.layers import QuantConv2d, QuantLinear, quantize, quantize_
from metagrad.models import create_model, list_models
from metagrad.optim import MetaGrad
from metagrad.quant import QuantSpec, fake_quantize, quantize_codes

__all__ = [
    "MetaGrad",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "create_hypernet",
    "create_model",
    "fake_quantize",
    "kernels",
    "list_models",
    "quantize",
    "quantize_",
    "quantize_codes",
]

__version__ = "0.1.0"
