"""Convolution and linear layers whose backward pass runs on a quantized error.

For ``y = f(x, W)`` the backward pass receives ``e = dL/dy``. It is quantized once, ``q = Q(e)``,
and that one tensor feeds both products: ``dL/dx = f_x^T(q, W)`` and ``dL/dW = f_W^T(x, q)`` (and
the bias gradient, the sum of ``q``). Forward quantization of weights and activations (QAT with a
straight-through estimator) is a separate, optional setting of the same :class:`QuantConfig`.

Mixed precision: under ``torch.autocast`` the layer computes its forward in the autocast dtype
(bf16 or fp16) like PyTorch's own layers, keeps the low-precision operands for the backward pass,
and runs both backward products in that dtype on the error's integer codes, with the scales
applied in float32 (:mod:`metagrad.backward.products`) straight into the dtypes of the inputs
(a float32 weight gets a float32 gradient, not a rounded bf16 one).

Inference: when no gradient is recorded (``torch.no_grad()``, ``torch.inference_mode()``, or no
input, weight or bias requiring grad), ``linear``/``conv2d`` are ``F.linear``/``F.conv2d`` on the
forward-quantized operands (QAT's forward quantization still applies: it changes the values),
with no autograd Function and nothing saved for a backward pass. The one exception is a config
whose backend quantizes the operands itself (``config.quantizes_operands``) with forward
quantization on: the backend's forward then computes the output, as it does when training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad.backward import get_backend
from metagrad.quant.quantize import quantize_input, quantize_weight
from metagrad.quant.spec import QuantConfig

IntPair = tuple[int, int]


def _pair(v: int | tuple[int, ...]) -> IntPair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resolve_padding(
    padding: str | int | tuple[int, ...], kernel_size: IntPair, dilation: IntPair
) -> IntPair:
    """Numeric padding for ``"valid"``, ``"same"`` (odd receptive field) or an int/pair."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        span = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if any(s % 2 for s in span):
            raise ValueError(
                "padding='same' needs a symmetric padding (odd kernel size with this dilation); "
                f"got kernel_size={kernel_size}, dilation={dilation}"
            )
        return (span[0] // 2, span[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'valid', 'same' or integers, got {padding!r}")
    return _pair(padding)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type`` now, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _dtypes(*tensors: Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


def _cast_grads(grads, dtypes) -> tuple[Tensor | None, ...]:
    return tuple(None if g is None else g.to(d) for g, d in zip(grads, dtypes, strict=True))


def _forward_operands(x, weight, bias, config: QuantConfig):
    """The operands a backend's forward takes: under autocast, cast to its dtype, except a
    weight (and bias) that the backend quantizes from its own precision."""
    low = autocast_dtype(x.device.type)
    x = _cast(x, low)
    if not _quantizes_inside(config):
        weight, bias = _cast(weight, low), _cast(bias, low)
    return x, weight, bias, low


def _quantizes_inside(config: QuantConfig) -> bool:
    """Whether the backend's forward quantizes weight and input itself (and keeps their
    full-precision values for the backward pass)."""
    return config.quantizes_operands or config.requantizes_operands


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` now (else it is inference)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_forward(x, weight, bias, config: QuantConfig):
    """``(y, x, weight, saved)``: the backend's linear forward on the operands it takes."""
    x, weight, bias, low = _forward_operands(x, weight, bias, config)
    y, saved = get_backend(config.backend).linear_forward(x, weight, bias, config)
    return (y if low is None else y.to(low)), x, weight, saved


def _conv2d_forward(x, weight, bias, conv, config: QuantConfig):
    """``(y, x, weight, saved)``: the backend's convolution forward, as :func:`_linear_forward`."""
    x, weight, bias, low = _forward_operands(x, weight, bias, config)
    y, saved = get_backend(config.backend).conv2d_forward(x, weight, bias, conv, config)
    return (y if low is None else y.to(low)), x, weight, saved


class _QuantConv2dFn(torch.autograd.Function):
    """Convolution with a quantized backward, both computed by ``config``'s backend.

    When ``config.quantizes_operands`` or ``config.requantizes_operands``, ``x`` and ``weight``
    arrive unquantized and the forward quantization (as ``config.weight`` /
    ``config.activation`` say) happens in the backend's ``conv2d_forward``, which keeps what the
    backward pass needs; otherwise they arrive already fake-quantized. Under autocast the
    operands are cast to its dtype first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.config = config
        ctx.dtypes = _dtypes(x, weight, bias)
        y, x, weight, saved = _conv2d_forward(x, weight, bias, ctx.conv, config)
        ctx.save_for_backward(x, weight, *saved)
        return y

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (need_x, need_w, need_b and ctx.has_bias)
        config: QuantConfig = ctx.config
        backend = get_backend(config.backend)
        grads = backend.conv2d_backward(e, x, weight, ctx.conv, config, mask, ctx.dtypes, saved)
        return (*_cast_grads(grads, ctx.dtypes), None, None, None, None, None)


class _QuantLinearFn(torch.autograd.Function):
    """Linear layer with a quantized backward (as the conv Function)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        ctx.has_bias = bias is not None
        ctx.config = config
        ctx.dtypes = _dtypes(x, weight, bias)
        y, x, weight, saved = _linear_forward(x, weight, bias, config)
        ctx.save_for_backward(x, weight, *saved)
        return y

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (need_x, need_w, need_b and ctx.has_bias)
        config: QuantConfig = ctx.config
        backend = get_backend(config.backend)
        grads = backend.linear_backward(e, x, weight, config, mask, ctx.dtypes, saved)
        return (*_cast_grads(grads, ctx.dtypes), None)


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | IntPair = 1,
    padding: str | int | IntPair = 0,
    dilation: int | IntPair = 1,
    groups: int = 1,
    *,
    config: QuantConfig,
) -> Tensor:
    """``F.conv2d`` with forward and backward quantization as ``config`` says (without a
    recorded gradient: plain ``F.conv2d`` on the forward-quantized operands)."""
    if not config.quantizes_forward and not records_grad(input, weight, bias):  # inference
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    stride, dilation = _pair(stride), _pair(dilation)
    padding = resolve_padding(padding, (weight.shape[2], weight.shape[3]), dilation)
    if not records_grad(input, weight, bias):
        if config.quantizes_operands and config.quantizes_forward:
            conv = (stride, padding, dilation, groups)
            return _conv2d_forward(input, weight, bias, conv, config)[0]
        weight = quantize_weight(weight, config.weight)
        input = quantize_input(input, config.activation, 1)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if _quantizes_inside(config):  # forward quantization happens inside the Function
        return _QuantConv2dFn.apply(input, weight, bias, stride, padding, dilation, groups, config)
    weight = quantize_weight(weight, config.weight, ste=True)
    input = quantize_input(input, config.activation, 1, ste=True)
    if not config.quantizes_backward:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _QuantConv2dFn.apply(input, weight, bias, stride, padding, dilation, groups, config)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, config: QuantConfig):
    """``F.linear`` with forward and backward quantization as ``config`` says (without a
    recorded gradient: plain ``F.linear`` on the forward-quantized operands)."""
    if not config.quantizes_forward and not records_grad(input, weight, bias):  # inference
        return F.linear(input, weight, bias)
    if not records_grad(input, weight, bias):
        if config.quantizes_operands and config.quantizes_forward:
            return _linear_forward(input, weight, bias, config)[0]
        weight = quantize_weight(weight, config.weight)
        input = quantize_input(input, config.activation, -1)
        return F.linear(input, weight, bias)
    if _quantizes_inside(config):  # forward quantization happens inside the Function
        return _QuantLinearFn.apply(input, weight, bias, config)
    weight = quantize_weight(weight, config.weight, ste=True)
    input = quantize_input(input, config.activation, -1, ste=True)
    if not config.quantizes_backward:
        return F.linear(input, weight, bias)
    return _QuantLinearFn.apply(input, weight, bias, config)
