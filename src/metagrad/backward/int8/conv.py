"""Convolutions with 8-bit operands: the integer forward and backward, and the simulated twin.

``dL/dW = patches^T @ c_e`` from the input's patch matrix; ``dL/dx`` is the transposed
convolution of the error codes with the flipped weight (:mod:`metagrad.backward.int8.im2col`). With
stride 1 and an output as large as the input ("same" padding), the error is quantized straight
into its buffer and its patch matrix serves both products (``dL/dW = error_patches^T @
x_codes``, taps flipped), so the input needs no patch matrix at all. Grouped convolutions fall
back to :func:`conv2d_backward_simulated` (float products on the same quantized operands).
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
from metagrad.backward.int8.im2col import (
    _Conv,
    _error_canvas,
    _flipped_weight_rows,
    _im2col,
    _nhwc_canvas,
    _shared_error_canvas,
)
from metagrad.backward.int8.intmm import (
    _ALIGN,
    _cpu_eager,
    _matrix,
    _padded,
    _round_up,
    _weight_columns,
    int_mm,
)
from metagrad.backward.int8.settings import BackwardSettings, Grads, IntPair, Mask
from metagrad.backward.products import bias_grad, conv2d_grads, error_scales
from metagrad.kernels import kernel
from metagrad.quant.quantize import quantize_codes


def _conv_forward_int(
    canvas: Tensor, xq: Quantized, wq: Quantized, g: _Conv, config: BackwardSettings, bias
) -> Tensor:
    """``conv2d`` of the int8 input buffer with the weight codes, rescaled once (plus bias)."""
    if g.pointwise and canvas.shape[3] % _ALIGN == 0 and (g.n * g.h * g.w) % _ALIGN == 0:
        patches = canvas.view(-1, g.c_in)
    else:
        patches = _im2col(canvas, (g.kh, g.kw), (g.ho, g.wo), g.stride, g.dilation)
    k = g.kh * g.kw * g.c_in
    wmat = _weight_columns(
        wq.codes.permute(0, 2, 3, 1).reshape(g.c_out, k), patches.shape[1], k, "weight"
    )
    acc = int_mm(
        patches, wmat.t(), a_max=config.activation.qmax, b_max=config.weight.qmax, out_name="acc"
    )
    rows = g.n * g.ho * g.wo
    acc = acc[:rows, : g.c_out].view(g.n, g.ho, g.wo, g.c_out)
    scale = (xq.scale * wq.scale.reshape(1, -1, 1, 1)).permute(0, 2, 3, 1)
    return _rescale(acc, scale, bias).permute(0, 3, 1, 2)


@torch.no_grad()
def conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    config: BackwardSettings,
    *,
    integer: bool,
) -> tuple[Tensor, ForwardState]:
    """Forward of a quantized convolution whose backward quantizes its operands.

    Weight and input are forward-quantized as ``config.weight`` / ``config.activation`` say
    (same values as ``fake_quantize``). With ``integer`` (the ``int8`` backend) and both on (and
    scales that factor out), the product is integer; otherwise it is ``F.conv2d`` on the
    dequantized values.
    """
    wq = _quantize_forward(weight, config.weight, 0)
    if _uses_integer_forward(config, groups, integer):
        g = _Conv.of(x.shape, weight.shape, stride, padding, dilation)
        canvas, inside = _nhwc_canvas(g.n, g.h, g.w, g.c_in, padding, device=x.device, name=None)
        xq = Quantized(*quantize_codes_int8(x, config.activation, 1, out=inside))
        y = _conv_forward_int(canvas, xq, wq, g, config, bias)
        return y, ForwardState(xq, wq, canvas)
    xq = _quantize_forward(x, config.activation, 1)
    xv = xq.dequantize() if xq is not None else x
    wv = wq.dequantize() if wq is not None else weight
    return F.conv2d(xv, wv, bias, stride, padding, dilation, groups), ForwardState(xq, wq)


def _conv_grad_input_int(err: Tensor, err_inner: Tensor, wq: Tensor, g: _Conv, e_max: int):
    """Exact ``conv_transpose(c_e, W_codes)`` as an int N×H×W×Cin view (workspace)."""
    if g.pointwise:
        patches = err
    else:
        canvas = _error_canvas(err_inner, g)
        patches = _im2col(canvas, (g.kh, g.kw), (g.h, g.w), (1, 1), g.dilation)
    wmat = _flipped_weight_rows(wq, patches.shape[1])
    acc = int_mm(patches, wmat, a_max=e_max, b_max=OPERAND_QMAX, out_name="acc")
    return acc[: g.n * g.h * g.w, : g.c_in].view(g.n, g.h, g.w, g.c_in)


def _conv_grad_weight_shared(patches: Tensor, xmat: Tensor, g: _Conv, e_max: int) -> Tensor:
    """Exact ``dL/dW`` from the error's patch matrix of ``dL/dx``: ``patches^T @ x_codes``.

    Row ``(i', j', co)`` of the int result holds ``W[co, :, kh-1-i', kw-1-j']``; returned as an
    int kh×kw×Cout×Cin view (workspace), taps flipped.
    """
    acc = int_mm(patches.t(), xmat, a_max=e_max, b_max=OPERAND_QMAX, out_name="acc")
    return acc[: g.kh * g.kw * g.c_out, : g.c_in].view(g.kh, g.kw, g.c_out, g.c_in)


@kernel
def _rescale_flipped_taps(acc: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``dL/dW`` (Cout×Cin×kh×kw as ``dtype``, stored Cout×kh×kw×Cin) from the flipped-tap int
    result (a registered kernel).

    ``acc``: kh×kw×Cout×Cin (tap ``(i', j')``); ``scale``: broadcasts on Cout×Cin.
    """
    kh, kw, c_out, c_in = acc.shape
    if not _cpu_eager(acc.device):
        taps = acc.flip(0, 1).permute(2, 0, 1, 3).to(scale.dtype) * scale[:, None, None, :]
        return taps.to(dtype).contiguous().permute(0, 3, 1, 2)
    out = torch.empty(c_out, kh, kw, c_in, dtype=scale.dtype, device=acc.device)
    for i in range(kh):
        for j in range(kw):
            out[:, i, j].copy_(acc[kh - 1 - i, kw - 1 - j])
    out.mul_(scale[:, None, None, :])
    return out.to(dtype).permute(0, 3, 1, 2)


def _conv_grad_weight_int(err: Tensor, canvas: Tensor, g: _Conv, e_max: int) -> Tensor:
    """Exact ``patches^T @ c_e`` as an int Cout×kh×kw×Cin view (workspace)."""
    rows = g.n * g.ho * g.wo
    if g.pointwise and canvas.shape[3] % _ALIGN == 0 and err.shape[0] == rows:
        patches = canvas.view(rows, g.c_in)
    else:
        patches = _im2col(canvas, (g.kh, g.kw), (g.ho, g.wo), g.stride, g.dilation)
    acc = int_mm(err.t(), patches, a_max=e_max, b_max=OPERAND_QMAX, out_name="acc")
    return acc[: g.c_out, : g.kh * g.kw * g.c_in].view(g.c_out, g.kh, g.kw, g.c_in)


def _x_matrix(
    x: Tensor, g: _Conv, state: ForwardState | None, fold: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The layer input's int8 operand for :func:`_conv_grad_weight_shared`, and its scale.

    A padded ``N·H·W × Cin`` matrix (NHWC order) in the workspace; the forward's codes are
    copied in from their padded buffer when they can be reused.
    """
    rows = g.n * g.h * g.w
    mat = _matrix(_padded(rows), _round_up(g.c_in), rows, g.c_in, device=x.device, name="xcanvas")
    inside = mat[:rows, : g.c_in].view(g.n, g.h, g.w, g.c_in)
    pre = state.x if state is not None else None
    reuse = state is not None and state.x_buffer is not None and fold is None
    if reuse and _scale_along(pre.scale, 1):
        ph, pw = g.padding
        inside.copy_(state.x_buffer[:, ph : ph + g.h, pw : pw + g.w])
        return mat, pre.scale
    op = backward_operand(x, pre, 1, fold, out=inside.permute(0, 3, 1, 2))
    return mat, op.scale


def _x_canvas(
    x: Tensor, g: _Conv, state: ForwardState | None, fold: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The layer input's int8 operand for ``dL/dW`` in a padded NHWC buffer, and its scale."""
    pre = state.x if state is not None else None
    reuse = state is not None and state.x_buffer is not None and fold is None
    if reuse and _scale_along(pre.scale, 1):
        return state.x_buffer, pre.scale
    canvas, inside = _nhwc_canvas(g.n, g.h, g.w, g.c_in, g.padding, device=x.device, name="xcanvas")
    op = backward_operand(x, pre, 1, fold, out=inside)
    return canvas, op.scale


@torch.no_grad()
def conv2d_backward(
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
    """``(dL/dx, dL/dW, dL/db)`` of a convolution from integer products (None where masked).

    ``x`` / ``weight`` are the raw layer inputs; ``state`` holds their forward quantization.
    Groups > 1 fall back to :func:`conv2d_backward_simulated`.
    """
    if groups != 1:
        return conv2d_backward_simulated(
            e, x, weight, stride, padding, dilation, groups, config, output_mask, state=state
        )
    need_x, need_w, need_b = output_mask
    g = _Conv.of(x.shape, weight.shape, stride, padding, dilation)
    spec = config.grad
    shared = _shared_error_canvas(g, e.device) if need_x else None
    if shared is not None:
        return _conv2d_backward_shared(e, x, weight, g, config, output_mask, state, *shared)
    err, inner, s_e = _error_matrix(e, spec, g.n * g.ho * g.wo, conv=True)
    es = error_scales(s_e, spec.granularity, 4)
    grad_x = grad_w = grad_b = None
    if need_x:
        w_pre = state.weight if state is not None else None
        wq = backward_operand(weight, w_pre, 1, es.input_fold)
        acc = _conv_grad_input_int(err, inner, wq.codes, g, spec.qmax)
        scale = es.input_factor * wq.scale
        grad_x = _rescale(acc, scale.permute(0, 2, 3, 1), dtype=x.dtype).permute(0, 3, 1, 2)
    if need_w:
        canvas, s_x = _x_canvas(x, g, state, es.weight_fold)
        acc = _conv_grad_weight_int(err, canvas, g, spec.qmax)
        scale = es.weight_factor * s_x.reshape(1, -1, 1, 1)
        grad_w = _rescale(acc, scale.permute(0, 2, 3, 1), dtype=weight.dtype).permute(0, 3, 1, 2)
    if need_b:
        grad_b = _bias_grad(err, inner, s_e, spec).to(e.dtype)
    return grad_x, grad_w, grad_b


def _conv2d_backward_shared(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    g: _Conv,
    config: BackwardSettings,
    output_mask: Mask,
    state: ForwardState | None,
    canvas: Tensor,
    inner: Tensor,
) -> Grads:
    """:func:`conv2d_backward` with one patch matrix (the error's) for both products.

    The error is quantized straight into ``inner`` (the inside of the zero-bordered ``canvas``).
    """
    _, need_w, need_b = output_mask
    spec = config.grad
    _, s_e = quantize_codes_int8(e, spec, 1, out=inner.permute(0, 3, 1, 2))
    es = error_scales(s_e, spec.granularity, 4)
    patches = _im2col(canvas, (g.kh, g.kw), (g.h, g.w), (1, 1), g.dilation)
    w_pre = state.weight if state is not None else None
    wq = backward_operand(weight, w_pre, 1, es.input_fold)
    wmat = _flipped_weight_rows(wq.codes, patches.shape[1])
    acc = int_mm(patches, wmat, a_max=spec.qmax, b_max=OPERAND_QMAX, out_name="acc")
    acc = acc[: g.n * g.h * g.w, : g.c_in].view(g.n, g.h, g.w, g.c_in)
    scale = es.input_factor * wq.scale
    grad_x = _rescale(acc, scale.permute(0, 2, 3, 1), dtype=x.dtype).permute(0, 3, 1, 2)
    grad_w = grad_b = None
    if need_w:
        xmat, s_x = _x_matrix(x, g, state, es.weight_fold)
        acc = _conv_grad_weight_shared(patches, xmat, g, spec.qmax)
        scale = (es.weight_factor * s_x.reshape(1, -1, 1, 1))[:, :, 0, 0]
        grad_w = _rescale_flipped_taps(acc, scale, weight.dtype)
    if need_b:
        rows = g.n * g.ho * g.wo
        err = _matrix(_padded(rows), _padded(g.c_out), rows, g.c_out, device=e.device, name="error")
        err_inner = err[:rows, : g.c_out].view(inner.shape)
        err_inner.copy_(inner)
        grad_b = _bias_grad(err, err_inner, s_e, spec).to(e.dtype)
    return grad_x, grad_w, grad_b


@torch.no_grad()
def conv2d_backward_simulated(
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
    """:func:`conv2d_backward` with float products on the very same 8-bit codes and scales.

    The products run in :func:`exact_code_dtype` on the codes themselves and the scales are
    applied afterwards, as in the integer path.
    """
    need_b = output_mask[2]
    spec = config.grad
    dtype = exact_code_dtype(x)
    codes, s_e = quantize_codes(e, spec, 1, dtype=dtype)
    es = error_scales(s_e, spec.granularity, 4)
    x_pre = state.x if state is not None else None
    w_pre = state.weight if state is not None else None
    grad_x, grad_w = conv2d_grads(
        codes,
        es,
        _code_operand(x, x_pre, 1, dtype),
        _code_operand(weight, w_pre, 1, dtype),
        (x.shape, weight.shape),
        (stride, padding, dilation, groups),
        output_mask,
        (x.dtype, weight.dtype),
    )
    grad_b = bias_grad(codes, s_e, 1) if need_b else None
    return grad_x, grad_w, grad_b
