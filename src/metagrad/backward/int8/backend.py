"""The ``int8`` backend: its dispatch by route, and which layers fall back.

:func:`conv2d_backward_for` / :func:`linear_backward_for` run each backward product on its route
(:mod:`~metagrad.backward.int8.routes`: fixed, or chosen by measurement); :class:`Int8` is the
registered backend and says which layers do not run all their products as integer products, and
why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from metagrad.backward.backend import Backend, register_backend
from metagrad.backward.int8.conv import conv2d_backward, conv2d_backward_simulated, conv2d_forward
from metagrad.backward.int8.forward import ForwardState, _integer_forward_reason
from metagrad.backward.int8.linear import linear_backward, linear_backward_simulated, linear_forward
from metagrad.backward.int8.routes import (
    FLOAT,
    FLOAT_ROUTES,
    INTEGER,
    ROUTES,
    Plan,
    ProductKey,
    fixed_route,
    float_route,
    routes_mode,
)
from metagrad.backward.int8.settings import BackwardSettings, Grads, IntPair, Mask
from metagrad.quant.spec import QuantConfig

__all__ = [
    "FLOAT_ROUTES",
    "INT8",
    "Int8",
    "conv2d_backward_for",
    "float_route",
    "layer_routes",
    "linear_backward_for",
]

Backward = Callable[[Mask], Grads]
"""``mask -> grads``: one layer's backward on one route, for the products ``mask`` asks for."""


def layer_routes(
    kind: str,
    x: Tensor,
    weight: Tensor,
    conv: tuple[IntPair, IntPair, IntPair] | None,
    groups: int,
    config: BackwardSettings,
    output_mask: Mask,
    routes: dict[str, Backward],
) -> tuple[str, str]:
    """The routes of ``dL/dx`` and ``dL/dW`` of a ``kind`` layer now (:func:`routes_mode`).

    ``routes``: the layer's backward on each route, which a first measurement times.
    """
    fixed = fixed_route(x.device, kind)
    if torch.compiler.is_compiling() or groups != 1 or routes_mode() == "fixed":
        return fixed, fixed
    products = tuple(p for p, need in zip(("dx", "dw"), output_mask[:2], strict=True) if need)
    if not products:
        return fixed, fixed
    key = ProductKey.of(kind, products, x, weight, conv, config.grad.granularity)
    stochastic = config.grad.rounding == "stochastic"

    def run(plan: Plan) -> Grads:
        chosen = (plan.get("dx", fixed), plan.get("dw", fixed))
        return _run_routes(routes, chosen, output_mask, stochastic, x.device)

    plan = ROUTES.choose(key, run, x.device)
    return plan.get("dx", fixed), plan.get("dw", fixed)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _run_routes(
    routes: dict[str, Backward], chosen: tuple[str, str], mask: Mask, stochastic: bool, device
) -> Grads:
    """Each product on its route. Two routes quantize the error once each, with the same random
    draws (the generator is rewound in between), so both multiply the same codes."""
    need_x, need_w, need_b = mask
    route_x = chosen[0] if need_x else chosen[1]
    route_w = chosen[1] if need_w else route_x
    if route_x == route_w:
        return routes[route_x](mask)
    state = _rng_state(device) if stochastic else None
    grad_x = routes[route_x]((True, False, False))[0]
    if state is not None:
        _set_rng_state(device, state)
    _, grad_w, grad_b = routes[route_w]((False, True, need_b))
    return grad_x, grad_w, grad_b


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
    """The ``int8`` backend's convolution backward, each product on its route."""
    conv = (stride, padding, dilation)
    args = (e, x, weight, stride, padding, dilation, groups, config)
    routes: dict[str, Backward] = {
        INTEGER: lambda mask: conv2d_backward(*args, mask, state=state),
        FLOAT: lambda mask: conv2d_backward_simulated(*args, mask, state=state),
    }
    chosen = layer_routes("conv2d", x, weight, conv, groups, config, output_mask, routes)
    stochastic = config.grad.rounding == "stochastic"
    return _run_routes(routes, chosen, output_mask, stochastic, e.device)


def linear_backward_for(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: BackwardSettings,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """The ``int8`` backend's linear backward, each product on its route."""
    routes: dict[str, Backward] = {
        INTEGER: lambda mask: linear_backward(e, x, weight, config, mask, state=state),
        FLOAT: lambda mask: linear_backward_simulated(e, x, weight, config, mask, state=state),
    }
    chosen = layer_routes("linear", x, weight, None, 1, config, output_mask, routes)
    stochastic = config.grad.rounding == "stochastic"
    return _run_routes(routes, chosen, output_mask, stochastic, e.device)


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
        on the same quantized operands (the simulate path); in the ``fixed`` route mode a device
        route may send a layer kind to float products (measured routes are in
        :func:`~metagrad.backward.int8.routes.route_record`); a forward with weight/activation
        quantization that cannot be integer runs in float."""
        config = layer.config
        groups = getattr(layer, "groups", 1) if isinstance(layer, nn.Conv2d) else 1
        reasons = []
        weight = getattr(layer, "weight", None)
        kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        fixed = weight is not None and routes_mode() == "fixed"
        route = float_route(weight.device, kind) if fixed else None
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
