"""Symmetric uniform k-bit quantizers, for gradients and (optionally) the forward pass.

A tensor is split into groups (the whole tensor, one per channel, or one per sample); each group
gets the scale ``absmax / qmax`` with ``qmax = 2**(bits-1) - 1``, so its codes are integers in
``[-qmax, qmax]``. Rounding is to nearest or stochastic: ``floor(x/scale + u)`` with ``u`` uniform
on the ``2**bits`` levels ``(k + 0.5) / 2**bits`` (the spec's ``dither_bits``: 8 by default, so
``E[Q(x)]`` is within ``scale / 512`` of ``x``; 16 for formats that underflow stochastically).
One 32-bit random word serves four elements (two at 16 bits): a hash of the word's index keyed
by two integers drawn from PyTorch's generator per call, computed by a compiled kernel of its
own (integer arithmetic, the same words compiled or eager).

Scales are float32 (float64 for float64 inputs) and the codes are computed in that precision
whatever the input's dtype, so bf16 and fp16 errors (mixed precision) quantize exactly like their
float32 values; codes of up to 8 bits are exact in bf16 and fp16, so they can be handed to
low-precision products as they are.

The quantizer is a registered :mod:`metagrad.kernels` kernel: compiled, it fuses the group
maximum, the scaling, the dither and the rounding into two passes over the tensor and returns
the same codes (stochastic rounding included: the random words are made before the kernel).

Special values, by design:
- no finite input gives a non-finite output: scales are at least the smallest normal number,
  values past the output dtype's largest finite value saturate to it, and a transform of values
  near it runs on them scaled down by a power of two (exact) and scales back;
- an all-zero group quantizes to zeros (its scale is taken as 1, never 0);
- a group holding NaN or +/-inf gets a NaN scale and all-NaN codes, so that divergence stays
  visible to whatever checks for it downstream (e.g. ``torch.amp.GradScaler`` skips such steps)
  instead of being silently rounded away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metagrad.kernels import kernel
from metagrad.quant.formats import add_dither
from metagrad.quant.rounding import (
    _absmax,
    _block_grid,
    _flat_dither,
    _from_blocks,
    _grid_codes,
    _restorer,
    _round_groups,
    _rule,
    _saturate,
    _spec_dither,
    absmax,
    as_rows,
    group_dim,
    row_order,
    scale_dtype,
    spec_dither_key,
    spec_keyed_dither,
)
from metagrad.quant.scaling import scales_by_rule
from metagrad.quant.spec import BLOCK_GRANULARITIES, QuantSpec
from metagrad.quant.transformed import prepare_transform, quantize_with_transform, transform_axes
from metagrad.quant.transforms import Transform, get_transform

__all__ = [
    "absmax",
    "as_rows",
    "fake_quantize",
    "fake_quantize_ste",
    "group_dim",
    "keyed_codes",
    "prepare_transform",
    "quantize_along",
    "quantize_codes",
    "quantize_float_codes",
    "quantize_input",
    "quantize_transformed",
    "quantize_weight",
    "scale_dtype",
]


@kernel
def _codes(
    x: Tensor, dither: Tensor | None, qmax: int, keep: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Codes (as ``dtype``) and scales of ``x``; ``dither``: random bytes, None for nearest."""
    amax = _absmax(x, keep).to(scale_dtype(x))
    scale = (amax / qmax).clamp_min_(torch.finfo(amax.dtype).tiny)
    scale = torch.where(amax == 0, torch.ones_like(amax), scale)
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))
    codes = x / scale  # computed in the scale's precision whatever x's dtype
    # stochastic: floor(x/scale + (k + 0.5)/2**bits); |x/scale| <= qmax holds to float32
    # rounding, so the codes never pass qmax and need no clamp
    codes = codes.round_() if dither is None else add_dither(codes, dither, inplace=True).floor_()
    return codes.to(dtype), scale


def quantize_codes(
    x: Tensor,
    spec: QuantSpec,
    channel_dim: int = 1,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to integer codes and their scale.

    Returns ``(codes, scale)`` with ``codes * scale`` the quantized value: ``codes`` as ``dtype``
    (default ``x``'s dtype; any float dtype holds them exactly, and ``torch.int8`` does for
    finite groups), ``scale`` in float32 (float64 for float64 ``x``), broadcasting against ``x``
    (size 1 along reduced dims). ``spec`` must be enabled.
    """
    if not spec.enabled:
        raise ValueError("quantize_codes needs a spec with bits < 32")
    if not spec.is_integer:
        raise ValueError(
            f"quantize_codes takes integer specs; {spec} is simulated by quantize_along"
        )
    return keyed_codes(x, spec, spec_dither_key(x, spec, generator), channel_dim, dtype)


def keyed_codes(
    x: Tensor,
    spec: QuantSpec,
    key: Tensor | None,
    channel_dim: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_codes` after its random draw: ``key`` from
    :func:`~metagrad.quant.rounding.spec_dither_key` (None: nearest rounding). The same codes
    from the same draw; called inside a larger compiled kernel, the dither is made there."""
    keep = group_dim(x, spec.granularity, channel_dim)
    dither = spec_keyed_dither(x, spec, key)
    return _codes(x, dither, spec.qmax, keep, dtype or x.dtype)


def fake_quantize(
    x: Tensor,
    spec: QuantSpec,
    channel_dim: int = 1,
    *,
    inner: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Quantize and dequantize ``x`` (same shape and dtype); the identity when ``spec`` is off.

    Blocks, tiles and transforms of a non-integer spec run along ``inner`` (default
    ``(channel_dim,)``).
    """
    if not spec.enabled:
        return x
    if not spec.is_integer:
        inner = (channel_dim,) if inner is None else inner
        return quantize_along(x, spec, inner, channel_dim, generator=generator, dtype=x.dtype)
    codes, scale = quantize_codes(x, spec, channel_dim, generator=generator, dtype=scale_dtype(x))
    return _saturate(codes.mul_(scale), x.dtype).to(x.dtype)


def quantize_float_codes(
    x: Tensor, spec: QuantSpec, channel_dim: int = 1, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of ``x`` under a spec with one scale per tensor, channel or sample, no
    transform and no prescale (any number format, any scale format and rounding).

    ``codes`` lie on the format's grid, unscaled (float32; float64 for float64 ``x``), so they
    convert exactly to a hardware dtype of that format (``torch.float8_e5m2`` for
    ``fp8_e5m2``); ``scale`` broadcasts against ``x``. ``codes * scale`` is what
    :func:`quantize_along` returns for ``x`` bit for bit (short of its saturation at the
    output dtype's largest value), from the same random draws.
    """
    plain = spec.granularity not in BLOCK_GRANULARITIES and spec.transform is None
    numerator, denominator = spec.prescale_ratio if spec.enabled else (1, 1)
    if not spec.enabled or not plain or numerator != denominator:
        raise ValueError(
            f"quantize_float_codes takes enabled specs with one scale per tensor, channel or "
            f"sample, no transform and no prescale; got {spec}"
        )
    t = x.to(scale_dtype(x))
    keep = group_dim(t, spec.granularity, channel_dim)
    scale = scales_by_rule(_absmax(t, keep), spec.number_format.max_value, _rule(spec))
    dither = _spec_dither(t, spec, generator)
    return _grid_codes(t, scale, dither, spec.number_format), scale


@kernel(static_ints=True)
def _quantize(
    x: Tensor,
    spec: QuantSpec,
    inner: tuple[int, ...],
    channel_dim: int,
    dither: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """:func:`quantize_along` with no transform, after its random draws: layout, scales and
    rounding compiled into one graph. Blocks come back as :func:`_block_grid` lays them out
    (laid back as ``x`` by views: compiled, a reshape between symbolic sizes would index
    every element through a division)."""
    if spec.granularity in BLOCK_GRANULARITIES:
        perm, length = row_order(x.shape, inner)
        rows = x.permute(perm)  # split by strides where its rows are a view of x
        strided = rows.is_contiguous()
        return _block_grid(rows.reshape(-1, length), spec, dither, dtype, strided).to(dtype)
    t = x.to(scale_dtype(x))
    keep = group_dim(t, spec.granularity, channel_dim)
    return _round_groups(t, spec, keep, dither, dtype).to(dtype)


def _rounded_size(
    x: Tensor, spec: QuantSpec, transform: Transform | None, inner: tuple[int, ...]
) -> int:
    """How many elements the rounding of ``x`` sees (the size of its dither): padded to whole
    transform blocks, then to whole blocks or tiles."""
    if transform is None and spec.granularity not in BLOCK_GRANULARITIES:
        return x.numel()
    axes = inner if transform is None else transform_axes(transform, inner)
    length = row_order(x.shape, axes)[1]
    rows = x.numel() // length
    if transform is not None:
        length = transform.padded_length(length)
    if spec.granularity not in BLOCK_GRANULARITIES:
        return rows * length
    size = spec.block_size
    wide = -(-length // size) * size
    return (-(-rows // size) * size if spec.granularity == "tile" else rows) * wide


def quantize_along(
    x: Tensor,
    spec: QuantSpec,
    inner: Sequence[int],
    channel_dim: int = 1,
    *,
    generator: torch.Generator | None = None,
    transform_state: Any = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``T^-1 Q(T x)``: ``x`` quantized as any ``spec`` says, as ``dtype`` (default float32;
    float64 for float64).

    ``inner``: the dims a product contracts ``x`` over (flattened, in order): blocks of
    ``"block"`` granularity, the columns of ``"tile"`` granularity and ``"inner"`` transforms
    run along them; ``"sample"`` transforms run along dim 0. ``channel_dim``: the axis of
    ``"channel"`` granularity. ``transform_state``: from :func:`prepare_transform` (to share one
    draw between the operands of a product); None draws one from ``generator``. Scales and
    rounding are computed in float32; a transform runs in ``x``'s dtype where its matrix is
    exact in it (``rht`` under mixed precision: a bf16 product, as hardware computes it), else
    in float32. Values past ``dtype``'s largest finite value saturate to it.

    The random numbers are drawn first (a transform's, then the dither). With no transform the
    rest is one registered kernel (:mod:`metagrad.kernels`): compiled, a few fused loops over
    ``x`` whatever its layout. A transform whose blocks are the scale's blocks is one kernel
    with them; any other runs its own steps eagerly between compiled kernels (the layout with
    the overflow guard, the scales and rounding, the way back).
    """
    dtype = dtype or scale_dtype(x)
    if not spec.enabled or x.numel() == 0:
        return x.to(dtype)
    inner = tuple(d % max(x.dim(), 1) for d in inner)
    transform, transform_state, dither = _draws(x, spec, inner, generator, transform_state)
    if transform is not None:
        return quantize_with_transform(
            x, spec, transform, inner, channel_dim, transform_state, dither, dtype, generator
        )
    q = _quantize(x, spec, inner, channel_dim, dither, dtype)
    if spec.granularity not in BLOCK_GRANULARITIES:
        return q
    perm, length = row_order(x.shape, inner)
    return _restorer(x.shape, perm)(_from_blocks(q, x.numel() // length, length))


def quantize_transformed(
    x: Tensor,
    spec: QuantSpec,
    inner: Sequence[int],
    channel_dim: int = 1,
    *,
    generator: torch.Generator | None = None,
    transform_state: Any = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``Q(T x)``: :func:`quantize_along` of a spec with an ``"inner"`` transform, without the
    way back: the quantized, transformed rows of ``x`` along ``inner``, as the ``(rest,
    padded length)`` matrix of :func:`~metagrad.quant.rounding.as_rows` (the other dims
    flattened in order, the row zero-padded to the transform's length).

    A transform is orthogonal, so for two operands quantized with one draw (``transform_state``
    from :func:`prepare_transform`) the product of their rows over the padded length is the
    product of their :func:`quantize_along` values, computed as hardware computes it: on the
    quantized values themselves, with no inverse transform rounded in between (where the
    length is padded, it also adds the products of what the rounding leaves in the padding,
    which :func:`quantize_along` crops). The same random draws as :func:`quantize_along`, so
    its values are these rows transformed back.
    """
    transform = (
        None if spec.transform is None else get_transform(spec.transform, spec.transform_block)
    )
    if not spec.enabled or transform is None or transform.axis != "inner":
        raise ValueError(
            f"quantize_transformed needs an enabled spec with an inner transform; got {spec}"
        )
    dtype = dtype or scale_dtype(x)
    inner = tuple(d % max(x.dim(), 1) for d in inner)
    if x.numel() == 0:
        perm, length = row_order(x.shape, inner)
        rest = math.prod([x.shape[d] for d in perm[: x.dim() - len(inner)]])
        return x.new_zeros((rest, transform.padded_length(length)), dtype=dtype)
    transform, transform_state, dither = _draws(x, spec, inner, generator, transform_state)
    return quantize_with_transform(
        x, spec, transform, inner, channel_dim, transform_state, dither, dtype, generator, False
    )


def _draws(
    x: Tensor,
    spec: QuantSpec,
    inner: tuple[int, ...],
    generator: torch.Generator | None,
    state: Any,
) -> tuple[Transform | None, Any, Tensor | None]:
    """The spec's transform, its draw (``state``, or one from ``generator``; data-dependent
    transforms draw later) and the dither, drawn in that order."""
    transform = None
    if spec.transform is not None:
        transform = get_transform(spec.transform, spec.transform_block)
        if state is None and not transform.data_dependent:
            state = prepare_transform(x, spec, inner, generator)
    dither = None
    if spec.rounding == "stochastic":
        size = _rounded_size(x, spec, transform, inner)
        dither = _flat_dither(size, x.device, generator, spec.dither_bits, x)
    return transform, state, dither


WEIGHT_INNER = (1,)
"""The axis a weight's forward blocks and tiles run along: its input features (a
convolution's input channels, per kernel tap, as an implicit GEMM on channels-last data)."""


def quantize_weight(weight: Tensor, spec: QuantSpec, *, ste: bool = False) -> Tensor:
    """A layer's weight forward-quantized as ``spec`` says (``ste``: with a straight-through
    gradient); one scale per output channel under ``"channel"`` granularity."""
    if ste:
        return fake_quantize_ste(weight, spec, 0, WEIGHT_INNER)
    return fake_quantize(weight, spec, 0, inner=WEIGHT_INNER)


def quantize_input(x: Tensor, spec: QuantSpec, channel_dim: int, *, ste: bool = False) -> Tensor:
    """A layer's input forward-quantized as ``spec`` says, blocks along ``channel_dim`` (its
    features: the last dim of a linear layer's input, dim 1 of a convolution's)."""
    if ste:
        return fake_quantize_ste(x, spec, channel_dim)
    return fake_quantize(x, spec, channel_dim)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward quantization with a straight-through gradient."""

    @staticmethod
    def forward(
        ctx, x: Tensor, spec: QuantSpec, channel_dim: int, inner: tuple[int, ...] | None
    ) -> Tensor:
        return fake_quantize(x, spec, channel_dim, inner=inner)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def fake_quantize_ste(
    x: Tensor, spec: QuantSpec, channel_dim: int = 1, inner: Sequence[int] | None = None
) -> Tensor:
    """``fake_quantize`` in the forward pass, identity in the backward pass (QAT)."""
    if not spec.enabled:
        return x
    return _FakeQuantizeSTE.apply(x, spec, channel_dim, None if inner is None else tuple(inner))
