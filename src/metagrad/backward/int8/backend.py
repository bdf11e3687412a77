"""The ``int8`` backend: its per-device routes, its dispatch, and which layers fall back.

:data:`FLOAT_ROUTES` sends some layers on some devices to exact-code float products;
:func:`conv2d_backward_for` / :func:`linear_backward_for` pick the path by route;
:class:`Int8` is the registered backend and says which layers do not run all their products as
integer products, and why.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad.backward.backend import Backend, register_backend
from metagrad.backward.int8.conv import conv2d_backward, conv2d_backward_simulated, conv2d_forward
from metagrad.backward.int8.forward import ForwardState, _integer_forward_reason
from metagrad.backward.int8.linear import linear_backward, linear_backward_simulated, linear_forward
from metagrad.backward.int8.settings import BackwardSettings, Grads, IntPair, Mask
from metagrad.quant.spec import QuantConfig

FLOAT_ROUTES: dict[tuple[str, str], str] = {
    ("cuda", "conv2d"): (
        "on CUDA the integer convolution backward (im2col + torch._int_mm) is far slower than "
        "cuDNN's: its products run in bf16 on the same 8-bit codes (exact), scales in float32"
    ),
}
"""``(device type, layer kind) -> reason`` for the ``int8`` backend's products that run as float
products on the exact 8-bit codes (:func:`conv2d_backward_simulated`): the same numbers, faster
there (``benchmarks/speed.py`` measures both). A user may add or remove entries."""


def float_route(device: torch.device, kind: str) -> str | None:
    """Why the ``int8`` backend's ``kind`` layers on ``device`` use exact-code float products."""
    return FLOAT_ROUTES.get((device.type, kind))


def conv2d_backward_for(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    config: BackwardSettings,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """The ``int8`` backend's convolution backward, by route."""
    integer = float_route(x.device, "conv2d") is None
    backward = conv2d_backward if integer else conv2d_backward_simulated
    return backward(
        e, x, weight, stride, padding, dilation, groups, config, output_mask, state=state
    )


def linear_backward_for(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: BackwardSettings,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """The ``int8`` backend's linear backward, by route."""
    integer = float_route(x.device, "linear") is None
    backward = linear_backward if integer else linear_backward_simulated
    return backward(e, x, weight, config, output_mask, state=state)


class Int8(Backend):
    """Integer products through ``torch._int_mm``, for integer gradient specs."""

    operand_bits = 8

    def check(self, config: QuantConfig) -> str | None:
        if not config.grad.enabled:
            return "backend 'int8' needs quantized gradients (grad bits 2..8)"
        if not config.uses_integer_path:
            return (
                "backend 'int8' takes integer gradient specs and no per-product specs; "
                f"got grad={config.grad} (use backend 'simulate')"
            )
        return None

    def linear_forward(self, x, weight, bias, config):
        y, state = linear_forward(x, weight, bias, config, integer=True)
        return y, state.pack()

    def conv2d_forward(self, x, weight, bias, conv, config):
        y, state = conv2d_forward(x, weight, bias, *conv, config, integer=True)
        return y, state.pack()

    def linear_backward(self, e, x, weight, config, mask, dtypes, saved) -> Grads:
        state = ForwardState.unpack(saved)
        return linear_backward_for(e, x, weight, config, mask, state=state)

    def conv2d_backward(self, e, x, weight, conv, config, mask, dtypes, saved) -> Grads:
        state = ForwardState.unpack(saved)
        return conv2d_backward_for(e, x, weight, *conv, config, mask, state=state)

    def fallback_reason(self, layer: nn.Module) -> str | None:
        """Grouped or depthwise convolutions (groups > 1) run their backward as float products
        on the same quantized operands (the simulate path); a device route may send a layer
        kind to float products; a forward with weight/activation quantization that cannot be
        integer runs in float."""
        config = layer.config
        groups = getattr(layer, "groups", 1) if isinstance(layer, nn.Conv2d) else 1
        reasons = []
        weight = getattr(layer, "weight", None)
        kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        route = float_route(weight.device, kind) if weight is not None else None
        if route is not None:
            reasons.append(f"backward: {route}")
        elif groups != 1:
            reasons.append(
                f"groups={groups} > 1: backward falls back to float products on the same 8-bit "
                "quantized operands (simulate)"
            )
        forward = _integer_forward_reason(config, groups)
        if forward is not None:
            reasons.append(forward)
        return "; ".join(reasons) or None


INT8 = register_backend("int8", Int8())
