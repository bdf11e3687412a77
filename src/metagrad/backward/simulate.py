"""The ``simulate`` backend: quantized operands, float products.

Integer gradient specs with one scale per tensor, channel or sample run on the error's integer
codes (:mod:`metagrad.backward.products`: exact in bf16, scales in float32), the dither's key
drawn first, then a linear layer's whole backward as one registered kernel (a convolution's
codes and bias gradient: its products stay outside); compiled, the same bits as eager code; with
``backward_operand_bits=8`` on the same 8-bit operands as the ``int8`` backend, multiplied in
float (its ``*_simulated`` twins, so it reproduces that backend); any other spec is emulated
product by product (:mod:`metagrad.backward.emulated`), on the full-precision operands where an
operand spec quantizes them again (``QuantConfig.requantizes_operands``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.backward import emulated, int8
from metagrad.backward.backend import (
    Backend,
    Conv,
    DTypes,
    Grads,
    Mask,
    Saved,
    backward_operands,
    register_backend,
)
from metagrad.backward.products import (
    bias_grad,
    conv2d_grads,
    error_scales,
    float_operand,
    linear_grads,
)
from metagrad.kernels import kernel
from metagrad.quant.quantize import keyed_codes
from metagrad.quant.rounding import spec_dither_key
from metagrad.quant.spec import QuantConfig, QuantSpec


def _codes_linear(e: Tensor, x: Tensor, weight: Tensor, config, mask: Mask, dtypes: DTypes):
    key = spec_dither_key(e, config.grad)
    return _linear_from_codes(e, x, weight, config.grad, key, mask, dtypes)


@kernel(static_ints=True)
def _linear_from_codes(
    e: Tensor, x: Tensor, weight: Tensor, spec: QuantSpec, key, mask: Mask, dtypes: DTypes
) -> Grads:
    """A linear layer's gradients from its error's integer codes, after the dither's draw
    (``key``): the quantization, both products and the bias sum, one compiled call."""
    codes, scale = keyed_codes(e, spec, key, -1, dtype=x.dtype)
    scales = error_scales(scale, spec.granularity, 2)
    grad_x, grad_w = linear_grads(
        codes,
        scales,
        float_operand(x, x.dtype),
        float_operand(weight, x.dtype),
        mask,
        dtypes[:2],  # scaled straight into the inputs' own dtypes
    )
    return grad_x, grad_w, bias_grad(codes, scale, -1) if mask[2] else None


def _codes_conv2d(e: Tensor, x: Tensor, weight: Tensor, conv, config, mask: Mask, dtypes):
    key = spec_dither_key(e, config.grad)
    codes, scale, grad_b = _conv_codes(e, config.grad, key, x.dtype, mask[2])
    scales = error_scales(scale, config.grad.granularity, 4)
    grad_x, grad_w = conv2d_grads(
        codes,
        scales,
        float_operand(x, x.dtype),
        float_operand(weight, x.dtype),
        (x.shape, weight.shape),
        conv,
        mask,
        dtypes[:2],
    )
    return grad_x, grad_w, grad_b


@kernel
def _conv_codes(
    e: Tensor, spec: QuantSpec, key, dtype: torch.dtype, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A convolution error's integer codes, scale and bias gradient, after the dither's draw
    (``key``): one compiled call. The products stay outside it: compiled, a kernel is
    specialized to each convolution's stride, padding and groups, and a model with many of
    them (depthwise convolutions) would compile one per layer shape."""
    codes, scale = keyed_codes(e, spec, key, 1, dtype=dtype)
    return codes, scale, bias_grad(codes, scale, 1) if need_bias else None


class Simulate(Backend):
    """Quantize, then compute in float (any spec)."""

    def linear_forward(self, x, weight, bias, config):
        if not config.quantizes_operands:
            return super().linear_forward(x, weight, bias, config)
        y, state = int8.linear_forward(x, weight, bias, config, integer=False)
        return y, state.pack()

    def conv2d_forward(self, x, weight, bias, conv, config):
        if not config.quantizes_operands:
            return super().conv2d_forward(x, weight, bias, conv, config)
        y, state = int8.conv2d_forward(x, weight, bias, *conv, config, integer=False)
        return y, state.pack()

    def linear_backward(
        self, e, x, weight, config: QuantConfig, mask, dtypes, saved: Saved
    ) -> Grads:
        if config.quantizes_operands:
            state = int8.ForwardState.unpack(saved)
            return int8.linear_backward_simulated(e, x, weight, config, mask, state=state)
        if config.requantizes_operands:
            x, weight = backward_operands(x, weight, config, saved)
        if not config.uses_integer_path:
            return emulated.linear_backward(e, x, weight, config, mask, dtypes)
        return _codes_linear(e, x, weight, config, mask, dtypes)

    def conv2d_backward(
        self, e, x, weight, conv: Conv, config: QuantConfig, mask, dtypes, saved: Saved
    ) -> Grads:
        if config.quantizes_operands:
            state = int8.ForwardState.unpack(saved)
            return int8.conv2d_backward_simulated(e, x, weight, *conv, config, mask, state=state)
        if config.requantizes_operands:
            x, weight = backward_operands(x, weight, config, saved)
        if not config.uses_integer_path:
            return emulated.conv2d_backward(e, x, weight, conv, config, mask, dtypes)
        return _codes_conv2d(e, x, weight, conv, config, mask, dtypes)


register_backend("simulate", Simulate())
