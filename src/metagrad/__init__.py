"""metagrad: low-precision backward passes for PyTorch, with MetaGrad's hypernetwork correction."""

from metagrad.functional import QuantConfig
from metagrad.layers import QuantConv2d, QuantLinear, quantize, quantize_
from metagrad.quant import QuantSpec, fake_quantize, quantize_codes

__all__ = [
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "fake_quantize",
    "quantize",
    "quantize_",
    "quantize_codes",
]

__version__ = "0.1.0"
