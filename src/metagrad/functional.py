"""Convolution and linear layers whose backward pass runs on a quantized error.

For ``y = f(x, W)`` the backward pass receives ``e = dL/dy``. It is quantized once, ``q = Q(e)``,
and that one tensor feeds both products: ``dL/dx = f_x^T(q, W)`` and ``dL/dW = f_W^T(x, q)`` (and
the bias gradient, the sum of ``q``). Forward quantization of weights and activations (QAT with a
straight-through estimator) is a separate, optional setting of the same :class:`QuantConfig`.

Mixed precision: under ``torch.autocast`` the layer computes its forward in the autocast dtype
(bf16 or fp16) like PyTorch's own layers, keeps the low-precision operands for the backward pass,
and runs both backward products in that dtype on the error's integer codes, with the scales
applied in float32 (:mod:`metagrad.products`) straight into the dtypes of the inputs (a float32
weight gets a float32 gradient, not a rounded bf16 one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import int8
from metagrad.backends import get_backend
from metagrad.quant import FULL_PRECISION_BITS, QuantSpec, fake_quantize_ste

OPERAND_BITS_CHOICES: tuple[int, ...] = (int8.OPERAND_BITS, FULL_PRECISION_BITS)

IntPair = tuple[int, int]
PRODUCT_SPECS = ("grad_for_weight_grad", "weight_for_input_grad", "input_for_weight_grad")


@dataclass(frozen=True)
class QuantConfig:
    """Every low-precision setting of a quantized layer.

    Args:
        grad: quantizer of the backward error ``dL/dy`` (32 bits: full-precision backward), in
            both backward products unless ``grad_for_weight_grad`` is given. Stochastic
            rounding by default: rounding to nearest biases every small gradient component
            towards zero, and the bias accumulates over training.
        weight: forward quantizer of the weight, one scale per output channel by default.
        activation: forward quantizer of the layer input.
        backend: a registered backend (:mod:`metagrad.backends`): ``"simulate"`` (quantize,
            then compute in float) or ``"int8"`` (integer products; :mod:`metagrad.int8`).
        backward_operand_bits: bits of the other operand of each backward product (the weight
            for ``dL/dx``, the layer input for ``dL/dW``) under ``"simulate"``: 32 keeps it in
            full precision; 8 quantizes it exactly as the ``"int8"`` backend does (same folding
            of the error's scale, same codes and scales) but computes in float, so simulate
            reproduces int8's numbers. The ``"int8"`` backend always uses 8-bit operands.
        grad_for_weight_grad: the error's quantizer in ``dL/dW`` (None: ``grad``).
        weight_for_input_grad: the weight's quantizer in ``dL/dx`` (None: as
            ``backward_operand_bits`` says).
        input_for_weight_grad: the layer input's quantizer in ``dL/dW`` (None: likewise).

    With integer ``grad`` specs and no per-product spec, the backward products run on the
    error's integer codes (exact in bf16, scales in float32: :mod:`metagrad.products`); any
    other combination is emulated per product (:mod:`metagrad.emulated`).
    """

    grad: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, rounding="stochastic"))
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(granularity="channel"))
    activation: QuantSpec = field(default_factory=QuantSpec)
    backend: str = "simulate"
    backward_operand_bits: int = FULL_PRECISION_BITS
    grad_for_weight_grad: QuantSpec | None = None
    weight_for_input_grad: QuantSpec | None = None
    input_for_weight_grad: QuantSpec | None = None

    def __post_init__(self) -> None:
        for name in ("grad", "weight", "activation"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec")
        for name in PRODUCT_SPECS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec or None")
        if self.backward_operand_bits not in OPERAND_BITS_CHOICES:
            raise ValueError(
                f"backward_operand_bits must be one of {OPERAND_BITS_CHOICES}, "
                f"got {self.backward_operand_bits!r}"
            )
        reason = get_backend(self.backend).check(self)  # an unknown name raises here
        if reason is not None:
            raise ValueError(reason)
        explicit = self.weight_for_input_grad or self.input_for_weight_grad
        if explicit is not None and self.backward_operand_bits != FULL_PRECISION_BITS:
            raise ValueError(
                "give either backward_operand_bits or per-product operand specs, not both"
            )
        for name in ("weight", "activation"):
            if not getattr(self, name).is_integer:
                raise ValueError(
                    f"QuantConfig.{name} (forward quantization) takes integer specs, "
                    f"got {getattr(self, name)}"
                )

    @property
    def uses_integer_path(self) -> bool:
        """Whether the backward runs on the error's integer codes (else it is emulated)."""
        return (
            self.grad.is_integer
            and self.grad_for_weight_grad in (None, self.grad)
            and self.weight_for_input_grad is None
            and self.input_for_weight_grad is None
        )

    @property
    def backward_specs(self) -> tuple[QuantSpec, QuantSpec, QuantSpec, QuantSpec]:
        """The four backward operands' specs: error and weight in ``dL/dx``... resolved.

        In order: the error in ``dL/dx``, the error in ``dL/dW``, the weight in ``dL/dx``, the
        layer input in ``dL/dW``.
        """
        operand = (
            QuantSpec(bits=int8.OPERAND_BITS)
            if self.backward_operand_bits != FULL_PRECISION_BITS
            else QuantSpec()
        )
        return (
            self.grad,
            self.grad_for_weight_grad or self.grad,
            self.weight_for_input_grad or operand,
            self.input_for_weight_grad or operand,
        )

    @property
    def quantizes_backward(self) -> bool:
        """Whether either backward product quantizes anything."""
        explicit = (self.weight_for_input_grad, self.input_for_weight_grad)
        return any(spec.enabled for spec in self.backward_specs[:2]) or any(
            spec is not None and spec.enabled for spec in explicit
        )

    @property
    def quantizes_operands(self) -> bool:
        """Whether the backward products use 8-bit operands (backend int8, or operand bits 8).

        Never without quantized gradients (``backward_operand_bits`` is then ignored).
        """
        eight = self.backend == "int8" or self.backward_operand_bits != FULL_PRECISION_BITS
        return self.grad.enabled and eight and self.uses_integer_path

    def to_dict(self) -> dict[str, object]:
        """The resolved settings as plain values (what summary.json records)."""
        err_x, err_w, w_spec, x_spec = self.backward_specs
        return {
            "backend": self.backend,
            "grad_for_input_grad": err_x.to_dict(),
            "grad_for_weight_grad": err_w.to_dict(),
            "weight_for_input_grad": w_spec.to_dict(),
            "input_for_weight_grad": x_spec.to_dict(),
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "path": "integer codes" if self.uses_integer_path else "emulated",
        }

    def __str__(self) -> str:
        text = (
            f"grad={self.grad}, weight={self.weight}, activation={self.activation}, "
            f"backend={self.backend}"
        )
        if self.backward_operand_bits != FULL_PRECISION_BITS:
            text += f", backward_operands=int{self.backward_operand_bits}"
        for name in PRODUCT_SPECS:
            if getattr(self, name) is not None:
                text += f", {name}={getattr(self, name)}"
        return text


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


class _QuantConv2dFn(torch.autograd.Function):
    """Convolution with a quantized backward.

    When ``config.quantizes_operands``, ``x`` and ``weight`` arrive unquantized and the forward
    quantization (as ``config.weight`` / ``config.activation`` say) happens here, in
    :func:`metagrad.int8.conv2d_forward`, which keeps the codes for the backward pass; otherwise
    they arrive already fake-quantized. Under autocast the operands are cast to its dtype first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.config = config
        ctx.dtypes = _dtypes(x, weight, bias)
        low = autocast_dtype(x.device.type)
        x = _cast(x, low)
        if config.quantizes_operands:  # the weight is quantized from its own precision
            y, state = int8.conv2d_forward(
                x, weight, bias, stride, padding, dilation, groups, config
            )
            ctx.save_for_backward(x, weight, *state.pack())
            return y if low is None else y.to(low)
        weight, bias = _cast(weight, low), _cast(bias, low)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *packed = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (need_x, need_w, need_b and ctx.has_bias)
        config: QuantConfig = ctx.config
        state = int8.ForwardState.unpack(packed) if config.quantizes_operands else None
        backend = get_backend(config.backend)
        grads = backend.conv2d_backward(e, x, weight, ctx.conv, config, mask, ctx.dtypes, state)
        return (*_cast_grads(grads, ctx.dtypes), None, None, None, None, None)


class _QuantLinearFn(torch.autograd.Function):
    """Linear layer with a quantized backward (forward quantization as in the conv Function)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        ctx.has_bias = bias is not None
        ctx.config = config
        ctx.dtypes = _dtypes(x, weight, bias)
        low = autocast_dtype(x.device.type)
        x = _cast(x, low)
        if config.quantizes_operands:  # the weight is quantized from its own precision
            y, state = int8.linear_forward(x, weight, bias, config)
            ctx.save_for_backward(x, weight, *state.pack())
            return y if low is None else y.to(low)
        weight, bias = _cast(weight, low), _cast(bias, low)
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *packed = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (need_x, need_w, need_b and ctx.has_bias)
        config: QuantConfig = ctx.config
        state = int8.ForwardState.unpack(packed) if config.quantizes_operands else None
        backend = get_backend(config.backend)
        grads = backend.linear_backward(e, x, weight, config, mask, ctx.dtypes, state)
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
    """``F.conv2d`` with forward and backward quantization as ``config`` says."""
    stride, dilation = _pair(stride), _pair(dilation)
    padding = resolve_padding(padding, (weight.shape[2], weight.shape[3]), dilation)
    if config.quantizes_operands:  # forward quantization happens inside the Function
        return _QuantConv2dFn.apply(input, weight, bias, stride, padding, dilation, groups, config)
    weight = fake_quantize_ste(weight, config.weight, channel_dim=0)
    input = fake_quantize_ste(input, config.activation, channel_dim=1)
    if not config.quantizes_backward:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _QuantConv2dFn.apply(input, weight, bias, stride, padding, dilation, groups, config)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, config: QuantConfig):
    """``F.linear`` with forward and backward quantization as ``config`` says."""
    if config.quantizes_operands:  # forward quantization happens inside the Function
        return _QuantLinearFn.apply(input, weight, bias, config)
    weight = fake_quantize_ste(weight, config.weight, channel_dim=0)
    input = fake_quantize_ste(input, config.activation, channel_dim=-1)
    if not config.quantizes_backward:
        return F.linear(input, weight, bias)
    return _QuantLinearFn.apply(input, weight, bias, config)
