"""Which products run where: per-device routes, backend dispatch, and the fallback record.

:data:`FLOAT_ROUTES` sends some layers on some devices to exact-code float products;
:func:`conv2d_backward_for` / :func:`linear_backward_for` pick the path by backend and route;
:func:`fallback_reason` / :func:`fallback_report` say which layers do not run all their products
as integer products, and why.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad.int8.conv import conv2d_backward, conv2d_backward_simulated
from metagrad.int8.forward import ForwardState, _integer_forward_reason
from metagrad.int8.linear import linear_backward, linear_backward_simulated
from metagrad.int8.settings import BackwardSettings, Grads, IntPair, Mask

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
    """The backward of a convolution with 8-bit operands, by backend and route."""
    integer = config.backend == "int8" and float_route(x.device, "conv2d") is None
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
    """The backward of a linear layer with 8-bit operands, by backend and route."""
    integer = config.backend == "int8" and float_route(x.device, "linear") is None
    backward = linear_backward if integer else linear_backward_simulated
    return backward(e, x, weight, config, output_mask, state=state)


def fallback_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` does not run all its products as integer products; None if it does.

    Only layers with a ``config`` whose backend is ``"int8"`` are concerned. Grouped or depthwise
    convolutions (groups > 1) run their backward as float products on the same quantized
    operands (the simulate path); a forward with weight/activation quantization that cannot be
    integer runs in float.
    """
    config = getattr(layer, "config", None)
    if config is None or getattr(config, "backend", None) != "int8":
        return None
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


def fallback_report(model: nn.Module) -> dict[str, str]:
    """``{qualified name: reason}`` for every int8 layer of ``model`` that falls back."""
    report = {}
    for name, module in model.named_modules():
        reason = fallback_reason(module)
        if reason is not None:
            report[name] = reason
    return report
