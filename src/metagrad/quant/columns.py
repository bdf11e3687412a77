"""Hadamard-block quantization of rows that run down a tensor's memory, without copies.

The weight gradient of a convolution contracts its error over the samples and pixels, which a
channels-last error holds outermost in memory. Its rows along those axes are the columns of that
memory seen as a ``(samples x pixels, channels)`` matrix; a transform that says
``acts_on_columns`` (``rht``) transforms them there, in blocks down the columns, with the block
scales and rounding of :func:`metagrad.quant.transformed.quantize_with_transform`'s fused path,
and the codes come back laid out as the error: the same values as the row-major path, without
its transposed copy in and the convolution's copy back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metagrad.kernels import kernel
from metagrad.quant.rounding import _block_scales, _dequantize, _restorer, _rule, _saturate
from metagrad.quant.spec import QuantSpec
from metagrad.quant.transforms import Transform, overflow_guard

MIN_COLUMNS = 32
"""Fewer columns than this (a 16-channel error) make the batched products too thin: there the
transposed copy and row-major products measured faster."""


def as_columns(x: Tensor, inner: tuple[int, ...]) -> Tensor | None:
    """``x``'s memory as a ``(length, rest)`` matrix whose columns are its rows along ``inner``
    (a view): for an image tensor (4-D) whose memory runs along those axes outermost, as the
    samples and pixels of a channels-last convolution error do, with at least
    :data:`MIN_COLUMNS` columns; None elsewhere.

    Only images: a convolution's backward copies an operand into its own layout, so rows laid
    back as ``x`` save that copy as well as the transposed one; a matrix product takes either
    layout as it is, and there the transposed copy measured faster than the column products.
    """
    if x.dim() != 4:
        return None
    rest = [d for d in range(x.dim()) if d not in inner]
    moved = x.permute(*inner, *rest)
    if not rest or not moved.is_contiguous() or moved[0].numel() < MIN_COLUMNS:
        return None
    return moved.view(moved.shape[: len(inner)].numel(), -1)


@kernel(static_ints=True, exact_casts=True)
def _column_transform(
    m: Tensor, spec: QuantSpec, transform: Transform, state: Any, work: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of the fused quantizer on the columns of ``m`` ``(length, n)``:
    the transformed columns in blocks ``(length // size, size, n)``, their scales and the
    overflow guard (compiled, the scales come out of the pass that reduces the blocks, so the
    rounding reads them instead of computing them again per element)."""
    t = m.to(work)
    down = overflow_guard(t)
    t = transform.forward(t, state, gain=down, columns=True).to(torch.float32)
    t = t.view(t.shape[0] // spec.block_size, spec.block_size, t.shape[1])
    return t, _block_scales(t, spec.number_format.max_value, _rule(spec), (1,)), down


@kernel(static_ints=True, exact_casts=True)
def _column_rounding(
    t: Tensor,
    scale: Tensor,
    down: Tensor,
    spec: QuantSpec,
    transform: Transform,
    state: Any,
    dither: Tensor | None,
    work: torch.dtype,
    dtype: torch.dtype,
    invert: bool,
) -> Tensor:
    """The second half: rounding (the dither read in the rows' order) and the way back
    (``invert``), as a ``(length, n)`` matrix."""
    n = t.shape[2]
    if dither is not None:  # flat in the order of the rows, which are the columns here
        dither = dither.view(n, -1).t()
    q = _dequantize(t, scale, spec, dither, torch.float32).view(-1, n)
    if invert:
        q = transform.inverse(q.to(work), state, columns=True).to(torch.float32)
    return _saturate(q.div_(down.to(torch.float32)), dtype).to(dtype)


def quantize_columns(
    x: Tensor,
    m: Tensor,
    spec: QuantSpec,
    transform: Transform,
    inner: tuple[int, ...],
    state: Any,
    dither: Tensor | None,
    work: torch.dtype,
    dtype: torch.dtype,
    invert: bool = True,
) -> Tensor:
    """The fused quantizer (a transform and block scales) where ``x``'s rows are the columns
    ``m`` of its memory (:func:`as_columns`): worked on in place of a transposed copy, the same
    values, laid out as ``x``; without ``invert``, the transformed rows as the columns of a
    ``(length, n)`` matrix."""
    t, scale, down = _column_transform(m, spec, transform, state, work)
    q = _column_rounding(t, scale, down, spec, transform, state, dither, work, dtype, invert)
    if not invert:
        return q
    perm = [*inner, *(d for d in range(x.dim()) if d not in inner)]
    return _restorer(x.shape, perm)(q)
