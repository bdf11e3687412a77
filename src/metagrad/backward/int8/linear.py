"""Linear layers with 8-bit operands: the integer forward and backward, and the simulated twin.

The products are plain matrix products over the flattened leading dims (rows = tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad.backward.int8.codes import (
    OPERAND_QMAX,
    Quantized,
    _bias_grad,
    _code_operand,
    _error_matrix,
    _rescale,
    _scale_along,
    backward_operand,
    exact_code_dtype,
    quantize_codes_int8,
)
from metagrad.backward.int8.forward import ForwardState, _quantize_forward, _uses_integer_forward
from metagrad.backward.int8.intmm import _matrix, _padded, _round_up, _weight_columns, int_mm
from metagrad.backward.int8.settings import BackwardSettings, Grads, Mask
from metagrad.backward.products import bias_grad, error_scales, linear_grads
from metagrad.quant.quantize import quantize_codes


@torch.no_grad()
def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, config: BackwardSettings, *, integer: bool
) -> tuple[Tensor, ForwardState]:
    """Forward of a quantized linear layer whose backward quantizes its operands.

    See :func:`conv2d_forward`; the integer product is ``x_codes @ W_codes^T``.
    """
    wq = _quantize_forward(weight, config.weight, 0)
    if not _uses_integer_forward(config, 1, integer):
        xq = _quantize_forward(x, config.activation, -1)
        xv = xq.dequantize() if xq is not None else x
        wv = wq.dequantize() if wq is not None else weight
        return F.linear(xv, wv, bias), ForwardState(xq, wq)
    lead, c_in, c_out = x.shape[:-1], x.shape[-1], weight.shape[0]
    rows = x.numel() // c_in if c_in else 0
    mat = _matrix(_padded(rows), _round_up(c_in), rows, c_in, device=x.device)
    inside = mat[:rows, :c_in].view(*lead, c_in)
    xq = Quantized(*quantize_codes_int8(x, config.activation, -1, out=inside))
    wmat = _weight_columns(wq.codes, mat.shape[1], c_in, "weight")
    acc = int_mm(
        mat, wmat.t(), a_max=config.activation.qmax, b_max=config.weight.qmax, out_name="acc"
    )
    acc = acc[:rows, :c_out].view(*lead, c_out)
    scale = xq.scale * wq.scale.reshape(-1)
    y = _rescale(acc, scale, bias)
    return y, ForwardState(xq, wq, mat)


@torch.no_grad()
def linear_backward(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: BackwardSettings,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """``(dL/dx, dL/dW, dL/db)`` of a linear layer from integer products (None where masked)."""
    need_x, need_w, need_b = output_mask
    spec = config.grad
    lead, c_in, c_out = x.shape[:-1], x.shape[-1], weight.shape[0]
    rows = e.numel() // c_out if c_out else 0
    err, inner, s_e = _error_matrix(e, spec, rows, conv=False)
    es = error_scales(s_e, spec.granularity, 2)
    grad_x = grad_w = grad_b = None
    if need_x:
        w_pre = state.weight if state is not None else None
        wmat = _matrix(err.shape[1], _round_up(c_in), c_out, c_in, device=e.device, name="weight")
        wq = backward_operand(weight, w_pre, 1, es.input_fold, out=wmat[:c_out, :c_in])
        acc = int_mm(err, wmat, a_max=spec.qmax, b_max=OPERAND_QMAX, out_name="acc")
        scale = es.input_factor * wq.scale.reshape(-1)
        grad_x = _rescale(acc[:rows, :c_in].view(*lead, c_in), scale, dtype=x.dtype)
    if need_w:
        xmat, s_x = _linear_x_operand(x, rows, state, es.weight_fold)
        acc = int_mm(err.t(), xmat, a_max=spec.qmax, b_max=OPERAND_QMAX, out_name="acc")
        scale = es.weight_factor * s_x.reshape(1, -1)
        grad_w = _rescale(acc[:c_out, :c_in], scale, dtype=weight.dtype)
    if need_b:
        grad_b = _bias_grad(err, inner, s_e, spec).to(e.dtype)
    return grad_x, grad_w, grad_b


def _linear_x_operand(
    x: Tensor, rows: int, state: ForwardState | None, fold: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The layer input's int8 operand for ``dL/dW`` as a padded rows×features matrix."""
    pre = state.x if state is not None else None
    reuse = state is not None and state.x_buffer is not None and fold is None
    if reuse and _scale_along(pre.scale, -1):
        return state.x_buffer, pre.scale
    c_in = x.shape[-1]
    mat = _matrix(_padded(rows), _round_up(c_in), rows, c_in, device=x.device, name="xcanvas")
    op = backward_operand(x, pre, -1, fold, out=mat[:rows, :c_in].view(x.shape))
    return mat, op.scale


@torch.no_grad()
def linear_backward_simulated(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: BackwardSettings,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """:func:`linear_backward` with float products on the very same 8-bit codes and scales."""
    need_b = output_mask[2]
    spec = config.grad
    dtype = exact_code_dtype(x)
    codes, s_e = quantize_codes(e, spec, -1, dtype=dtype)
    es = error_scales(s_e, spec.granularity, 2)
    x_pre = state.x if state is not None else None
    w_pre = state.weight if state is not None else None
    grad_x, grad_w = linear_grads(
        codes,
        es,
        _code_operand(x, x_pre, -1, dtype),
        _code_operand(weight, w_pre, 1, dtype),
        output_mask,
        (x.dtype, weight.dtype),
    )
    grad_b = bias_grad(codes, s_e, -1) if need_b else None
    return grad_x, grad_w, grad_b
