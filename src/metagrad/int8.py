"""The ``int8`` backend: integer products (int8 × int8 → int32) for quantized layers.

For ``y = f(x, W)`` and the error ``e = dL/dy``:

* the error is quantized once, exactly as :func:`metagrad.quant.quantize_codes` does (any
  ``k <= 8`` bits), and held as int8 codes ``c_e`` with their scale ``s_e``;
* the other operand of each product (the weight for ``dL/dx``, the layer input for ``dL/dW``) is
  quantized by :func:`quantize_operand` to 8 bits (nearest, symmetric) with one scale per tensor or
  per channel on the product's *output* axis (input channel / input feature), so it factors out;
* an error scale on a product's contraction axis (per-channel ``s_e`` for ``dL/dx``, per-sample
  ``s_e`` for ``dL/dW``) is folded into the float operand before that operand is quantized;
* each product is one ``torch._int_mm`` call through :func:`int_mm` (which also meets its size
  rules by zero-padding), and the exact integer result is rescaled to float once.

Convolutions use channels-last int8 im2col. The layer input is quantized straight into a
zero-bordered ``N×Hp×Wp×C`` int8 buffer, viewed with ``as_strided`` as ``N×Ho×Wo×kh×kw×C``
patches and copied once into a 2-D matrix: ``dL/dW = patches^T @ c_e``. ``dL/dx`` is the
transposed convolution: the error codes are laid (zero-dilated for stride > 1) into a
zero-bordered buffer and convolved the same way with the flipped weight. With stride 1 and an
output as large as the input ("same" padding), the error is quantized straight into that buffer
and its patch matrix serves both products (``dL/dW = error_patches^T @ x_codes``, taps flipped),
so the input needs no patch matrix at all. Grouped convolutions
fall back to :func:`conv2d_backward_simulated` (float products on the same quantized operands);
:func:`fallback_reason` / :func:`fallback_report` say which layers do.

With forward quantization of both weight and activation (``config.weight`` / ``config.activation``
enabled), :func:`conv2d_forward` / :func:`linear_forward` run the forward product on the integer
path too and keep the int8 codes for the backward pass, which reuses them when their scale
factors out (no requantization).

The ``simulate`` backend with ``QuantConfig(backward_operand_bits=8)`` runs the ``*_simulated``
functions: the same codes and scales, produced by the same functions, with float products, so it
reproduces this backend to float32 rounding.

On CPU, temporaries (patch matrices, int32 results, error codes) live in a per-thread workspace
reused across calls, which avoids page-faulting fresh buffers of tens of MB at every layer;
:func:`clear_workspace` frees it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.products import (
    Operand,
    OperandFn,
    bias_grad,
    conv2d_grads,
    error_scales,
    linear_grads,
)
from metagrad.quant import QuantSpec, quantize_codes, scale_dtype

if TYPE_CHECKING:
    from metagrad.functional import QuantConfig

__all__ = [
    "OPERAND_BITS",
    "ForwardState",
    "Quantized",
    "backward_operand",
    "clear_workspace",
    "conv2d_backward",
    "conv2d_backward_simulated",
    "conv2d_forward",
    "fallback_reason",
    "fallback_report",
    "int_mm",
    "linear_backward",
    "linear_backward_simulated",
    "linear_forward",
    "quantize_codes_int8",
    "quantize_operand",
]

IntPair = tuple[int, int]
Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]

OPERAND_BITS = 8
"""Bits of the non-error operand of every integer product."""
OPERAND_QMAX = 2 ** (OPERAND_BITS - 1) - 1
_INT32_MAX = 2**31 - 1
_MIN_ROWS = 17  # torch._int_mm on CUDA: the first operand needs more than 16 rows
_ALIGN = 8  # ... and its inner and output sizes must be multiples of 8
_CPU_CHUNK = 1 << 20  # elements per chunk of elementwise passes on CPU (cache-sized)


# --------------------------------------------------------------------------------------------
# Workspace and torch._int_mm
# --------------------------------------------------------------------------------------------


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_WORKSPACE = _Workspace()


def _scratch(name: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A flat temporary of ``numel`` elements; on CPU a reused per-thread buffer named ``name``.

    Only for temporaries that die within one call (never returned or saved for backward).
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (name, dtype)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype)
        _WORKSPACE.buffers[key] = buf
    return buf[:numel]


def clear_workspace() -> None:
    """Free this thread's CPU workspace (it regrows on the next integer product)."""
    _WORKSPACE.buffers.clear()


def _round_up(n: int, m: int = _ALIGN) -> int:
    return -(-n // m) * m


def _padded(n: int) -> int:
    """A size valid both as the first operand's rows and as an inner or output size."""
    return _round_up(max(n, _MIN_ROWS))


def _matrix(rows: int, cols: int, rows_used: int, cols_used: int, *, device, name=None) -> Tensor:
    """An int8 ``rows×cols`` matrix whose part outside ``[:rows_used, :cols_used]`` is zero."""
    flat = (
        _scratch(name, rows * cols, device, torch.int8)
        if name
        else torch.empty(rows * cols, dtype=torch.int8, device=device)
    )
    mat = flat.view(rows, cols)
    if cols_used < cols:
        mat[:, cols_used:].zero_()
    if rows_used < rows:
        mat[rows_used:].zero_()
    return mat


def _pad_operand(t: Tensor, rows: int, cols: int) -> Tensor:
    if tuple(t.shape) == (rows, cols):
        return t
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def int_mm(
    a: Tensor, b: Tensor, *, a_max: int = 127, b_max: int = 127, out_name: str | None = None
) -> Tensor:
    """Exact ``a @ b`` of int8 matrices through ``torch._int_mm``.

    Zero-pads to ``_int_mm``'s size rules on every device (``a`` more than 16 rows; inner size
    and ``b``'s columns multiples of 8): operands built by this module are already padded, so
    nothing is copied for them. With ``|a| <= a_max`` and ``|b| <= b_max``, a contraction long
    enough to overflow int32 is split and the parts are summed in int64. Returns the
    ``a.shape[0] × b.shape[1]`` result (int32, or int64 after a split); ``out_name`` puts it in
    the workspace (then it must be consumed before the next call with that name).
    """
    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(m, _MIN_ROWS), _round_up(max(k, 1)), _round_up(max(n, 1))
    a, b = _pad_operand(a, mp, kp), _pad_operand(b, kp, np_)
    step = max(_ALIGN, (_INT32_MAX // max(a_max * b_max, 1)) // _ALIGN * _ALIGN)
    if kp <= step:
        if out_name is None:
            res = torch._int_mm(a, b)
        else:
            res = _scratch(out_name, mp * np_, a.device, torch.int32).view(mp, np_)
            torch._int_mm(a, b, out=res)
    else:
        res = torch.zeros(mp, np_, dtype=torch.int64, device=a.device)
        for k0 in range(0, kp, step):
            res += torch._int_mm(a[:, k0 : k0 + step], b[k0 : k0 + step])
    return res[:m, :n]


# --------------------------------------------------------------------------------------------
# Quantization into int8
# --------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """Integer codes (int8, the operand's logical shape) and the scale that broadcasts on them."""

    codes: Tensor
    scale: Tensor

    def dequantize(self) -> Tensor:
        """``codes * scale`` in float (bit-identical to ``fake_quantize`` of the same codes)."""
        return self.codes.to(self.scale.dtype) * self.scale


def _stride_order(t: Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _flat(x: Tensor) -> Tensor:
    """All elements of ``x`` as a 1-D tensor (a view when ``x`` is dense in any dim order)."""
    return x.permute(_stride_order(x)).reshape(-1)


def _absmax(x: Tensor, keep: Sequence[int]) -> Tensor:
    """Largest ``|x|`` over every dim not in ``keep``, keepdim; NaN if the group holds one."""
    dims = [d for d in range(x.dim()) if d not in keep]
    if not dims:
        return x.abs()
    if len(dims) == x.dim():
        lo, hi = torch.aminmax(_flat(x))
        return torch.maximum(-lo, hi).reshape([1] * x.dim())
    fast = _leading_absmax(x, dims)
    if fast is not None:
        return fast
    return torch.maximum(_reduce(x, dims, torch.amax), _reduce(x, dims, torch.amin).neg())


def _leading_absmax(x: Tensor, dims: list[int]) -> Tensor | None:
    """:func:`_absmax` in one chunked pass when ``dims`` are the outermost in memory (CPU).

    None when that does not apply. Each chunk's ``|x|`` stays in cache.
    """
    order = _stride_order(x)
    lead = len(dims)
    if x.device.type != "cpu" or sorted(order[:lead]) != sorted(dims):
        return None
    xp = x.permute(order)
    if not xp.is_contiguous():
        return None
    kept = order[lead:]
    mat = xp.reshape(-1, xp[(0,) * lead].numel())
    step = max(1, _CPU_CHUNK // max(mat.shape[1], 1))
    buf = _scratch("abs", min(step, mat.shape[0]) * mat.shape[1], x.device, x.dtype)
    best = None
    for start in range(0, mat.shape[0], step):
        part = mat[start : start + step]
        chunk_abs = torch.abs(part, out=buf[: part.numel()].view(part.shape)).amax(0)
        best = chunk_abs if best is None else torch.maximum(best, chunk_abs)
    best = best.view([x.shape[d] for d in kept])
    best = best.permute(sorted(range(len(kept)), key=kept.__getitem__))
    return best.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])


def _reduce(x: Tensor, dims: list[int], fn) -> Tensor:
    """``fn(x, dims, keepdim=True)`` in two stages: first the dims outside the innermost kept
    one (a vectorized pass over memory), then the rest on the small intermediate."""
    rank = {d: i for i, d in enumerate(_stride_order(x))}
    inner_kept = max(rank[d] for d in range(x.dim()) if d not in dims)
    outer = [d for d in dims if rank[d] < inner_kept]
    inner = [d for d in dims if rank[d] > inner_kept]
    if outer:
        x = fn(x, outer, keepdim=True)
    return fn(x, inner, keepdim=True) if inner else x


def _nan_if_nonfinite(scale: Tensor) -> Tensor:
    """Scales of groups holding NaN/inf become NaN, so every product they touch is NaN."""
    return torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))


@torch.no_grad()
def _round_into(x: Tensor, factor: Tensor, out: Tensor, *, divide: bool) -> None:
    """``out = round(x / factor)`` (or ``x * factor``) as int8, elementwise.

    ``out`` may be a strided view (e.g. the inside of a padded buffer). On CPU the work runs in
    cache-sized chunks through one reused float buffer, so no full-size float temporary exists.
    """
    if out.numel() == 0:
        return
    op = torch.div if divide else torch.mul
    if x.device.type != "cpu":
        out.copy_(op(x, factor).round_())
        return
    perm = _stride_order(out)
    dim = next((d for d in perm if out.shape[d] > 1), perm[0])
    size = out.shape[dim]
    per_row = out.numel() // size
    rows = max(1, _CPU_CHUNK // per_row)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    dtype = torch.result_type(x, factor)
    flat = _scratch("round", min(rows, size) * per_row, x.device, dtype)
    shape = list(out.shape)
    for start in range(0, size, rows):
        length = min(rows, size - start)
        shape[dim] = length
        buf = flat[: length * per_row].view([shape[p] for p in perm]).permute(inverse)
        fac = factor if factor.shape[dim] == 1 else factor.narrow(dim, start, length)
        op(x.narrow(dim, start, length), fac, out=buf)
        out.narrow(dim, start, length).copy_(buf.round_())


def _spec_keep(spec: QuantSpec, ndim: int, channel_dim: int) -> tuple[int, ...]:
    if spec.granularity == "tensor" or ndim == 0:
        return ()
    return (0,) if spec.granularity == "sample" else (channel_dim % ndim,)


@torch.no_grad()
def quantize_codes_int8(
    x: Tensor, spec: QuantSpec, channel_dim: int = 1, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`~metagrad.quant.quantize_codes` with its codes written as int8 (into ``out``).

    Same codes and scale for every finite group; a group holding NaN/inf gets a NaN scale (its
    codes are then meaningless). Stochastic rounding draws its noise through ``quantize_codes``
    itself, so a seeded run draws the same noise as the simulate backend.
    """
    out = out if out is not None else torch.empty_like(x, dtype=torch.int8)
    if spec.rounding == "stochastic":
        codes, scale = quantize_codes(x, spec, channel_dim, dtype=torch.int8)
        out.copy_(codes)
        return out, scale
    amax = _absmax(x, _spec_keep(spec, x.dim(), channel_dim)).to(scale_dtype(x))
    scale = amax / spec.qmax
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # |x / scale| <= qmax up to rounding, so nearest rounding needs no clamp.
    _round_into(x, scale, out, divide=True)
    return out, _nan_if_nonfinite(scale)


@torch.no_grad()
def quantize_operand(
    x: Tensor, scale_dim: int | None, fold: Tensor | None = None, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """8-bit nearest codes (int8) and scale of ``x * fold``: the non-error operand of a product.

    One scale per tensor (``scale_dim=None``) or per index of ``scale_dim``; ``fold`` (positive,
    broadcastable against ``x``, e.g. the error's per-sample scale) is multiplied in first.
    ``codes = round(x * (fold / scale))`` with ``scale = absmax(x * fold) / 127`` per group, so
    ``codes * scale ≈ x * fold``. Both backends call this one function.
    """
    nd = x.dim()
    keep = [] if scale_dim is None else [scale_dim % nd]
    fold_dims = [] if fold is None else [d for d in range(nd) if fold.shape[d] != 1]
    amax = _absmax(x, sorted(set(keep + fold_dims))).to(scale_dtype(x))
    if fold is not None:
        amax = amax * fold  # |x| * fold is monotone in |x|: the group max is exact
        extra = [d for d in fold_dims if d not in keep]
        if extra:
            amax = amax.amax(extra, keepdim=True)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / OPERAND_QMAX)
    scale = _nan_if_nonfinite(scale)
    factor = scale.reciprocal() if fold is None else fold / scale
    out = out if out is not None else torch.empty_like(x, dtype=torch.int8)
    _round_into(x, factor, out, divide=False)
    return out, scale


def _scale_along(scale: Tensor, dim: int | None) -> bool:
    """Whether ``scale`` varies along ``dim`` at most (per tensor or per index of ``dim``)."""
    keep = -1 if dim is None else dim % scale.dim()
    return all(s == 1 for d, s in enumerate(scale.shape) if d != keep)


def backward_operand(
    value: Tensor | None,
    pre: Quantized | None,
    scale_dim: int | None,
    fold: Tensor | None,
    *,
    out: Tensor | None = None,
) -> Quantized:
    """The int8 operand of a backward product, shared by both backends.

    ``pre`` (the operand's forward quantization, if any) is used as it is when nothing is to be
    folded in and its scale factors out (per tensor or along ``scale_dim``); otherwise the
    operand's value (``pre`` dequantized, else ``value``) is quantized by
    :func:`quantize_operand`.
    """
    if pre is not None and fold is None and _scale_along(pre.scale, scale_dim):
        if out is not None:
            out.copy_(pre.codes)
            return Quantized(out, pre.scale)
        return pre
    src = pre.dequantize() if pre is not None else value
    if src is None:
        raise ValueError("backward_operand needs a value or a forward quantization")
    return Quantized(*quantize_operand(src, scale_dim, fold, out=out))


def _rescale(acc: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``acc * scale (+ bias)`` as a new float tensor laid out like ``acc``'s logical order.

    ``acc`` (an int view of an ``int_mm`` result) and ``scale`` are in memory order; conversion,
    scaling and bias run chunk by chunk while each chunk is in cache, and avoid the slow
    mixed-dtype multiply.
    """
    out = torch.empty(acc.shape, dtype=scale.dtype, device=acc.device)
    size = acc.shape[0] if acc.dim() else 1
    step = size if acc.device.type != "cpu" else max(1, _CPU_CHUNK // max(acc[0].numel(), 1))
    for start in range(0, size, step):
        part = out[start : start + step]
        part.copy_(acc[start : start + step])
        part.mul_(scale if scale.shape[0] == 1 else scale[start : start + step])
        if bias is not None:
            part.add_(bias)
    return out


def _bias_grad(err: Tensor, inner: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Sum of the quantized error over all but its channel dim.

    ``err``: the error's padded int8 matrix; ``inner``: its N×…×C codes. The integer sums (per
    sample when the scale is per sample) are exact: one ``int_mm`` with a 0/1 matrix.
    """
    rows, c = inner.numel() // max(inner.shape[-1], 1), inner.shape[-1]
    groups = inner.shape[0] if spec.granularity == "sample" and inner.dim() > 1 else 1
    ones = torch.zeros(max(groups, _MIN_ROWS), err.shape[0], dtype=torch.int8, device=err.device)
    ones[:groups, :rows].view(groups, groups, rows // groups).diagonal(0, 0, 1).fill_(1)
    sums = int_mm(ones, err, a_max=1, b_max=spec.qmax)[:groups, :c]
    if groups > 1:
        return (sums * scale.reshape(groups, 1)).sum(0)
    return sums[0] * scale.reshape(-1)


# --------------------------------------------------------------------------------------------
# Forward quantization state
# --------------------------------------------------------------------------------------------


@dataclass
class ForwardState:
    """What a quantized layer's forward keeps for its backward pass besides its raw inputs.

    ``x`` / ``weight``: the forward quantization of the input / weight (None when off).
    ``x_buffer``: the padded int8 layout holding ``x.codes`` (conv: N×Hp×Wp×C with the layer's
    padding; linear: rows×cols matrix), reused by the integer ``dL/dW``.
    """

    x: Quantized | None = None
    weight: Quantized | None = None
    x_buffer: Tensor | None = None

    def pack(self) -> tuple[Tensor | None, ...]:
        """The tensors, for ``ctx.save_for_backward`` (freed with the graph)."""
        x, w = self.x, self.weight
        x_parts = (x.codes, x.scale) if x is not None else (None, None)
        w_parts = (w.codes, w.scale) if w is not None else (None, None)
        return (*x_parts, *w_parts, self.x_buffer)

    @staticmethod
    def unpack(tensors: Sequence[Tensor | None]) -> ForwardState:
        """Inverse of :meth:`pack`."""
        x_codes, x_scale, w_codes, w_scale, x_buffer = tensors
        x = Quantized(x_codes, x_scale) if x_codes is not None else None
        w = Quantized(w_codes, w_scale) if w_codes is not None else None
        return ForwardState(x, w, x_buffer)


def _quantize_forward(t: Tensor, spec: QuantSpec, channel_dim: int) -> Quantized | None:
    return Quantized(*quantize_codes_int8(t, spec, channel_dim)) if spec.enabled else None


def _integer_forward_reason(config: QuantConfig, groups: int) -> str | None:
    """Why the forward product cannot be integer under ``config`` (None if it can)."""
    if not (config.weight.enabled or config.activation.enabled):
        return None
    if not (config.weight.enabled and config.activation.enabled):
        return "forward: only one of weight/activation is quantized, so the forward runs in float"
    if config.activation.granularity == "channel":
        return (
            "forward: per-channel activation scales lie on the contraction axis, so the forward "
            "runs in float"
        )
    if groups != 1:
        return f"forward: groups={groups} > 1, so the forward runs in float"
    return None


def _uses_integer_forward(config: QuantConfig, groups: int) -> bool:
    return (
        config.backend == "int8"
        and config.weight.enabled
        and _integer_forward_reason(config, groups) is None
    )


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conv:
    """Shapes of one convolution."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    ho: int
    wo: int
    stride: IntPair
    padding: IntPair
    dilation: IntPair

    @staticmethod
    def of(x_shape, w_shape, stride, padding, dilation) -> _Conv:
        n, c_in, h, w = x_shape
        c_out, _, kh, kw = w_shape
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return _Conv(
            n, c_in, h, w, c_out, kh, kw, ho, wo, tuple(stride), tuple(padding), tuple(dilation)
        )

    @property
    def pointwise(self) -> bool:
        """A 1×1 convolution with stride 1 and no padding: patches are the input itself."""
        return (self.kh, self.kw, self.stride, self.padding) == (1, 1, (1, 1), (0, 0))


def _nhwc_canvas(
    n: int, h: int, w: int, c: int, pad: IntPair, *, device, name: str | None
) -> tuple[Tensor, Tensor]:
    """A zero-bordered int8 ``N×(H+2ph)×(W+2pw)×C`` buffer and its inside as an N×C×H×W view."""
    ph, pw = pad
    hp, wp = h + 2 * ph, w + 2 * pw
    numel = n * hp * wp * c
    flat = (
        _scratch(name, numel, device, torch.int8)
        if name
        else torch.empty(numel, dtype=torch.int8, device=device)
    )
    buf = flat.view(n, hp, wp, c)
    if ph:
        buf[:, :ph].zero_()
        buf[:, ph + h :].zero_()
    if pw:
        buf[:, ph : ph + h, :pw].zero_()
        buf[:, ph : ph + h, pw + w :].zero_()
    return buf, buf[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2)


def _im2col(
    canvas: Tensor, kernel: IntPair, out_hw: IntPair, stride: IntPair, dilation: IntPair
) -> Tensor:
    """The int8 patch matrix (rows ``N·Ho·Wo``, columns ``(i, j, c)``) of a padded NHWC buffer.

    Padded with zeros to ``_padded(rows) × round_up(columns)``; lives in the workspace.
    """
    n, _, _, c = canvas.shape
    (kh, kw), (ho, wo) = kernel, out_hw
    rows, cols = n * ho * wo, kh * kw * c
    sn, sh, sw, _ = canvas.stride()
    view = canvas.as_strided(
        (n, ho, wo, kh, kw, c),
        (sn, stride[0] * sh, stride[1] * sw, dilation[0] * sh, dilation[1] * sw, 1),
    )
    mat = _matrix(_padded(rows), _round_up(cols), rows, cols, device=canvas.device, name="patches")
    mat[:rows, :cols].view(n, ho, wo, kh, kw, c).copy_(view)
    return mat


def _weight_columns(codes: Tensor, width: int, cols_used: int, name: str) -> Tensor:
    """``codes`` (C×K, any strides) in a zero-padded ``round_up(C) × width`` int8 buffer.

    Its transpose is the column-major second operand of ``int_mm`` (K-major, as BLAS likes).
    """
    c = codes.shape[0]
    mat = _matrix(_round_up(c), width, c, cols_used, device=codes.device, name=name)
    mat[:c, :cols_used].copy_(codes)
    return mat


def _error_matrix(e: Tensor, spec: QuantSpec, rows: int, conv: bool):
    """Error codes as an int8 ``_padded(rows) × _padded(C)`` matrix (NHWC / token order).

    Returns the matrix, the codes' N×…×C view inside it, and their scale.
    """
    c = e.shape[1] if conv else e.shape[-1]
    mat = _matrix(_padded(rows), _padded(c), rows, c, device=e.device, name="error")
    if conv:
        inner = mat[:rows, :c].view(e.shape[0], e.shape[2], e.shape[3], c)
        _, scale = quantize_codes_int8(e, spec, 1, out=inner.permute(0, 3, 1, 2))
    else:
        inner = mat[:rows, :c].view(*e.shape[:-1], c)
        _, scale = quantize_codes_int8(e, spec, -1, out=inner)
    return mat, inner, scale


def _conv_forward_int(
    canvas: Tensor, xq: Quantized, wq: Quantized, g: _Conv, config: QuantConfig, bias
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
    config: QuantConfig,
) -> tuple[Tensor, ForwardState]:
    """Forward of a quantized convolution whose backward quantizes its operands.

    Weight and input are forward-quantized as ``config.weight`` / ``config.activation`` say
    (same values as ``fake_quantize``). Under backend ``"int8"`` with both on (and scales that
    factor out), the product is integer; otherwise it is ``F.conv2d`` on the dequantized values.
    """
    wq = _quantize_forward(weight, config.weight, 0)
    if _uses_integer_forward(config, groups):
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


def _flipped_weight_rows(codes: Tensor, rows: int) -> Tensor:
    """The weight codes flipped in space as a ``rows × round_up(Cin)`` matrix.

    Row ``(i', j', co)`` holds ``W[co, :, kh-1-i', kw-1-j']`` (zero rows below): the second
    operand of ``dL/dx``, built by one block copy per kernel tap.
    """
    c_out, c_in, kh, kw = codes.shape
    taps = kh * kw
    per_tap = codes.permute(0, 2, 3, 1).reshape(c_out, taps, c_in)
    mat = _matrix(rows, _round_up(c_in), taps * c_out, c_in, device=codes.device, name="weight")
    blocks = mat[: taps * c_out, :c_in].view(taps, c_out, c_in)
    for tap in range(taps):
        blocks[taps - 1 - tap].copy_(per_tap[:, tap])
    return mat


def _error_placement(g: _Conv):
    """Where the error lands in the buffer of the transposed convolution (see _error_canvas)."""
    hb, wb = g.h + g.dilation[0] * (g.kh - 1), g.w + g.dilation[1] * (g.kw - 1)
    rows = _placement(g.dilation[0] * (g.kh - 1) - g.padding[0], g.stride[0], g.ho, hb)
    cols = _placement(g.dilation[1] * (g.kw - 1) - g.padding[1], g.stride[1], g.wo, wb)
    return hb, wb, rows, cols


def _error_canvas(err_inner: Tensor, g: _Conv) -> Tensor:
    """The error codes placed (stride-dilated) in a zero buffer for the transposed convolution.

    Output ``h`` of ``dL/dx`` reads rows ``h + i'·d`` (``i' = k-1-i``) of an
    ``(H + d(k-1))``-row buffer that holds ``e[ho]`` at row ``d(k-1) - p + ho·s``.
    """
    hb, wb, rows, cols = _error_placement(g)
    flat = _scratch("canvas", g.n * hb * wb * g.c_out, err_inner.device, torch.int8)
    canvas = flat.view(g.n, hb, wb, g.c_out)
    canvas.zero_()
    if rows and cols:
        (r0, r1, rs, h0, h1), (c0, c1, cs, w0, w1) = rows, cols
        canvas[:, r0:r1:rs, c0:c1:cs] = err_inner[:, h0:h1, w0:w1]
    return canvas


def _shared_error_canvas(g: _Conv, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """A zero-bordered error buffer whose inside takes all the error codes directly, or None.

    Only for stride 1 with an output no smaller than the input (e.g. "same" padding), where the
    error's patch matrix (``N·H·W`` rows) can serve both products: ``dL/dx`` and ``dL/dW``
    (:func:`_conv_grad_weight_shared`), which saves the input's patch matrix, unless the
    padding to ``_int_mm``'s sizes makes that ``dL/dW`` product larger than the usual one.
    Returns the buffer and its inside (N×Ho×Wo×Cout).
    """
    if g.pointwise or g.stride != (1, 1) or g.ho * g.wo < g.h * g.w:
        return None
    taps = g.kh * g.kw
    if _round_up(taps * g.c_out) * _round_up(g.c_in) > _padded(g.c_out) * _round_up(taps * g.c_in):
        return None  # padding makes this dL/dW product larger (e.g. an RGB input layer)
    hb, wb, rows, cols = _error_placement(g)
    if not (rows and cols) or (rows[3], rows[4], cols[3], cols[4]) != (0, g.ho, 0, g.wo):
        return None
    (r0, r1, _, _, _), (c0, c1, _, _, _) = rows, cols
    flat = _scratch("canvas", g.n * hb * wb * g.c_out, device, torch.int8)
    canvas = flat.view(g.n, hb, wb, g.c_out)
    canvas[:, :r0].zero_()
    canvas[:, r1:].zero_()
    canvas[:, r0:r1, :c0].zero_()
    canvas[:, r0:r1, c1:].zero_()
    return canvas, canvas[:, r0:r1, c0:c1]


def _conv_grad_weight_shared(patches: Tensor, xmat: Tensor, g: _Conv, e_max: int) -> Tensor:
    """Exact ``dL/dW`` from the error's patch matrix of ``dL/dx``: ``patches^T @ x_codes``.

    Row ``(i', j', co)`` of the int result holds ``W[co, :, kh-1-i', kw-1-j']``; returned as an
    int kh×kw×Cout×Cin view (workspace), taps flipped.
    """
    acc = int_mm(patches.t(), xmat, a_max=e_max, b_max=OPERAND_QMAX, out_name="acc")
    return acc[: g.kh * g.kw * g.c_out, : g.c_in].view(g.kh, g.kw, g.c_out, g.c_in)


def _rescale_flipped_taps(acc: Tensor, scale: Tensor) -> Tensor:
    """``dL/dW`` (Cout×Cin×kh×kw, stored Cout×kh×kw×Cin) from the flipped-tap int result.

    ``acc``: kh×kw×Cout×Cin (tap ``(i', j')``); ``scale``: broadcasts on Cout×Cin.
    """
    kh, kw, c_out, c_in = acc.shape
    out = torch.empty(c_out, kh, kw, c_in, dtype=scale.dtype, device=acc.device)
    for i in range(kh):
        for j in range(kw):
            out[:, i, j].copy_(acc[kh - 1 - i, kw - 1 - j])
    out.mul_(scale[:, None, None, :])
    return out.permute(0, 3, 1, 2)


def _placement(offset: int, step: int, count: int, size: int):
    """Buffer slice (start, stop, step) and source range holding ``src[i]`` at ``offset + i·step``.

    Sources that land outside ``[0, size)`` touch no valid output and are dropped.
    """
    first = max(0, -(offset // step))  # smallest i >= 0 with offset + i*step >= 0
    last = min(count, (size - 1 - offset) // step + 1)
    if last <= first:
        return None
    start = offset + first * step
    return start, start + (last - first - 1) * step + 1, step, first, last


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
    config: QuantConfig,
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
        grad_x = _rescale(acc, scale.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).to(x.dtype)
    if need_w:
        canvas, s_x = _x_canvas(x, g, state, es.weight_fold)
        acc = _conv_grad_weight_int(err, canvas, g, spec.qmax)
        scale = es.weight_factor * s_x.reshape(1, -1, 1, 1)
        grad_w = _rescale(acc, scale.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).to(weight.dtype)
    if need_b:
        grad_b = _bias_grad(err, inner, s_e, spec).to(e.dtype)
    return grad_x, grad_w, grad_b


def _conv2d_backward_shared(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    g: _Conv,
    config: QuantConfig,
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
    grad_x = _rescale(acc, scale.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).to(x.dtype)
    grad_w = grad_b = None
    if need_w:
        xmat, s_x = _x_matrix(x, g, state, es.weight_fold)
        acc = _conv_grad_weight_shared(patches, xmat, g, spec.qmax)
        scale = (es.weight_factor * s_x.reshape(1, -1, 1, 1))[:, :, 0, 0]
        grad_w = _rescale_flipped_taps(acc, scale).to(weight.dtype)
    if need_b:
        rows = g.n * g.ho * g.wo
        err = _matrix(_padded(rows), _padded(g.c_out), rows, g.c_out, device=e.device, name="error")
        err_inner = err[:rows, : g.c_out].view(inner.shape)
        err_inner.copy_(inner)
        grad_b = _bias_grad(err, err_inner, s_e, spec).to(e.dtype)
    return grad_x, grad_w, grad_b


def exact_code_dtype(x: Tensor) -> torch.dtype:
    """The float dtype in which products of 8-bit codes reproduce the integer products.

    Codes of up to 8 bits are exact in bf16 and fp16 and the products accumulate in float32, so
    the result is the integer one wherever partial sums stay below ``2**24``. bf16 or fp16 under
    mixed precision, bf16 on CUDA (tensor cores), else the operand's own float dtype.
    """
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    if x.dtype == torch.float32 and x.device.type == "cuda":
        return torch.bfloat16
    return x.dtype


def _code_operand(
    value: Tensor, pre: Quantized | None, scale_dim: int, dtype: torch.dtype
) -> OperandFn:
    """An :data:`~metagrad.products.OperandFn` of 8-bit codes (as ``dtype``) and their scale."""

    def build(fold: Tensor | None) -> Operand:
        q = backward_operand(value, pre, scale_dim, fold)
        return Operand(q.codes.to(dtype), q.scale)

    return build


@torch.no_grad()
def conv2d_backward_simulated(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    config: QuantConfig,
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


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, config: QuantConfig
) -> tuple[Tensor, ForwardState]:
    """Forward of a quantized linear layer whose backward quantizes its operands.

    See :func:`conv2d_forward`; the integer product is ``x_codes @ W_codes^T``.
    """
    wq = _quantize_forward(weight, config.weight, 0)
    if not _uses_integer_forward(config, 1):
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
    config: QuantConfig,
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
        grad_x = _rescale(acc[:rows, :c_in].view(*lead, c_in), scale).to(x.dtype)
    if need_w:
        xmat, s_x = _linear_x_operand(x, rows, state, es.weight_fold)
        acc = int_mm(err.t(), xmat, a_max=spec.qmax, b_max=OPERAND_QMAX, out_name="acc")
        scale = es.weight_factor * s_x.reshape(1, -1)
        grad_w = _rescale(acc[:c_out, :c_in], scale).to(weight.dtype)
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
    config: QuantConfig,
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


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------

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
    config: QuantConfig,
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
    config: QuantConfig,
    output_mask: Mask,
    *,
    state: ForwardState | None = None,
) -> Grads:
    """The backward of a linear layer with 8-bit operands, by backend and route."""
    integer = config.backend == "int8" and float_route(x.device, "linear") is None
    backward = linear_backward if integer else linear_backward_simulated
    return backward(e, x, weight, config, output_mask, state=state)


# --------------------------------------------------------------------------------------------
# Fallback record
# --------------------------------------------------------------------------------------------


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
