"""The ``int8`` backend: integer products (int8 × int8 → int32) for quantized layers.

For ``y = f(x, W)`` and the error ``e = dL/dy``:

* the error is quantized once, exactly as :func:`metagrad.quant.quantize_codes` does (any
  ``k <= 8`` bits), and held as int8 codes ``c_e`` with their scale ``s_e``;
* the other operand of each product (the weight for ``dL/dx``, the layer input for ``dL/dW``) is
  quantized by :func:`quantize_operand` to 8 bits (nearest, symmetric) with one scale per tensor or
  per channel on the product's *output* axis (input channel / input feature), so it factors out;
* an error scale on a product's contraction axis (per-channel ``s_e`` for ``dL/dx``, per-sample
  ``s_e`` for ``dL/dW``) is folded into the float operand before that operand is quantized;
* each product is one ``torch._int_mm`` call through :func:`int_mm` (which also meets its size
  rules by zero-padding), and the exact integer result is rescaled to float once.

Convolutions use channels-last int8 im2col (:mod:`~metagrad.backward.int8.im2col`):
``dL/dW = patches^T @ c_e`` and ``dL/dx`` is the transposed convolution of the error codes with
the flipped weight;
with stride 1 and "same" padding one patch matrix (the error's) serves both products. Grouped
convolutions fall back to :func:`conv2d_backward_simulated` (float products on the same quantized
operands); :func:`metagrad.backward.fallback_report` says which layers do.

With forward quantization of both weight and activation (``config.weight`` / ``config.activation``
enabled), :func:`conv2d_forward` / :func:`linear_forward` run the forward product on the integer
path too and keep the int8 codes for the backward pass, which reuses them when their scale
factors out (no requantization).

The ``simulate`` backend with ``QuantConfig(backward_operand_bits=8)`` runs the ``*_simulated``
functions: the same codes and scales, produced by the same functions, with float products, so it
reproduces this backend to float32 rounding.

On CPU, temporaries (patch matrices, int32 results, error codes) live in a per-thread workspace
reused across calls, which avoids page-faulting fresh buffers of tens of MB at every layer;
:func:`clear_workspace` frees it.

Each backward product takes one of two routes on the same codes, integer products or float
products (bf16 under mixed precision): fixed, or per layer product the faster one, measured once
per shape and machine and cached on disk (:func:`set_routes`,
:mod:`~metagrad.backward.int8.routes`).

Modules, each of which imports only the ones above it:

* :mod:`~metagrad.backward.int8.settings`: :class:`BackwardSettings`, what the backend reads of a
  layer's ``config``;
* :mod:`~metagrad.backward.int8.intmm`: :func:`int_mm`, its size rules and the CPU workspace;
* :mod:`~metagrad.backward.int8.codes`: quantization into int8 codes, backward operands, rescaling;
* :mod:`~metagrad.backward.int8.forward`: forward quantization and :class:`ForwardState`;
* :mod:`~metagrad.backward.int8.im2col`: convolution geometry and its int8 buffers;
* :mod:`~metagrad.backward.int8.conv` / :mod:`~metagrad.backward.int8.linear`: the layers'
  forward and backward;
* :mod:`~metagrad.backward.int8.routes`: which route each product takes (fixed or measured),
  the route cache;
* :mod:`~metagrad.backward.int8.backend`: the registered backend, its dispatch by route and its
  fallbacks (imported by :mod:`metagrad.backward`, after this package).
"""

from metagrad.backward.int8.codes import OPERAND_BITS as OPERAND_BITS
from metagrad.backward.int8.codes import OPERAND_QMAX as OPERAND_QMAX
from metagrad.backward.int8.codes import Quantized as Quantized
from metagrad.backward.int8.codes import backward_operand as backward_operand
from metagrad.backward.int8.codes import exact_code_dtype as exact_code_dtype
from metagrad.backward.int8.codes import quantize_codes_int8 as quantize_codes_int8
from metagrad.backward.int8.codes import quantize_operand as quantize_operand
from metagrad.backward.int8.conv import conv2d_backward as conv2d_backward
from metagrad.backward.int8.conv import conv2d_backward_simulated as conv2d_backward_simulated
from metagrad.backward.int8.conv import conv2d_forward as conv2d_forward
from metagrad.backward.int8.forward import ForwardState as ForwardState
from metagrad.backward.int8.intmm import clear_workspace as clear_workspace
from metagrad.backward.int8.intmm import int_mm as int_mm
from metagrad.backward.int8.linear import linear_backward as linear_backward
from metagrad.backward.int8.linear import linear_backward_simulated as linear_backward_simulated
from metagrad.backward.int8.linear import linear_forward as linear_forward
from metagrad.backward.int8.routes import ROUTES as ROUTES
from metagrad.backward.int8.routes import route_record as route_record
from metagrad.backward.int8.routes import routes_mode as routes_mode
from metagrad.backward.int8.routes import set_routes as set_routes
from metagrad.backward.int8.settings import Grads as Grads
from metagrad.backward.int8.settings import IntPair as IntPair
from metagrad.backward.int8.settings import Mask as Mask

__all__ = [
    "OPERAND_BITS",
    "ROUTES",
    "ForwardState",
    "Quantized",
    "backward_operand",
    "clear_workspace",
    "conv2d_backward",
    "conv2d_backward_simulated",
    "conv2d_forward",
    "int_mm",
    "linear_backward",
    "linear_backward_simulated",
    "linear_forward",
    "quantize_codes_int8",
    "quantize_operand",
    "route_record",
    "routes_mode",
    "set_routes",
]
