"""Scales, rounding and dither beneath :mod:`metagrad.quant.quantize`: a float32 tensor rounded
in groups (the whole tensor, channels, samples), in blocks along its rows or in square tiles,
with the random bytes of stochastic rounding. Compiled kernels (:mod:`metagrad.kernels`) where
the work is elementwise."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metagrad.kernels import kernel
from metagrad.quant.draws import draw_integers
from metagrad.quant.formats import DITHER_BITS, NumberFormat, dither_dtype
from metagrad.quant.scaling import ScaleRule, get_scale_rule, scales_by_rule
from metagrad.quant.spec import QuantSpec


def scale_dtype(x: Tensor) -> torch.dtype:
    """The dtype scales and codes are computed in for ``x``: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_dim(x: Tensor, granularity: str, channel_dim: int = 1) -> int | None:
    """The dim that keeps one scale per index (None: one scale for the whole tensor)."""
    if granularity == "tensor" or x.dim() == 0:
        return None
    return 0 if granularity == "sample" else channel_dim % x.dim()


def absmax(x: Tensor, granularity: str = "tensor", channel_dim: int = 1) -> Tensor:
    """Largest magnitude per group, shaped to broadcast against ``x`` (NaN if a group has one)."""
    return _absmax(x, group_dim(x, granularity, channel_dim))


def _absmax(x: Tensor, keep: int | None) -> Tensor:
    if x.numel() == 0:  # no element: the scale of an all-zero group
        shape = [x.shape[d] if d == keep else 1 for d in range(x.dim())]
        return x.new_zeros(shape)
    if keep is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(-lo, hi).reshape([1] * x.dim())
    dims = tuple(d for d in range(x.dim()) if d != keep)
    if not dims:
        return x.abs()
    return _magnitude_amax(x, dims)


@kernel(static_ints=True)
def _magnitude_amax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x.abs().amax(dims, keepdim=True)``; compiled, one pass with no tensor of magnitudes."""
    return x.abs().amax(dim=dims, keepdim=True)


def _shift(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` as an unsigned 32-bit shift of the int32 ``x`` (zeros shifted in)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of the int32 ``x`` (lowbias32: xor-shifts and two odd
    multipliers), in wrapping int32 arithmetic."""
    x = x ^ _shift(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _shift(x, 15)
    x = x * -0x7B935975  # 0x846CA68B as a signed 32-bit integer
    return x ^ _shift(x, 16)


@kernel
def _hashed_words(like: Tensor, key: Tensor) -> Tensor:
    """One random 32-bit word (``int32``) per element of the 1-D ``like``: two rounds of
    :func:`_mix32` of the element's index, keyed by the two words of ``key`` (int32). Integer
    arithmetic only, so compiled and eager give the same words."""
    index = torch.arange(like.shape[0], device=like.device, dtype=torch.int32)
    return _mix32(_mix32(index + key[0]) ^ key[1])


def dither_key(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The key of one draw of random bytes: two int32 words drawn from ``generator`` (None:
    PyTorch's default generator) on ``like``'s device; traced by ``torch.compile``, a function
    of ``like`` (:mod:`metagrad.quant.draws`)."""
    return draw_integers(like, -(2**31), 2**31 - 1, 2, generator, torch.int32)


def keyed_dither(
    n: int, key: Tensor, bits: int = DITHER_BITS, like: Tensor | None = None
) -> Tensor:
    """``n`` uniform random integers of ``bits`` bits, flat, from ``key`` (:func:`dither_key`):
    ``uint8`` bytes, or for 16 bits signed 16-bit halves held in ``int32``
    (:func:`~metagrad.quant.formats.dither_dtype`); four bytes (two 16-bit halves) per 32-bit
    word of :func:`_hashed_words`. Integer arithmetic only, so a compiled kernel that takes
    ``key`` makes the same numbers as eager code. ``like``: a tensor on ``key``'s device whose
    sizes trace symbolically (torch.compile)."""
    dtype = dither_dtype(bits)
    drawn = torch.uint8 if bits == 8 else torch.int16
    per_word = 32 // bits
    size = ((n + per_word - 1) // per_word,)
    base = like if like is not None else key
    words = _hashed_words(base.new_empty(size, dtype=torch.int32), key)
    if bits == 16 and torch.compiler.is_compiling() and sys.byteorder == "little":
        # the halves a little-endian int16 view gives, low first, by shifts: inductor's CPU
        # code does not vectorize a loop that loads int16
        halves = torch.stack((words << 16 >> 16, words >> 16), -1)
        return halves.reshape(-1)[:n]
    return words.view(drawn)[:n].to(dtype)


def _flat_dither(
    n: int,
    device: torch.device,
    generator: torch.Generator | None,
    bits: int = DITHER_BITS,
    like: Tensor | None = None,
) -> Tensor:
    """:func:`keyed_dither` of ``n`` integers of ``bits`` bits, keyed by one draw from
    ``generator``. ``like``: a tensor on ``device`` whose sizes trace symbolically
    (torch.compile), and the draw's input (:mod:`metagrad.quant.draws`)."""
    base = like if like is not None else torch.empty(0, device=device)
    return keyed_dither(n, dither_key(base, generator), bits, base)


def _dither(like: Tensor, generator: torch.Generator | None, bits: int = DITHER_BITS) -> Tensor:
    """:func:`_flat_dither` shaped like ``like``, in its logical (row-major) order whatever its
    memory layout, so a view, a transpose or a channels-last tensor draws what its contiguous
    copy draws."""
    return _flat_dither(like.numel(), like.device, generator, bits, like).view(like.shape)


def _spec_dither(like: Tensor, spec: QuantSpec, generator: torch.Generator | None):
    """The dither of ``spec``'s stochastic rounding for ``like`` (None: nearest rounding)."""
    return spec_keyed_dither(like, spec, spec_dither_key(like, spec, generator))


def spec_dither_key(
    like: Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> Tensor | None:
    """The key of ``spec``'s dither for ``like`` (None: nearest rounding), drawn from
    ``generator``; :func:`spec_keyed_dither` expands it."""
    return dither_key(like, generator) if spec.rounding == "stochastic" else None


def spec_keyed_dither(like: Tensor, spec: QuantSpec, key: Tensor | None) -> Tensor | None:
    """``spec``'s dither for ``like`` from its key (None: none), shaped like ``like`` in its
    logical order (as :func:`_dither`)."""
    if key is None:
        return None
    return keyed_dither(like.numel(), key, spec.dither_bits, like).view(like.shape)


def _saturate(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` with values past ``dtype``'s largest finite value set to it (NaN stays), in place."""
    top = torch.finfo(dtype).max
    return t.clamp_(-top, top)


def row_order(shape: Sequence[int], axes: Sequence[int]) -> tuple[list[int], int]:
    """The permutation that moves ``axes`` last (the others first, in order), and the length of
    a row: the product of ``axes``' sizes."""
    perm = [d for d in range(len(shape)) if d not in axes] + list(axes)
    return perm, math.prod([shape[d] for d in axes])


def as_rows(
    t: Tensor, axes: Sequence[int], *, position_major: bool = False
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``t`` as a ``(rest, prod(axes))`` matrix, and the function that lays such a matrix back.

    ``position_major``: the matrix as the transposed view of memory laid out position by
    position along ``axes`` (a copy only where ``t``'s memory is not).
    """
    perm, length = row_order(t.shape, axes)
    if position_major:
        k = len(axes)
        rows = t.permute(perm[-k:] + perm[:-k]).reshape(length, -1).t()
    else:
        rows = t.permute(perm).reshape(-1, length)
    return rows, _restorer(t.shape, perm)


def _restorer(shape: Sequence[int], perm: list[int]) -> Callable[[Tensor], Tensor]:
    """The function that lays a matrix of the permuted ``shape`` back in ``shape``."""
    moved = [shape[d] for d in perm]
    inverse = [perm.index(d) for d in range(len(shape))]

    def restore(m: Tensor) -> Tensor:
        return m.reshape(moved).permute(inverse)

    return restore


@kernel
def _block_scales(
    blocks: Tensor, max_value: float, rule: ScaleRule, dims: tuple[int, ...] = (-1,)
) -> Tensor:
    """One scale per block of ``blocks`` (float32+) over ``dims``, keeping them."""
    amax = blocks.abs().amax(dim=dims, keepdim=True)
    return scales_by_rule(amax, max_value, rule, amax.amax())


@kernel
def _dequantized(
    t: Tensor, scale: Tensor, dither: Tensor | None, fmt: NumberFormat, out: torch.dtype
) -> Tensor:
    """``t`` rounded onto ``fmt``'s grid times ``scale`` (broadcast), and scaled back, saturated
    at ``out``'s largest finite value. A zero scale gives zeros."""
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).max, scale)  # rounds to 0
    return _saturate(fmt.round(t / scale, dither) * scale, out)


@kernel
def _dequantized_prescaled(
    t: Tensor,
    scale: Tensor,
    dither: Tensor | None,
    fmt: NumberFormat,
    out: torch.dtype,
    prescale: float,
) -> Tensor:
    """:func:`_dequantized` of ``t * prescale``, divided by ``prescale`` after rounding."""
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).max, scale)
    units = fmt.round((t / scale).mul_(prescale), dither).div_(prescale)
    return _saturate(units * scale, out)


def _dequantize(
    t: Tensor, scale: Tensor, spec: QuantSpec, dither: Tensor | None, out: torch.dtype
) -> Tensor:
    """``t`` (float32+) quantized with ``scale`` (broadcast) as ``spec`` rounds it; ``dither``:
    :func:`_flat_dither` of ``t``'s size (None: nearest)."""
    dither = None if dither is None else dither.view(t.shape)
    fmt = spec.number_format
    numerator, denominator = spec.prescale_ratio  # not spec.prescale: see QuantSpec
    if numerator == denominator:
        return _dequantized(t, scale, dither, fmt, out)
    return _dequantized_prescaled(t, scale, dither, fmt, out, numerator / denominator)


def _rule(spec: QuantSpec) -> ScaleRule:
    return get_scale_rule(spec.scale_format, spec.scale_rounding)


def _round_groups(
    t: Tensor, spec: QuantSpec, keep: int | None, dither: Tensor | None, out: torch.dtype
) -> Tensor:
    """``t`` (float32+) rounded with one scale per group (as :func:`absmax`'s ``keep``)."""
    scale = scales_by_rule(_absmax(t, keep), spec.number_format.max_value, _rule(spec))
    return _dequantize(t, scale, spec, dither, out)


@kernel
def _grid_codes(t: Tensor, scale: Tensor, dither: Tensor | None, fmt: NumberFormat) -> Tensor:
    """``t / scale`` rounded onto ``fmt``'s grid: :func:`_dequantized` before its last multiply."""
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).max, scale)  # rounds to 0
    return fmt.round(t / scale, dither)


def _round_blocks(m: Tensor, spec: QuantSpec, dither: Tensor | None, out: torch.dtype) -> Tensor:
    """Round the rows of ``m`` (float32+) in blocks of ``spec.block_size`` along them, or in
    square tiles of that side (``"tile"`` granularity), zero-padded."""
    return _from_blocks(_block_grid(m, spec, dither, out), *m.shape)


def _from_blocks(q: Tensor, rows: int, length: int) -> Tensor:
    """The ``(rows, length)`` matrix of :func:`_block_grid`'s blocks or tiles ``q``."""
    if q.dim() == 4:  # tiles
        return q.reshape(q.shape[0] * q.shape[1], -1)[:rows, :length]
    return q.reshape(rows, -1)[:, :length]


def _block_grid(
    m: Tensor, spec: QuantSpec, dither: Tensor | None, out: torch.dtype, strided: bool = False
) -> Tensor:
    """The rows of ``m`` rounded in blocks (or tiles), as ``(rows, blocks, size)`` (or
    ``(tiles down, size, tiles across, size)``), zero-padded, computed in
    :func:`scale_dtype`. ``strided``: ``m`` is a view of a tensor that exists (not computed),
    so that it splits into blocks by strides (:func:`_split`)."""
    if spec.granularity == "tile":
        return _round_tiles(m, spec, dither, out, strided)
    rows, length = m.shape
    size = spec.block_size
    padded = _whole(length, size)
    if padded != length:
        m, strided = torch.nn.functional.pad(m, (0, padded - length)), False
    blocks = _split(m, size, strided=strided).to(scale_dtype(m))
    if dither is not None:  # flat, in the blocks' logical order
        dither = _split(dither.view(rows, padded), size, strided=True)
    scale = _block_scales(blocks, spec.number_format.max_value, _rule(spec))
    return _dequantize(blocks, scale, spec, dither, out)


def _split(m: Tensor, size: int, tiles: bool = False, strided: bool = False) -> Tensor:
    """``m`` (rows, length), ``length`` (and for ``tiles`` ``rows``) a multiple of ``size``, as
    ``(rows, length // size, size)`` blocks or ``(rows // size, size, length // size, size)``
    tiles.

    ``strided``: split by strides, for an ``m`` that exists in memory. Compiled with symbolic
    sizes, a reshape gives the last dim the size ``length // (length // size)``, which the
    compiler cannot prove equal to ``size``, and it then stores the rounding's intermediates to
    memory and reads them back in a second loop; strides on a computed ``m`` would store it
    instead."""
    rows, length = m.shape
    row, column = m.stride()
    shape: tuple[int, ...] = (rows, length // size, size)
    strides: tuple[int, ...] = (row, size * column, column)
    if tiles:
        shape = (rows // size, size, length // size, size)
        strides = (size * row, row, size * column, column)
    return m.as_strided(shape, strides) if strided else m.reshape(shape)


def _whole(length: int, size: int) -> int:
    """``length`` rounded up to whole blocks of ``size``. Written so that a length already
    whole stays the same expression: compiled with symbolic sizes, its blocks index simply."""
    return length if length % size == 0 else (length // size + 1) * size


def _round_tiles(
    m: Tensor, spec: QuantSpec, dither: Tensor | None, out: torch.dtype, strided: bool = False
) -> Tensor:
    """``m`` rounded in tiles of ``spec.block_size`` rows by as many columns, as ``(tiles
    down, size, tiles across, size)``; ``strided`` as :func:`_block_grid` says."""
    rows, length = m.shape
    size = spec.block_size
    tall, wide = _whole(rows, size), _whole(length, size)
    if (tall, wide) != (rows, length):
        m = torch.nn.functional.pad(m, (0, wide - length, 0, tall - rows))
        strided = False
    tiles = _split(m, size, tiles=True, strided=strided).to(scale_dtype(m))
    if dither is not None:
        dither = _split(dither.view(tall, wide), size, tiles=True, strided=True)
    scale = _block_scales(tiles, spec.number_format.max_value, _rule(spec), (1, 3))
    return _dequantize(tiles, scale, spec, dither, out)
