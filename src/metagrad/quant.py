"""Symmetric uniform k-bit quantizers, for gradients and (optionally) the forward pass.

A tensor is split into groups (the whole tensor, one per channel, or one per sample); each group
gets the scale ``absmax / qmax`` with ``qmax = 2**(bits-1) - 1``, so its codes are integers in
``[-qmax, qmax]``. Rounding is to nearest or stochastic: ``floor(x/scale + u)`` with ``u`` uniform
on the 256 levels ``(k + 0.5) / 256``, so ``E[Q(x)]`` is within ``scale / 512`` of ``x``
(unbiased up to that dither resolution). One 32-bit random draw serves four elements, which is
cheaper than drawing a float per element.

Scales are float32 (float64 for float64 inputs) and the codes are computed in that precision
whatever the input's dtype, so bf16 and fp16 errors (mixed precision) quantize exactly like their
float32 values; codes of up to 8 bits are exact in bf16 and fp16, so they can be handed to
low-precision products as they are.

The quantizer is a registered :mod:`metagrad.kernels` kernel: compiled, it fuses the group
maximum, the scaling, the dither and the rounding into two passes over the tensor and returns
the same codes (stochastic rounding included: the random bytes are drawn outside the kernel).

Special values, by design:
- an all-zero group quantizes to zeros (its scale is taken as 1, never 0);
- a group holding NaN or +/-inf gets a NaN scale and all-NaN codes, so that divergence stays
  visible to whatever checks for it downstream (e.g. ``torch.amp.GradScaler`` skips such steps)
  instead of being silently rounded away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metagrad.kernels import kernel

Rounding = Literal["nearest", "stochastic"]
Granularity = Literal["tensor", "channel", "sample"]

ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "sample")
FULL_PRECISION_BITS = 32
MIN_BITS, MAX_BITS = 2, 8
DITHER_LEVELS = 256  # resolution of stochastic rounding's noise (one byte per element)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one kind of tensor.

    Args:
        bits: 2 to 8, or 32 meaning "leave in full precision".
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased).
        granularity: one scale for the whole ``"tensor"``, one per ``"channel"`` (the axis is
            given when quantizing: dim 1 for a convolution's error, the last dim for a linear
            layer's) or one per ``"sample"`` (dim 0).
    """

    bits: int = FULL_PRECISION_BITS
    rounding: Rounding = "nearest"
    granularity: Granularity = "tensor"

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be an integer, got {bits!r}")
        if bits != FULL_PRECISION_BITS and not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"bits must be {MIN_BITS}..{MAX_BITS}, or {FULL_PRECISION_BITS} for full "
                f"precision; got {bits}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether this spec quantizes at all (``bits < 32``)."""
        return self.bits != FULL_PRECISION_BITS

    @property
    def qmax(self) -> int:
        """Largest code magnitude: codes lie in ``[-qmax, qmax]``."""
        return 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        if not self.enabled:
            return "fp32"
        return f"int{self.bits}-{self.rounding}-{self.granularity}"


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
    if keep is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(-lo, hi).reshape([1] * x.dim())
    dims = tuple(d for d in range(x.dim()) if d != keep)
    if not dims:
        return x.abs()
    return x.abs().amax(dim=dims, keepdim=True)


def _dither(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform random bytes laid out like ``like`` (dense): four per 32-bit random draw."""
    n = like.numel()
    words = torch.empty(((n + 3) // 4,), dtype=torch.int32, device=like.device)
    # random_ draws what randint(-2**31, 2**31 - 1) does, and also traces with symbolic sizes
    words.random_(-(2**31), 2**31 - 1, generator=generator)
    return words.view(torch.uint8)[:n].as_strided(like.shape, like.stride())


@kernel
def _codes(
    x: Tensor, dither: Tensor | None, qmax: int, keep: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Codes (as ``dtype``) and scales of ``x``; ``dither``: random bytes, None for nearest."""
    amax = _absmax(x, keep).to(scale_dtype(x))
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))
    codes = x / scale  # computed in the scale's precision whatever x's dtype
    if dither is None:
        codes = codes.round_()
    else:
        # floor(x/scale + (byte + 0.5)/256): |x/scale| <= qmax holds to float32 rounding, so
        # the codes never pass qmax and need no clamp.
        codes = codes.add_(0.5 / DITHER_LEVELS).add_(dither, alpha=1 / DITHER_LEVELS).floor_()
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
    keep = group_dim(x, spec.granularity, channel_dim)
    dither = _dither(x, generator) if spec.rounding == "stochastic" else None
    return _codes(x, dither, spec.qmax, keep, dtype or x.dtype)


def fake_quantize(
    x: Tensor, spec: QuantSpec, channel_dim: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """Quantize and dequantize ``x`` (same shape and dtype); the identity when ``spec`` is off."""
    if not spec.enabled:
        return x
    codes, scale = quantize_codes(x, spec, channel_dim, generator=generator, dtype=scale_dtype(x))
    return codes.mul_(scale).to(x.dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward quantization with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec, channel_dim: int) -> Tensor:
        return fake_quantize(x, spec, channel_dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def fake_quantize_ste(x: Tensor, spec: QuantSpec, channel_dim: int = 1) -> Tensor:
    """``fake_quantize`` in the forward pass, identity in the backward pass (QAT)."""
    if not spec.enabled:
        return x
    return _FakeQuantizeSTE.apply(x, spec, channel_dim)
