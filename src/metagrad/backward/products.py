"""The backward products of a quantized error, computed in float on its integer codes.

For ``y = f(x, W)`` the error ``e = dL/dy`` arrives as codes ``c`` and a scale ``s`` (per tensor,
per output channel or per sample). Both products take the codes as they are, in the operands'
float dtype (bf16 or fp16 under mixed precision: codes of up to 8 bits are exact there), and the
scales are applied in float32 afterwards, where they factor out of the product. A scale that lies
on a product's contraction axis (a per-channel ``s`` in ``dL/dx``, a per-sample ``s`` in ``dL/dW``)
cannot factor out: it is folded into the other operand first (:class:`ErrorScales`).

The other operand of each product is an :class:`Operand`: a float tensor (the ``simulate``
backend) or 8-bit codes with their scale (8-bit backward operands; in bf16 their products equal
the ``int8`` backend's integer products, as float32 accumulation is exact up to ``2**24``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.kernels import kernel

Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


@dataclass
class ErrorScales:
    """Where the error's scale goes in each product (folded in, or a factor of the result)."""

    input_fold: Tensor | None  # into the weight (dim 0) before the product, for dL/dx
    input_factor: Tensor  # multiplies dL/dx (broadcasts over the layer input's shape)
    weight_fold: Tensor | None  # into the layer input before the product, for dL/dW
    weight_factor: Tensor  # multiplies dL/dW (broadcasts over the weight's shape)


def error_scales(scale: Tensor, granularity: str, weight_dim: int) -> ErrorScales:
    """:class:`ErrorScales` of an error scale of ``granularity`` for a ``weight_dim``-d weight."""
    one = torch.ones((1,) * scale.dim(), dtype=scale.dtype, device=scale.device)
    w_one = one.reshape((1,) * weight_dim)
    if granularity == "channel":
        per_out = scale.reshape((-1,) + (1,) * (weight_dim - 1))
        return ErrorScales(per_out, one, None, per_out)
    if granularity == "sample":
        return ErrorScales(None, scale, scale, w_one)
    return ErrorScales(None, scale, None, scale.reshape((1,) * weight_dim))


@dataclass
class Operand:
    """The non-error operand of a product, in the product's dtype, and the scale it carries."""

    value: Tensor
    scale: Tensor | None = None  # None: a float operand; else the scale of integer codes


OperandFn = Callable[[Tensor | None], Operand]
"""``fold -> Operand``: builds an operand with the error scale ``fold`` folded in (or None)."""


@kernel
def folded(value: Tensor, fold: Tensor, dtype: torch.dtype) -> Tensor:
    """``value * fold`` in the fold's precision, rounded to ``dtype``: compiled, one pass over
    ``value`` (eager PyTorch writes its float32 copy and the product first)."""
    return (value.to(fold.dtype) * fold).to(dtype)


def float_operand(value: Tensor, dtype: torch.dtype) -> OperandFn:
    """An :data:`OperandFn` for a float operand: ``value * fold`` rounded to ``dtype``."""

    def build(fold: Tensor | None) -> Operand:
        if fold is None:
            return Operand(value.to(dtype))
        return Operand(folded(value, fold, dtype))

    return build


@kernel
def _scaled(result: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    return (result.to(factor.dtype) * factor).to(dtype)


def _apply(result: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    """``result * factor`` computed in the factor's precision (float32+), stored as ``dtype``."""
    if factor.numel() == 1 and result.dtype == dtype:
        # A 0-dim factor is applied in float32 arithmetic by PyTorch's in-place multiply.
        return result.mul_(factor.reshape(()))
    return _scaled(result, factor, dtype)


def _factor(base: Tensor, operand: Operand, shape: tuple[int, ...] | None = None) -> Tensor:
    if operand.scale is None:
        return base
    scale = operand.scale if shape is None else operand.scale.reshape(shape)
    return base * scale


@kernel(static_ints=True)
def summed(t: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``t.sum(dims, keepdim=True, dtype=dtype)``. Compiled, each element is converted to
    ``dtype`` as the sum reads it; eager PyTorch first copies the whole of ``t`` in ``dtype``."""
    return t.sum(dims, keepdim=True, dtype=dtype)


def bias_grad(codes: Tensor, scale: Tensor, channel_dim: int) -> Tensor:
    """``sum(codes * scale)`` over every dim but ``channel_dim``, accumulated in float32+."""
    nd = codes.dim()
    channel_dim %= nd
    first = tuple(d for d in range(nd) if d != channel_dim and scale.shape[d] == 1)
    part = summed(codes, first, scale.dtype) if first else codes.to(scale.dtype)
    return (part * scale).sum([d for d in range(nd) if d != channel_dim])


def _stand_in(like: Tensor, shape: torch.Size) -> Tensor:
    """A tensor of ``shape`` whose values are never read (as ``torch.nn.grad.conv2d_input``)."""
    return like.new_empty(1).expand(shape)


def conv2d_grads(
    codes: Tensor,
    scales: ErrorScales,
    x: OperandFn,
    w: OperandFn,
    shapes: tuple[torch.Size, torch.Size],
    conv: tuple,
    mask: Mask,
    dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[Tensor | None, Tensor | None]:
    """``(dL/dx, dL/dW)`` of a convolution from error codes (None where masked).

    ``shapes`` and ``dtypes``: those of ``x`` and ``W``; ``conv``: ``(stride, padding,
    dilation, groups)``. Without folds both products come from one ``convolution_backward``.
    """
    stride, padding, dilation, groups = conv
    args = (stride, padding, dilation, False, (0, 0), groups)
    need_x, need_w, _ = mask
    backward = torch.ops.aten.convolution_backward
    grad_x = grad_w = None
    if need_x and need_w and scales.input_fold is None and scales.weight_fold is None:
        xo, wo = x(None), w(None)
        grad_x, grad_w, _ = backward(codes, xo.value, wo.value, None, *args, (True, True, False))
    else:
        if need_x:
            wo = w(scales.input_fold)
            x_in = _stand_in(codes, shapes[0])
            grad_x = backward(codes, x_in, wo.value, None, *args, (True, False, False))[0]
        if need_w:
            xo = x(scales.weight_fold)
            w_in = _stand_in(codes, shapes[1])
            grad_w = backward(codes, xo.value, w_in, None, *args, (False, True, False))[1]
    if need_x:
        if groups > 1 and wo.scale is not None:  # per W-dim-1 index: repeats for each group
            wo = Operand(wo.value, wo.scale.repeat(1, groups, 1, 1))
        grad_x = _apply(grad_x, _factor(scales.input_factor, wo), dtypes[0])
    if need_w:
        if groups > 1 and xo.scale is not None and xo.scale.numel() > 1:
            # output channel o sees x's group o // (O/G)
            c_out = shapes[1][0]
            per = xo.scale.reshape(groups, -1).repeat_interleave(c_out // groups, dim=0)
            xo = Operand(xo.value, per.reshape(c_out, -1, 1, 1))
        grad_w = _apply(grad_w, _factor(scales.weight_factor, xo), dtypes[1])
    return grad_x, grad_w


def linear_grads(
    codes: Tensor,
    scales: ErrorScales,
    x: OperandFn,
    w: OperandFn,
    mask: Mask,
    dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[Tensor | None, Tensor | None]:
    """``(dL/dx, dL/dW)`` of a linear layer from error codes (None where masked)."""
    need_x, need_w, _ = mask
    grad_x = grad_w = None
    if need_x:
        wo = w(scales.input_fold)
        grad_x = _apply(codes.matmul(wo.value), _factor(scales.input_factor, wo), dtypes[0])
    if need_w:
        xo = x(scales.weight_fold)
        c_out, c_in = codes.shape[-1], xo.value.shape[-1]
        raw = codes.reshape(-1, c_out).t().mm(xo.value.reshape(-1, c_in))
        factor = _factor(scales.weight_factor.reshape(-1, 1), xo, (1, -1))
        grad_w = _apply(raw, factor, dtypes[1])
    return grad_x, grad_w
