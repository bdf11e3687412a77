"""Quantization into int8 codes, the operands of the backward products, and rescaling.

The error is quantized by :func:`quantize_codes_int8` (the codes of
:func:`metagrad.quant.quantize_codes`, written as int8); the other operand of each product by
:func:`quantize_operand` (8 bits, nearest, symmetric), through :func:`backward_operand`, which
reuses the forward quantization when its scale factors out. Both backends call these functions,
so they multiply the very same codes and scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.backward.int8.intmm import (
    _CPU_CHUNK,
    _MIN_ROWS,
    _cpu_eager,
    _matrix,
    _padded,
    _scratch,
    int_mm,
)
from metagrad.backward.products import Operand, OperandFn
from metagrad.kernels import kernel
from metagrad.layout import flat_view, memory_order
from metagrad.quant.quantize import quantize_codes, scale_dtype
from metagrad.quant.spec import QuantSpec

OPERAND_BITS = 8
"""Bits of the non-error operand of every integer product."""
OPERAND_QMAX = 2 ** (OPERAND_BITS - 1) - 1


@dataclass
class Quantized:
    """Integer codes (int8, the operand's logical shape) and the scale that broadcasts on them."""

    codes: Tensor
    scale: Tensor

    def dequantize(self) -> Tensor:
        """``codes * scale`` in float (bit-identical to ``fake_quantize`` of the same codes)."""
        return self.codes.to(self.scale.dtype) * self.scale


def _absmax(x: Tensor, keep: Sequence[int]) -> Tensor:
    """Largest ``|x|`` over every dim not in ``keep``, keepdim; NaN if the group holds one."""
    dims = [d for d in range(x.dim()) if d not in keep]
    if not dims:
        return x.abs()
    if torch.compiler.is_compiling():  # one fused reduction (the layouts below need strides)
        return x.abs().amax(dims, keepdim=True)
    if len(dims) == x.dim():
        lo, hi = torch.aminmax(flat_view(x))
        return torch.maximum(-lo, hi).reshape([1] * x.dim())
    fast = _leading_absmax(x, dims)
    if fast is not None:
        return fast
    return torch.maximum(_reduce(x, dims, torch.amax), _reduce(x, dims, torch.amin).neg())


def _leading_absmax(x: Tensor, dims: list[int]) -> Tensor | None:
    """:func:`_absmax` in one chunked pass when ``dims`` are the outermost in memory (CPU).

    None when that does not apply. Each chunk's ``|x|`` stays in cache.
    """
    order = memory_order(x)
    lead = len(dims)
    if not _cpu_eager(x.device) or sorted(order[:lead]) != sorted(dims):
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
    rank = {d: i for i, d in enumerate(memory_order(x))}
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
    if not _cpu_eager(x.device):
        out.copy_(op(x, factor).round_())
        return
    perm = memory_order(out)
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
    keep = _spec_keep(spec, x.dim(), channel_dim)
    return out, _nearest_codes(x, keep, spec.qmax, out)


@kernel(static_ints=True)
def _nearest_codes(x: Tensor, keep: tuple[int, ...], qmax: int, out: Tensor) -> Tensor:
    """Nearest codes of ``x`` written into ``out``; returns their scale (a registered kernel)."""
    amax = _absmax(x, keep).to(scale_dtype(x))
    scale = (amax / qmax).clamp_min_(torch.finfo(amax.dtype).tiny)  # as quantize_codes
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # |x / scale| <= qmax up to rounding, so nearest rounding needs no clamp.
    _round_into(x, scale, out, divide=True)
    return _nan_if_nonfinite(scale)


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
    keep = () if scale_dim is None else (scale_dim % x.dim(),)
    out = out if out is not None else torch.empty_like(x, dtype=torch.int8)
    return out, _operand_codes(x, keep, fold, out)


@kernel(static_ints=True)
def _operand_codes(x: Tensor, keep: tuple[int, ...], fold: Tensor | None, out: Tensor) -> Tensor:
    """:func:`quantize_operand`'s codes written into ``out``; returns their scale (a registered
    kernel)."""
    nd = x.dim()
    fold_dims = [] if fold is None else [d for d in range(nd) if fold.shape[d] != 1]
    amax = _absmax(x, sorted(set(keep) | set(fold_dims))).to(scale_dtype(x))
    if fold is not None:
        amax = amax * fold  # |x| * fold is monotone in |x|: the group max is exact
        extra = [d for d in fold_dims if d not in keep]
        if extra:
            amax = amax.amax(extra, keepdim=True)
    scale = (amax / OPERAND_QMAX).clamp_min_(torch.finfo(amax.dtype).tiny)
    scale = torch.where(amax == 0, torch.ones_like(amax), scale)
    scale = _nan_if_nonfinite(scale)
    factor = scale.reciprocal() if fold is None else fold / scale
    _round_into(x, factor, out, divide=False)
    return scale


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


@kernel
def _rescale(
    acc: Tensor, scale: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """``acc * scale (+ bias)`` as a new ``dtype`` tensor (default the scale's) laid out like
    ``acc``'s logical order (a registered kernel).

    ``acc`` (an int view of an ``int_mm`` result) and ``scale`` are in memory order; eager on
    CPU, conversion, scaling and bias run chunk by chunk while each chunk is in cache, and avoid
    the slow mixed-dtype multiply.
    """
    dtype = dtype or scale.dtype
    if not _cpu_eager(acc.device):
        y = acc.to(scale.dtype) * scale
        return (y if bias is None else y + bias).to(dtype)
    out = torch.empty(acc.shape, dtype=scale.dtype, device=acc.device)
    size = acc.shape[0] if acc.dim() else 1
    step = max(1, _CPU_CHUNK // max(acc[0].numel(), 1)) if acc.dim() else 1
    for start in range(0, size, step):
        part = out[start : start + step]
        part.copy_(acc[start : start + step])
        part.mul_(scale if scale.shape[0] == 1 else scale[start : start + step])
        if bias is not None:
            part.add_(bias)
    return out.to(dtype)


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
    """An :data:`~metagrad.backward.products.OperandFn` of 8-bit codes (as ``dtype``) and their
    scale."""

    def build(fold: Tensor | None) -> Operand:
        q = backward_operand(value, pre, scale_dim, fold)
        return Operand(q.codes.to(dtype), q.scale)

    return build
