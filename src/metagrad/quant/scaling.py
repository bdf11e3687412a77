"""Shared scales: from a group's largest magnitude to the factor its values are divided by.

A group's scale maps its largest magnitude ``amax`` onto the format's largest value,
``amax / max_value``; a scale format (a registered :data:`ScaleRule`) says how that scale is
stored. Built in:

- ``"float32"``: as computed;
- ``"e8m0"``: a power of two (the MX formats' shared exponent), rounded up, so that no element of
  the group lands past the format's largest value (rounded down, as the OCP MX draft does,
  clipping would bias stochastic rounding);
- ``"e4m3"``: two levels (NVFP4): one float32 scale per tensor, ``amax_tensor / (max_value *
  448)``, times an FP8 E4M3 scale per group, rounded up onto the E4M3 grid for the same reason.

An all-zero group gets the scale 1 (its values are zeros); a group holding NaN or inf gets NaN,
so divergence stays visible downstream. A new scale format is one function and one
:func:`register_scale_format` call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metagrad.quant.formats import NAME_HELP, NAME_PATTERN, FloatFormat
from metagrad.registry import Registry

E4M3 = FloatFormat(4, 3, "fn")
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127

ScaleRule = Callable[[Tensor, Tensor, float, Tensor | None], Tensor]
"""``rule(scale, amax, max_value, tensor_amax) -> stored scale``.

``scale``: ``amax / max_value`` per group (positive and finite: zero and non-finite groups are
computed with ``amax`` 1 and fixed afterwards); ``amax``: the groups' largest magnitudes as
given; ``tensor_amax``: the whole tensor's largest magnitude where the caller knows it (None:
take the largest ``amax``). A rule must not return less than ``scale``, or values would clip.
"""

_SCALE_RULES: Registry[ScaleRule] = Registry(
    "scale format", pattern=NAME_PATTERN, pattern_help=NAME_HELP
)


def register_scale_format(name: str, rule: ScaleRule) -> ScaleRule:
    """Make ``rule`` available as ``QuantSpec(scale_format=name)``; returns it."""
    return _SCALE_RULES.add(name, rule)


def get_scale_rule(name: str) -> ScaleRule:
    """The registered scale format ``name``."""
    return _SCALE_RULES.lookup(name)


def list_scale_formats() -> list[str]:
    """Names of the registered scale formats, in registration order."""
    return list(_SCALE_RULES)


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


def float32_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"float32"``: the scale as computed."""
    return scale


def e8m0_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"e8m0"``: powers of two, rounded up."""
    return ceil_to_power_of_two(scale)


def e4m3_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"e4m3"``: E4M3 values, rounded up, under one float32 scale per tensor."""
    top = amax.amax() if tensor_amax is None else tensor_amax
    top = torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))
    outer = top / (max_value * E4M3.max_value)
    return ceil_to_format(scale / outer, E4M3) * outer


def scales_by_rule(
    amax: Tensor, max_value: float, rule: ScaleRule, tensor_amax: Tensor | None = None
) -> Tensor:
    """Scales of groups with largest magnitudes ``amax`` (float32+), stored as ``rule`` says."""
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    scale = rule(safe / max_value, amax, max_value, tensor_amax)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))


def group_scales(
    amax: Tensor, max_value: float, scale_format: str, tensor_amax: Tensor | None = None
) -> Tensor:
    """Scales of groups with largest magnitudes ``amax`` (float32+), as ``scale_format`` says.

    ``tensor_amax``: the whole tensor's largest magnitude (``"e4m3"`` only; default the largest
    ``amax``).
    """
    return scales_by_rule(amax, max_value, get_scale_rule(scale_format), tensor_amax)


register_scale_format("float32", float32_scales)
register_scale_format("e8m0", e8m0_scales)
register_scale_format("e4m3", e4m3_scales)
