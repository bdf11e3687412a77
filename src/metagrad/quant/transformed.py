"""Quantization after a transform (:mod:`metagrad.quant.transforms`): ``T^-1 Q(T x)``, or
``Q(T x)`` alone for products that share the transform's draw.

The rows a transform acts on (the contraction axes flattened, zero-padded to its length), the
overflow guard that scales rows near their dtype's largest value down first, and the paths of
:func:`quantize_with_transform`: a blockwise transform whose blocks are the scale's blocks runs
with them as one compiled kernel (on the columns of a channels-last error's memory where the
transform takes columns, :mod:`metagrad.quant.columns`); any other runs its own steps between
compiled kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from metagrad.kernels import kernel
from metagrad.quant.columns import as_columns, quantize_columns
from metagrad.quant.rounding import (
    _block_scales,
    _dequantize,
    _restorer,
    _round_blocks,
    _round_groups,
    _rule,
    _saturate,
    as_rows,
    row_order,
    scale_dtype,
)
from metagrad.quant.spec import BLOCK_GRANULARITIES, QuantSpec
from metagrad.quant.transforms import Transform, get_transform, overflow_guard

__all__ = ["prepare_transform", "quantize_with_transform", "transform_axes"]


def _transform_rows(
    t: Tensor, transform: Transform, axes: tuple[int, ...]
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``t`` as rows along ``axes`` (flattened), zero-padded to the transform's length, and
    the function that lays such rows (cropped) back as ``t``. A ``"sample"`` transform's rows
    are the transposed view of position-major memory, the layout its forward reads."""
    rows, restore = as_rows(t, axes, position_major=transform.axis == "sample")
    length = rows.shape[1]
    padded = transform.padded_length(length)
    if padded != length:
        rows = torch.nn.functional.pad(rows, (0, padded - length))
    return rows, lambda m: restore(m[:, :length])


def transform_axes(transform: Transform, inner: tuple[int, ...]) -> tuple[int, ...]:
    return inner if transform.axis == "inner" else (0,)


def prepare_transform(
    x: Tensor, spec: QuantSpec, inner: Sequence[int], generator: torch.Generator | None = None
) -> Any:
    """One draw of ``spec``'s transform for ``x``: :func:`quantize_along`'s ``transform_state``."""
    transform = get_transform(spec.transform, spec.transform_block)
    inner = tuple(d % max(x.dim(), 1) for d in inner)
    axes = transform_axes(transform, inner)
    if not transform.data_dependent:  # only the padded length, dtype and device matter
        length = transform.padded_length(row_order(x.shape, axes)[1])
        rows = x.new_empty((0, length), dtype=scale_dtype(x))
        if x.numel() and torch.compiler.is_compiling():  # the draws depend on x: one element
            rows = x.detach()[(0,) * x.dim()].to(rows.dtype).expand(1, length)  # (.quant.draws)
        return transform.prepare(rows, generator)
    return transform.prepare(_transform_rows(x.to(scale_dtype(x)), transform, axes)[0], generator)


def _group_axis(dim: int, rest: list[int], axes: tuple[int, ...], spec: QuantSpec) -> int:
    """Where the groups of a channel or sample scale lie in the transformed ``(*rest, L)``."""
    if dim in rest:
        return rest.index(dim)
    if axes == (dim,):
        return len(rest)
    raise ValueError(
        f"{spec}: a {spec.granularity} scale is not defined on the transformed axes {axes}"
    )


def _transform_dtype(transform: Transform, x: Tensor) -> torch.dtype:
    """The dtype ``transform`` runs in on ``x``: bf16/fp16 where its matrix is exact in it."""
    if transform.low_precision and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return scale_dtype(x)


@kernel(static_ints=True)
def _guarded_rows(
    x: Tensor, transform: Transform, axes: tuple[int, ...], work: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``x`` as ``transform``'s rows (:func:`_transform_rows`) in ``work``, scaled by
    :func:`~metagrad.quant.transforms.overflow_guard`, and that guard: compiled, one pass that
    reads ``x`` twice."""
    rows = _transform_rows(x, transform, axes)[0].to(work)
    down = overflow_guard(rows)  # exact: quantization commutes with powers of two
    return rows * down, down


@kernel
def _unguarded(q: Tensor, down: Tensor, dtype: torch.dtype) -> Tensor:
    """``q`` scaled back by the overflow guard ``down``, saturated to ``dtype`` and cast to it."""
    return _saturate(q / down.to(q.dtype), dtype).to(dtype)


def _quantize_transformed(
    x: Tensor,
    spec: QuantSpec,
    transform: Transform,
    inner: tuple[int, ...],
    channel_dim: int,
    dither: Tensor | None,
    state: Any,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    invert: bool = True,
) -> Tensor:
    axes = transform_axes(transform, inner)
    work = _transform_dtype(transform, x)
    compute = scale_dtype(x)
    perm, length = row_order(x.shape, axes)
    restore = _restorer(x.shape, perm)
    if transform.axis == "sample":
        # sample-major memory, where its rows are a view: aten's copy of a channels-last error
        # transposes it faster than the compiled kernel's reads across it would
        x = x.contiguous()
    rows, down = _guarded_rows(x, transform, axes, work)
    if state is None:  # a data-dependent transform (the others are prepared before)
        state = transform.prepare(rows, generator)
    rows = transform.forward(rows, state).to(compute)
    rest = [d for d in range(x.dim()) if d not in axes]
    if spec.granularity in BLOCK_GRANULARITIES:
        if axes != inner:
            raise ValueError(f"{spec}: blocks run along the contraction axis, the transform not")
        q = _round_blocks(rows, spec, dither, compute)
    else:
        grid = rows.reshape(*[x.shape[d] for d in rest], rows.shape[1])
        keep = None
        if spec.granularity != "tensor":
            dim = 0 if spec.granularity == "sample" else channel_dim % x.dim()
            keep = _group_axis(dim, rest, axes, spec)
        q = _round_groups(grid, spec, keep, dither, compute).reshape(rows.shape)
    if not invert:
        return _unguarded(q, down, dtype)
    q = transform.inverse(q.to(work), state).to(compute)
    return restore(_unguarded(q, down, dtype)[:, :length])


@kernel
def _contiguous(x: Tensor) -> Tensor:
    """``x.contiguous()``. Compiled, the copy of a transposed view (rows along a matrix's
    leading axis) runs in vectorized tiles: several times faster than aten's copy."""
    return x.contiguous()


def _fused_block(transform: Transform, state: Any, spec: QuantSpec, inner, x: Tensor) -> int:
    """The block of a data-independent transform that acts on whole blocks of the quantizer, one
    by one, along the contraction axis (so the two fuse into one kernel), or on whole rows
    shorter than one (each a zero-padded block); 0 where it does not."""
    along = getattr(transform, "blockwise", None)
    if along is None or transform.data_dependent or spec.granularity != "block":
        return 0
    if transform_axes(transform, inner) != inner or x.dtype not in _FUSED_DTYPES:
        return 0
    block = along(state)
    if block % spec.block_size == 0:
        return block
    whole_rows = transform.padded_length(row_order(x.shape, inner)[1]) == block
    return block if whole_rows and block < spec.block_size else 0


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@kernel(static_ints=True, exact_casts=True)
def _transformed_blocks(
    blocks: Tensor,
    spec: QuantSpec,
    transform: Transform,
    state: Any,
    dither: Tensor | None,
    work: torch.dtype,
    dtype: torch.dtype,
    invert: bool = True,
) -> Tensor:
    """:func:`_quantize_transformed` on ``(n, block)`` rows where the transform's blocks are
    whole blocks of the quantizer: transform, scales, rounding and the way back (``invert``)
    in one graph."""
    compute = torch.float32
    t = blocks.to(work)
    down = overflow_guard(t)  # exact: quantization commutes with powers of two
    t = transform.forward(t, state, gain=down).to(compute)  # t read once, not rescaled first
    size = spec.block_size
    if t.shape[1] < size:  # whole rows, each one block zero-padded: the padding rounds to 0
        t = t.unsqueeze(1)
        dither = None if dither is None else dither.view(-1, size)[:, : t.shape[2]]
    else:
        t = t.view(t.shape[0], t.shape[1] // size, size)
    scale = _block_scales(t, spec.number_format.max_value, _rule(spec))
    q = _dequantize(t, scale, spec, dither, compute).flatten(1)
    if invert:
        q = transform.inverse(q.to(work), state).to(compute)
    return _saturate(q.div_(down.to(compute)), dtype).to(dtype)


def quantize_with_transform(
    x: Tensor,
    spec: QuantSpec,
    transform: Transform,
    inner: tuple[int, ...],
    channel_dim: int,
    state: Any,
    dither: Tensor | None,
    dtype: torch.dtype,
    generator: torch.Generator | None,
    invert: bool = True,
) -> Tensor:
    """``x`` quantized after ``transform``, laid back as ``x`` (``invert``) or as the rows of
    :func:`quantize_transformed`."""
    block = _fused_block(transform, state, spec, inner, x)
    if not block:
        return _quantize_transformed(
            x, spec, transform, inner, channel_dim, dither, state, dtype, generator, invert
        )
    work = _transform_dtype(transform, x)
    m = as_columns(x, inner) if getattr(transform, "acts_on_columns", False) else None
    if m is not None and m.shape[0] % block == 0 and block % spec.block_size == 0:
        q = quantize_columns(x, m, spec, transform, inner, state, dither, work, dtype, invert)
        return q if invert else q.t()
    rows, restore = _transform_rows(x, transform, inner)
    whole = rows if rows.is_contiguous() else _contiguous(rows)
    q = _transformed_blocks(
        whole.view(-1, block), spec, transform, state, dither, work, dtype, invert
    ).reshape(rows.shape)
    return restore(q) if invert else q
