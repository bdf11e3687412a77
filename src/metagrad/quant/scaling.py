"""Shared scales: from a group's largest magnitude to the factor its values are divided by.

A group's scale maps its largest magnitude ``amax`` onto the format's largest value,
``amax / max_value``, stored as:

- ``"float32"``: as computed;
- ``"e8m0"``: a power of two (the MX formats' shared exponent), rounded up, so that no element of
  the group lands past the format's largest value (rounded down, as the OCP MX draft does,
  clipping would bias stochastic rounding);
- ``"e4m3"``: two levels (NVFP4): one float32 scale per tensor, ``amax_tensor / (max_value *
  448)``, times an FP8 E4M3 scale per group, rounded up onto the E4M3 grid for the same reason.

An all-zero group gets the scale 1 (its values are zeros); a group holding NaN or inf gets NaN,
so divergence stays visible downstream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.quant.formats import FloatFormat

E4M3 = FloatFormat(4, 3, "fn")
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127


def ceil_to_power_of_two(s: Tensor) -> Tensor:
    """The smallest power of two ``>= s`` (positive finite ``s``), within E8M0's range."""
    mantissa, exponent = torch.frexp(s)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    exponent = exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return torch.ldexp(torch.ones_like(s), exponent)


def ceil_to_format(r: Tensor, fmt: FloatFormat) -> Tensor:
    """The smallest value of ``fmt`` that is ``>= r`` (``0 <= r <= fmt.max_value``)."""
    _, e = torch.frexp(r)
    e = torch.clamp(e - 1, min=fmt.min_exponent)
    step = torch.ldexp(torch.ones_like(r), e - fmt.mantissa)
    return torch.ceil(r / step).mul_(step).clamp_(max=fmt.max_value)


def group_scales(
    amax: Tensor, max_value: float, scale_format: str, tensor_amax: Tensor | None = None
) -> Tensor:
    """Scales of groups with largest magnitudes ``amax`` (float32+), as ``scale_format`` says.

    ``tensor_amax``: the whole tensor's largest magnitude (``"e4m3"`` only; default the largest
    ``amax``).
    """
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    scale = safe / max_value
    if scale_format == "e8m0":
        scale = ceil_to_power_of_two(scale)
    elif scale_format == "e4m3":
        top = amax.amax() if tensor_amax is None else tensor_amax
        top = torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))
        outer = top / (max_value * E4M3.max_value)
        scale = ceil_to_format(scale / outer, E4M3) * outer
    elif scale_format != "float32":
        raise ValueError(f"unknown scale format {scale_format!r}")
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))
