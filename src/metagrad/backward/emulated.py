"""Backward products for any quantization spec, emulated in floating point.

For ``y = f(x, W)`` and the error ``e = dL/dy``, each backward product quantizes its two operands
with their own specs (:class:`~metagrad.nn.functional.QuantConfig`: the error and the weight for
``dL/dx``, the error and the layer input for ``dL/dW``), each along that product's contraction
axis, by :func:`metagrad.quant.quantize_along`, and multiplies the dequantized tensors in the
compute dtype (the autocast dtype under mixed precision). A transform drawn for a product is
shared by its two operands, as hardware would share it, and the product then runs on the
transformed, quantized operands as they are (:func:`metagrad.quant.quantize_transformed`), with
no inverse transform: over a padded contraction length it includes the padded positions, as a
product on padded hardware operands does. An error spec bound to neither product's axis (per
tensor, channel or sample; no transform, or one across samples) quantizes the error once for
both products, as the per-tensor, per-sample and block Householder quantizers' papers do. The
bias gradient sums the error of the ``dL/dW`` product.

Contraction axes: ``dL/dx`` contracts the output features (a convolution's output channels, per
kernel tap); ``dL/dW`` contracts every other axis of the error (samples, tokens, positions). A
convolution whose layer input is quantized for ``dL/dW`` is unfolded (``im2col``) first, so the
input's blocks and transforms run along the same positions as the error's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad.backward.products import summed
from metagrad.quant.quantize import prepare_transform, quantize_along, quantize_transformed
from metagrad.quant.rounding import row_order
from metagrad.quant.spec import QuantSpec
from metagrad.quant.transforms import get_transform

if TYPE_CHECKING:
    from metagrad.quant.spec import QuantConfig

Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


def _shares_transform(error: QuantSpec, other: QuantSpec) -> bool:
    """Whether both operands of a product use the same transform along its contraction axis."""
    if not (error.enabled and other.enabled) or error.transform is None:
        return False
    if (other.transform, other.transform_block) != (error.transform, error.transform_block):
        return False
    return get_transform(error.transform, error.transform_block).axis == "inner"


def _shared_state(error: QuantSpec, other: QuantSpec, e: Tensor, inner: tuple[int, ...]):
    """One draw of the error's transform, for both operands when they use the same one."""
    return prepare_transform(e, error, inner) if _shares_transform(error, other) else None


def _pair(e: Tensor, o: Tensor, specs, inner, channels, dtype: torch.dtype):
    """Both operands of one product quantized along ``inner`` (one transform draw), as ``dtype``.

    ``specs``, ``inner``, ``channels``: pairs (error, other operand).
    """
    state = _shared_state(specs[0], specs[1], e, inner[0])
    eq = quantize_along(e, specs[0], inner[0], channels[0], transform_state=state, dtype=dtype)
    oq = quantize_along(o, specs[1], inner[1], channels[1], transform_state=state, dtype=dtype)
    return eq, oq


@dataclass
class _Transformed:
    """Both operands of one product as :func:`quantize_transformed` rows ``(rest, padded)``,
    under one draw of their shared transform: their product over the padded length is the
    product, with no inverse transform."""

    e: Tensor
    other: Tensor
    spec: QuantSpec
    state: Any
    length: int  # the contraction length before padding

    def error_sums(self) -> Tensor:
        """:func:`_sums` of the error laid back, over the unpadded contraction axis: its rows
        times the transformed indicator of those positions."""
        dtype = torch.promote_types(self.e.dtype, torch.float32)
        transform = get_transform(self.spec.transform, self.spec.transform_block)
        ones = self.e.new_zeros((1, self.e.shape[1]), dtype=dtype)
        ones[:, : self.length] = 1
        indicator = transform.forward(ones, self.state)
        return self.e.to(dtype).mm(indicator.t()).flatten()


def _transformed_pair(
    e: Tensor, o: Tensor, specs, inner, channels, dtype: torch.dtype
) -> _Transformed | None:
    """:func:`_pair` as :class:`_Transformed` rows where the two operands share a transform
    draw (None elsewhere)."""
    state = _shared_state(specs[0], specs[1], e, inner[0])
    if state is None:
        return None
    er = quantize_transformed(
        e, specs[0], inner[0], channels[0], transform_state=state, dtype=dtype
    )
    orows = quantize_transformed(
        o, specs[1], inner[1], channels[1], transform_state=state, dtype=dtype
    )
    length = row_order(e.shape, inner[0])[1]
    return _Transformed(er, orows, specs[0], state, length)


def _sums(eq: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The quantized error summed over ``dims`` (the bias gradient), accumulated in float32
    (float64 for float64), flat."""
    return summed(eq, dims, torch.promote_types(eq.dtype, torch.float32)).flatten()


def _shared_error(err_x: QuantSpec, err_w: QuantSpec) -> bool:
    """Whether both products can use one quantized error: the same spec, with no part bound to
    a product's contraction axis (blocks, or a transform along it), as the papers of per-tensor,
    per-sample and block Householder quantizers quantize the error once."""
    if err_x != err_w or err_x.granularity == "block":
        return False
    return (
        err_x.transform is None
        or get_transform(err_x.transform, err_x.transform_block).axis == "sample"
    )


def linear_backward(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: QuantConfig,
    mask: Mask,
    dtypes: tuple[torch.dtype, ...],
) -> Grads:
    """``(dL/dx, dL/dW, dL/db)`` of ``F.linear`` (None where masked), in the inputs' dtypes."""
    need_x, need_w, need_b = mask
    dtype = x.dtype  # the compute dtype: the autocast dtype when the forward ran under it
    err_x, err_w, w_spec, x_spec = config.backward_specs
    grad_x = grad_w = grad_b = None
    shared = None
    if _shared_error(err_x, err_w) and need_x and (need_w or need_b):
        shared = quantize_along(e, err_x, (e.dim() - 1,), -1, dtype=dtype)
    # a shared error has no transform along a contraction axis: no transformed pair then
    if need_x:
        # dL/dx = e W: contracts the output features (e's last dim, W's dim 0)
        args = (err_x, w_spec), ((e.dim() - 1,), (0,)), (-1, 0)
        rows = _transformed_pair(e, weight, *args, dtype)
        if rows is not None:  # (tokens, out) times (in, out)^T
            grad_x = rows.e.mm(rows.other.t()).view(*e.shape[:-1], weight.shape[1])
        elif shared is not None:
            grad_x = shared.matmul(quantize_along(weight, w_spec, (0,), 0, dtype=dtype))
        else:
            eq, wq = _pair(e, weight, *args, dtype)
            grad_x = eq.matmul(wq)
        grad_x = grad_x.to(dtypes[0])
    if need_w or need_b:
        # dL/dW = e^T x: contracts every leading dim (samples, tokens)
        lead = tuple(range(e.dim() - 1))
        args = (err_w, x_spec), (lead, lead), (-1, -1)
        rows = _transformed_pair(e, x, *args, dtype)
        if rows is not None:  # (out, tokens) times (in, tokens)^T
            grad_w = rows.e.mm(rows.other.t()) if need_w else None
            grad_b = rows.error_sums() if need_b else None
        else:
            if shared is None:
                eq, xq = _pair(e, x, *args, dtype)
            else:
                eq, xq = shared, quantize_along(x, x_spec, lead, -1, dtype=dtype)
            eq = eq.reshape(-1, e.shape[-1])
            grad_w = eq.t().mm(xq.reshape(-1, x.shape[-1])) if need_w else None
            grad_b = _sums(eq, (0,)) if need_b else None
        grad_w = grad_w.to(dtypes[1]) if need_w else None
        grad_b = grad_b.to(dtypes[2]) if need_b else None
    return grad_x, grad_w, grad_b


def conv2d_backward(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    conv: tuple,
    config: QuantConfig,
    mask: Mask,
    dtypes: tuple[torch.dtype, ...],
) -> Grads:
    """``(dL/dx, dL/dW, dL/db)`` of ``F.conv2d`` (``conv``: stride, padding, dilation, groups)."""
    stride, padding, dilation, groups = conv
    need_x, need_w, need_b = mask
    dtype = x.dtype
    err_x, err_w, w_spec, x_spec = config.backward_specs
    backward = torch.ops.aten.convolution_backward
    args = (stride, padding, dilation, False, (0, 0), groups)
    grad_x = grad_w = grad_b = None
    plain_operands = not (w_spec.enabled or x_spec.enabled)
    if _shared_error(err_x, err_w) and plain_operands and need_x and (need_w or need_b):
        # one quantized error, one convolution_backward for both products
        eq = quantize_along(e, err_x, (1,), 1, dtype=dtype)
        grad_x, grad_w, _ = backward(eq, x, weight.to(dtype), None, *args, (True, need_w, False))
        grad_w = grad_w.to(dtypes[1]) if need_w else None
        grad_b = _sums(eq, (0, 2, 3)).to(dtypes[2]) if need_b else None
        return grad_x.to(dtypes[0]), grad_w, grad_b
    if need_x:
        # contracts output channels: e's dim 1, W's dim 0
        pair = (err_x, w_spec), ((1,), (0,)), (1, 0)
        rows = _transformed_pair(e, weight, *pair, dtype) if groups == 1 else None
        if rows is not None:  # both as images whose output channels are the padded rows
            eq = rows.e.reshape(e.shape[0], *e.shape[2:], -1).permute(0, 3, 1, 2)
            wq = rows.other.reshape(*weight.shape[1:], -1).permute(3, 0, 1, 2)
        else:
            eq, wq = _pair(e, weight, *pair, dtype)
        stand_in = eq.new_empty(1).expand(x.shape)
        grad_x = backward(eq, stand_in, wq, None, *args, (True, False, False))[0].to(dtypes[0])
    if need_w or need_b:
        # contracts samples and positions: e's dims 0, 2, 3
        if x_spec.enabled:
            grad_w, sums = _conv_weight_grad_unfolded(
                e, x, weight, conv, err_w, x_spec, dtype, need_b
            )
        else:
            eq = quantize_along(e, err_w, (0, 2, 3), 1, dtype=dtype)
            if need_w:
                stand_in = eq.new_empty(1).expand(weight.shape)
                grad_w = backward(eq, x, stand_in, None, *args, (False, True, False))[1]
            sums = _sums(eq, (0, 2, 3)) if need_b else None
        grad_w = grad_w.to(dtypes[1]) if need_w else None
        grad_b = sums.to(dtypes[2]) if need_b else None
    return grad_x, grad_w, grad_b


def _conv_weight_grad_unfolded(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    conv: tuple,
    err_spec: QuantSpec,
    x_spec: QuantSpec,
    dtype: torch.dtype,
    need_sums: bool,
) -> tuple[Tensor, Tensor | None]:
    """``dL/dW`` as ``e^T im2col(x)``, both quantized along the positions; and (``need_sums``)
    the quantized error summed over them, in float32."""
    stride, padding, dilation, groups = conv
    c_out, c_in_g, kh, kw = weight.shape
    rows = None
    if _shares_transform(err_spec, x_spec):  # (out, positions) and (in x taps, positions)
        cols = _unfolded_rows(x, (kh, kw), conv, e.shape[2:])
        pair = (err_spec, x_spec), ((0, 2, 3), (1,)), (1, 0)
        rows = _transformed_pair(e, cols, *pair, dtype)
    if rows is not None:
        e2, x2 = rows.e.t(), rows.other.t()
        sums = rows.error_sums() if need_sums else None
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        cols = cols.transpose(1, 2)  # (N, L, C*kh*kw), L = Ho*Wo in the error's order
        eq, xq = _pair(e, cols, (err_spec, x_spec), ((0, 2, 3), (0, 1)), (1, -1), dtype)
        e2 = eq.permute(0, 2, 3, 1).reshape(-1, c_out)
        x2 = xq.reshape(-1, cols.shape[-1])
        sums = _sums(eq, (0, 2, 3)) if need_sums else None
    per_out, per_in = c_out // groups, c_in_g * kh * kw
    parts = [
        e2[:, g * per_out : (g + 1) * per_out].t().mm(x2[:, g * per_in : (g + 1) * per_in])
        for g in range(groups)
    ]
    return torch.cat(parts, 0).reshape(weight.shape), sums


def _unfolded_rows(x: Tensor, kernel: tuple[int, int], conv: tuple, out: torch.Size) -> Tensor:
    """``im2col(x)`` as the ``(C*kh*kw, N*Ho*Wo)`` matrix of rows along the positions, in the
    error's order: one strided copy of the padded input, where ``F.unfold`` and the rows'
    transposed layout would take two."""
    stride, padding, dilation, _ = conv
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, c = x.shape[:2]
    sn, sc, sh, sw = padded.stride()
    taps = padded.as_strided(
        (c, *kernel, n, *out),
        (sc, sh * dilation[0], sw * dilation[1], sn, sh * stride[0], sw * stride[1]),
    )
    return taps.reshape(c * kernel[0] * kernel[1], -1)
