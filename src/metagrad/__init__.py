"""metagrad: low-precision backward passes for PyTorch, with MetaGrad's hypernetwork correction."""

from metagrad import kernels
from metagrad.attention import QuantMultiheadAttention
from metagrad.convert import ConversionReport, quantize, quantize_, register_handler
from metagrad.functional import QuantConfig
from metagrad.hyper import create_hypernet
from metagrad.layers import QuantConv2d, QuantLinear
from metagrad.models import create_model, list_models
from metagrad.optim import MetaGrad
from metagrad.quant import QuantSpec, fake_quantize, quantize_codes

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
    "kernels",
    "list_models",
    "quantize",
    "quantize_",
    "quantize_codes",
    "register_handler",
]

__version__ = "0.1.0"
