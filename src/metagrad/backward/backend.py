"""The backend interface: what computes a quantized layer's products, chosen by name.

``QuantConfig(backend=NAME)`` picks a registered :class:`Backend`. A backend owns everything
that depends on it: which configs it runs (:meth:`Backend.check`), whether its backward products
take 8-bit operands (:attr:`Backend.operand_bits`), the forward product when it keeps quantized
operands for the backward pass, the backward products of a linear layer and of a convolution,
and which layers fall back to another route (:meth:`Backend.fallback_reason`). The layers
(:mod:`metagrad.nn.functional`) only call these methods; no code elsewhere tests a backend's
name.

Built in: ``simulate`` (:mod:`metagrad.backward.simulate`) and ``int8``
(:mod:`metagrad.backward.int8.backend`). A new backend is one module that subclasses
:class:`Backend` and calls :func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.quant.quantize import quantize_input, quantize_weight
from metagrad.quant.spec import BACKENDS, QuantConfig

Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
DTypes = tuple[Any, ...]
Conv = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]
"""A convolution's stride, padding, dilation and groups."""
Saved = Sequence[Tensor | None]
"""What a backend's forward kept for its backward pass (``ctx.save_for_backward`` tensors)."""


class Backend:
    """A quantized layer's products. Subclass it and override what the backend computes.

    ``operand_bits``: bits the backend always quantizes the other operand of each backward
    product to (the weight in ``dL/dx``, the input in ``dL/dW``); None: as the config says
    (``QuantConfig.backward_operand_bits``). A layer's forward and backward both run through its
    backend; when a config quantizes the backward operands (``config.quantizes_operands``),
    the forward quantizes weight and input once and keeps them in ``saved``. When a backward
    operand spec quantizes an operand the forward pass quantizes too
    (``config.requantizes_operands``), the default forward quantizes both and keeps the
    forward-quantized input and weight in ``saved``, beside the full-precision ones that the
    layer keeps.
    """

    operand_bits: int | None = None

    def check(self, config: QuantConfig) -> str | None:
        """Why this backend cannot run ``config``; None if it can."""
        return None

    def linear_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, config: QuantConfig
    ) -> tuple[Tensor, Saved]:
        """``(y, saved)``: a linear layer's output and what its backward needs besides its
        input and weight. When ``config.quantizes_operands`` the weight arrives in its own
        precision and the backend quantizes it (and the input) itself. Without a recorded
        gradient (inference) a layer calls it only in that case with forward quantization on,
        and drops ``saved``; otherwise it runs ``F.linear`` itself."""
        if config.requantizes_operands:
            xq, wq = forward_quantized(x, weight, config, -1)
            return F.linear(xq, wq, _as(bias, xq)), (xq, wq)
        return F.linear(x, weight, bias), ()

    def conv2d_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, conv: Conv, config: QuantConfig
    ) -> tuple[Tensor, Saved]:
        """As :meth:`linear_forward`, for a convolution."""
        if config.requantizes_operands:
            xq, wq = forward_quantized(x, weight, config, 1)
            return F.conv2d(xq, wq, _as(bias, xq), *conv), (xq, wq)
        return F.conv2d(x, weight, bias, *conv), ()

    def linear_backward(
        self,
        e: Tensor,
        x: Tensor,
        weight: Tensor,
        config: QuantConfig,
        mask: Mask,
        dtypes: DTypes,
        saved: Saved,
    ) -> Grads:
        """``(dL/dx, dL/dW, dL/db)`` of a linear layer for the error ``e`` (None where
        ``mask`` is False); ``dtypes``: the inputs' dtypes."""
        raise NotImplementedError

    def conv2d_backward(
        self,
        e: Tensor,
        x: Tensor,
        weight: Tensor,
        conv: Conv,
        config: QuantConfig,
        mask: Mask,
        dtypes: DTypes,
        saved: Saved,
    ) -> Grads:
        """As :meth:`linear_backward`, for a convolution."""
        raise NotImplementedError

    def fallback_reason(self, layer: nn.Module) -> str | None:
        """Why ``layer`` does not run all its products on this backend's own route (None)."""
        return None


def forward_quantized(
    x: Tensor, weight: Tensor, config: QuantConfig, channel_dim: int
) -> tuple[Tensor, Tensor]:
    """Input and weight forward-quantized as ``config`` says, both in ``x``'s dtype (the
    weight is quantized from its own precision); ``channel_dim``: the input's features."""
    xq = quantize_input(x, config.activation, channel_dim)
    return xq, quantize_weight(weight, config.weight).to(x.dtype)


def backward_operands(
    x: Tensor, weight: Tensor, config: QuantConfig, saved: Saved
) -> tuple[Tensor, Tensor]:
    """The input and weight a backward pass quantizes with the operand specs: the
    full-precision ones where a spec is given, else the forward-quantized ones in ``saved``
    (:meth:`Backend.linear_forward` under ``config.requantizes_operands``)."""
    xq, wq = saved
    own_x = config.input_for_weight_grad is not None
    own_w = config.weight_for_input_grad is not None
    return (x if own_x else xq), (weight if own_w else wq)  # type: ignore[return-value]


def _as(t: Tensor | None, like: Tensor) -> Tensor | None:
    return None if t is None else t.to(like.dtype)


def register_backend(name: str, backend: Backend) -> Backend:
    """Make ``backend`` available as ``QuantConfig(backend=name)``."""
    return BACKENDS.add(name, backend)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``."""
    return BACKENDS.lookup(name)


def list_backends() -> list[str]:
    """Names of the registered backends."""
    return list(BACKENDS)


def fallback_report(model: nn.Module) -> dict[str, str]:
    """``{qualified name: reason}`` for every quantized layer of ``model`` whose backend routes
    some of its products elsewhere (for example the ``int8`` backend's grouped convolutions)."""
    report = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not isinstance(config, QuantConfig):
            continue
        reason = get_backend(config.backend).fallback_reason(module)
        if reason is not None:
            report[name] = reason
    return report
