"""Backends: what computes a quantized layer's backward products, chosen by name.

``QuantConfig(backend=NAME)`` picks a registered :class:`Backend`, which provides the backward
of a linear layer and of a convolution, and says which configs it cannot run. Built in:

- ``simulate``: float products. Integer gradient specs with one scale per tensor, channel or
  sample run on the error's integer codes (:mod:`metagrad.products`: exact in bf16, scales in
  float32); with ``backward_operand_bits=8`` on the same 8-bit operands as ``int8`` (its
  ``*_simulated`` twins); any other spec is emulated product by product (:mod:`metagrad.emulated`).
- ``int8``: integer products through ``torch._int_mm`` (:mod:`metagrad.int8`), for integer specs.

A new backend is a module that builds a :class:`Backend` and calls :func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metagrad import emulated, int8
from metagrad.products import (
    bias_grad,
    conv2d_grads,
    error_scales,
    float_operand,
    linear_grads,
)
from metagrad.quant import quantize_codes
from metagrad.registry import Registry

if TYPE_CHECKING:
    from metagrad.functional import QuantConfig

Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
DTypes = tuple[torch.dtype | None, ...]

LinearBackward = Callable[..., Grads]
"""``(e, x, weight, config, mask, dtypes, state) -> (dL/dx, dL/dW, dL/db)``."""
ConvBackward = Callable[..., Grads]
"""``(e, x, weight, conv, config, mask, dtypes, state) -> grads``; ``conv``: stride, padding,
dilation, groups."""


def _runs_anything(config: QuantConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """A quantized layer's backward products.

    ``state``: what the forward kept (:class:`metagrad.int8.ForwardState`) when the config
    quantizes the backward operands to 8 bits, else None. ``check(config)`` returns why the
    backend cannot run ``config`` (None if it can).
    """

    linear_backward: LinearBackward
    conv2d_backward: ConvBackward
    check: Callable[[QuantConfig], str | None] = _runs_anything


_BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(name: str, backend: Backend) -> Backend:
    """Make ``backend`` available as ``QuantConfig(backend=name)``."""
    return _BACKENDS.add(name, backend)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``."""
    return _BACKENDS.lookup(name)


def list_backends() -> list[str]:
    """Names of the registered backends."""
    return list(_BACKENDS)


# -- simulate ---------------------------------------------------------------------------------


def _codes_linear(e: Tensor, x: Tensor, weight: Tensor, config, mask: Mask, dtypes: DTypes):
    codes, scale = quantize_codes(e, config.grad, -1, dtype=x.dtype)
    scales = error_scales(scale, config.grad.granularity, 2)
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
    codes, scale = quantize_codes(e, config.grad, 1, dtype=x.dtype)
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
    return grad_x, grad_w, bias_grad(codes, scale, 1) if mask[2] else None


def _simulate_linear(e, x, weight, config, mask, dtypes, state: Any = None) -> Grads:
    if config.quantizes_operands:
        return int8.linear_backward_simulated(e, x, weight, config, mask, state=state)
    if not config.uses_integer_path:
        return emulated.linear_backward(e, x, weight, config, mask, dtypes)
    return _codes_linear(e, x, weight, config, mask, dtypes)


def _simulate_conv2d(e, x, weight, conv, config, mask, dtypes, state: Any = None) -> Grads:
    if config.quantizes_operands:
        return int8.conv2d_backward_simulated(e, x, weight, *conv, config, mask, state=state)
    if not config.uses_integer_path:
        return emulated.conv2d_backward(e, x, weight, conv, config, mask, dtypes)
    return _codes_conv2d(e, x, weight, conv, config, mask, dtypes)


# -- int8 -------------------------------------------------------------------------------------


def _int8_linear(e, x, weight, config, mask, dtypes, state: Any = None) -> Grads:
    return int8.linear_backward_for(e, x, weight, config, mask, state=state)


def _int8_conv2d(e, x, weight, conv, config, mask, dtypes, state: Any = None) -> Grads:
    return int8.conv2d_backward_for(e, x, weight, *conv, config, mask, state=state)


def _int8_check(config: QuantConfig) -> str | None:
    if not config.grad.enabled:
        return "backend 'int8' needs quantized gradients (grad bits 2..8)"
    if not config.uses_integer_path:
        return (
            "backend 'int8' takes integer gradient specs and no per-product specs; "
            f"got grad={config.grad} (use backend 'simulate')"
        )
    return None


register_backend("simulate", Backend(_simulate_linear, _simulate_conv2d))
register_backend("int8", Backend(_int8_linear, _int8_conv2d, _int8_check))
