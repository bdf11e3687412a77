"""Shared scales: from a group's largest magnitude to the factor its values are divided by.

A group's scale maps its largest magnitude ``amax`` onto the format's largest value,
``amax / max_value``; a scale format (a registered :data:`ScaleRule` per scale rounding) says how
that scale is stored. Built in:

- ``"float32"``: as computed (rounding ``"up"`` only: there is nothing to round);
- ``"e8m0"``: a power of two in ``[2**-127, 2**127]`` (the MX formats' shared exponent).
  ``"up"``: the smallest power of two ``>= amax / max_value``, so no element clips (stochastic
  rounding stays unbiased); ``"floor"``: the OCP MX v1.0 rule, ``2**(floor(log2 amax) - emax)``
  with ``emax`` the exponent of the element format's largest binade (2 for FP4 E2M1, 8 for FP8
  E4M3, 15 for FP8 E5M2), where elements past the format's largest value saturate;
- ``"e4m3"``: two levels (NVFP4): one float32 scale per tensor, ``amax_tensor / (max_value *
  448)``, times an FP8 E4M3 scale per group, the group's ``amax / max_value`` divided by the
  tensor scale. ``"up"``: rounded up onto the E4M3 grid (nothing clips); ``"nearest"``: NVIDIA's
  NVFP4 rule, rounded to the nearest E4M3 value (ties to even, at most 448), elements saturating;
  a group whose E4M3 scale rounds to 0 quantizes to zeros.

No scale is below float32's smallest normal number (float64's for float64 input), so that no
division by a scale overflows; an all-zero group gets the scale 1 (its values are zeros); a group
holding NaN or inf gets NaN, so divergence stays visible downstream. A new scale format (or a new
rounding of one) is one function and one :func:`register_scale_format` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from metagrad.quant.formats import NAME_HELP, NAME_PATTERN, FloatFormat
from metagrad.registry import Registry

E4M3 = FloatFormat(4, 3, "fn")
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127

SCALE_ROUNDINGS: tuple[str, ...] = ("up", "floor", "nearest")
"""How a scale is rounded onto its scale format: up (nothing clips), down to a power of two
(OCP MX), to nearest (NVIDIA's NVFP4)."""
DEFAULT_SCALE_ROUNDING = "up"

ScaleRule = Callable[[Tensor, Tensor, float, Tensor | None], Tensor]
"""``rule(scale, amax, max_value, tensor_amax) -> stored scale``.

``scale``: ``amax / max_value`` per group, at least the dtype's smallest normal number (zero and
non-finite groups are computed with ``amax`` 1 and fixed afterwards); ``amax``: the groups'
largest magnitudes as given; ``tensor_amax``: the whole tensor's largest magnitude
where the caller knows it (None: take the largest ``amax``). A rule that returns less than
``scale`` clips its group's largest values (they saturate); one that returns 0 makes its group
zeros.
"""

_SCALE_RULES: Registry[Mapping[str, ScaleRule]] = Registry(
    "scale format", pattern=NAME_PATTERN, pattern_help=NAME_HELP
)


def register_scale_format(name: str, rule: ScaleRule, rounding: str = "up") -> ScaleRule:
    """Make ``rule`` available as ``QuantSpec(scale_format=name, scale_rounding=rounding)``."""
    if rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale rounding must be one of {SCALE_ROUNDINGS}, got {rounding!r}")
    if name not in _SCALE_RULES:
        _SCALE_RULES.add(name, {rounding: rule})  # checks the name
        return rule
    if rounding in _SCALE_RULES[name]:
        raise ValueError(f"scale format {name!r} rounding {rounding!r} is already registered")
    _SCALE_RULES[name] = {**_SCALE_RULES[name], rounding: rule}  # a copy: copied registries
    return rule


def get_scale_rule(name: str, rounding: str = DEFAULT_SCALE_ROUNDING) -> ScaleRule:
    """The registered scale format ``name`` with scale rounding ``rounding``."""
    if rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale rounding must be one of {SCALE_ROUNDINGS}, got {rounding!r}")
    rules = _SCALE_RULES.lookup(name)
    if rounding not in rules:
        raise ValueError(
            f"scale format {name!r} has no scale rounding {rounding!r}; it has: {', '.join(rules)}"
        )
    return rules[rounding]


def list_scale_formats() -> list[str]:
    """Names of the registered scale formats, in registration order."""
    return list(_SCALE_RULES)


def list_scale_roundings(name: str) -> list[str]:
    """The scale roundings registered for the scale format ``name``."""
    return list(_SCALE_RULES.lookup(name))


def element_emax(max_value: float) -> int:
    """Exponent of an element format's largest binade: ``floor(log2(max_value))`` (OCP MX's
    ``emax_elem``: 2 for FP4 E2M1, 8 for FP8 E4M3, 15 for FP8 E5M2, 6 for INT8's 127)."""
    return math.frexp(max_value)[1] - 1


_FLOAT_BITS = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}
"""A float dtype's integer twin, mantissa bits and exponent bias: its exponent read from its
bits, which compiled kernels vectorize (``frexp`` and ``ldexp`` they run element by element)."""


def _power_of_two(k: Tensor, dtype: torch.dtype) -> Tensor:
    """``2**k`` as ``dtype`` for integer ``k`` (its bits' dtype) in E8M0's range, from its bits."""
    _, mantissa_bits, bias = _FLOAT_BITS[dtype]
    bits = (k + bias) << mantissa_bits
    if 1 - bias > E8M0_MIN_EXPONENT:  # 2**-127 is subnormal in float32: one mantissa bit
        bits = torch.where(k >= 1 - bias, bits, torch.full_like(bits, 1 << (mantissa_bits - 1)))
    return bits.view(dtype)


def ceil_to_power_of_two(s: Tensor) -> Tensor:
    """The smallest power of two ``>= s`` (positive finite ``s``), within E8M0's range."""
    layout = _FLOAT_BITS.get(s.dtype)
    if layout is None:
        mantissa, exponent = torch.frexp(s)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
        exponent = exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
        return torch.ldexp(torch.ones_like(s), exponent)
    int_dtype, mantissa_bits, bias = layout
    bits = s.view(int_dtype)
    field = bits >> mantissa_bits
    exponent = field - bias + ((bits & ((1 << mantissa_bits) - 1)) != 0).to(int_dtype)
    if 1 - bias > E8M0_MIN_EXPONENT:  # subnormal s: 2**-127 up to it, else 2**-126
        below = torch.where(bits > 1 << (mantissa_bits - 1), 1 - bias, -bias).to(int_dtype)
        exponent = torch.where(field == 0, below, exponent)
    exponent = exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return _power_of_two(exponent, s.dtype)


def floor_power_of_two_scale(amax: Tensor, emax: int) -> Tensor:
    """OCP MX's shared scale ``2**(floor(log2(amax)) - emax)`` (positive finite ``amax``),
    within E8M0's range; exact for every float, subnormals included."""
    layout = _FLOAT_BITS.get(amax.dtype)
    if layout is None or emax < 0:
        _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1)
        exponent = (exponent - 1 - emax).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
        return torch.ldexp(torch.ones_like(amax), exponent)
    int_dtype, mantissa_bits, bias = layout
    # floor(log2 amax) of a normal amax; a subnormal one reads -bias, below E8M0's range too
    binade = (amax.view(int_dtype) >> mantissa_bits) - bias
    exponent = (binade - emax).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return _power_of_two(exponent, amax.dtype)


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
    """``"e8m0"``, ``"up"``: powers of two, rounded up."""
    return ceil_to_power_of_two(scale)


def e8m0_floor_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"e8m0"``, ``"floor"``: OCP MX v1.0's ``2**(floor(log2 amax) - emax_elem)``."""
    safe = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.ones_like(amax))
    return floor_power_of_two_scale(safe, element_emax(max_value))


def tensor_scale(amax: Tensor, max_value: float, tensor_amax: Tensor | None) -> Tensor:
    """NVFP4's float32 per-tensor scale ``amax_tensor / (max_value * 448)`` (at least the
    smallest normal number; 1 for a zero or non-finite tensor)."""
    top = amax.amax() if tensor_amax is None else tensor_amax
    top = torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))
    return (top / (max_value * E4M3.max_value)).clamp_min(torch.finfo(top.dtype).tiny)


def e4m3_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"e4m3"``, ``"up"``: E4M3 values, rounded up, under one float32 scale per tensor."""
    outer = tensor_scale(amax, max_value, tensor_amax)
    return ceil_to_format(scale / outer, E4M3) * outer


def e4m3_nearest_scales(
    scale: Tensor, amax: Tensor, max_value: float, tensor_amax: Tensor | None
) -> Tensor:
    """``"e4m3"``, ``"nearest"``: NVIDIA's NVFP4 rule, E4M3 values rounded to nearest (at most
    448; 0 makes the group zeros) under one float32 scale per tensor."""
    outer = tensor_scale(amax, max_value, tensor_amax)
    return E4M3.round(scale / outer, None) * outer


def scales_by_rule(
    amax: Tensor, max_value: float, rule: ScaleRule, tensor_amax: Tensor | None = None
) -> Tensor:
    """Scales of groups with largest magnitudes ``amax`` (float32+), stored as ``rule`` says."""
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    scale = (safe / max_value).clamp_min_(torch.finfo(safe.dtype).tiny)
    scale = rule(scale, amax, max_value, tensor_amax)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))


def group_scales(
    amax: Tensor,
    max_value: float,
    scale_format: str,
    tensor_amax: Tensor | None = None,
    rounding: str = DEFAULT_SCALE_ROUNDING,
) -> Tensor:
    """Scales of groups with largest magnitudes ``amax`` (float32+), as ``scale_format`` and
    the scale ``rounding`` say.

    ``tensor_amax``: the whole tensor's largest magnitude (``"e4m3"`` only; default the largest
    ``amax``).
    """
    rule = get_scale_rule(scale_format, rounding)
    return scales_by_rule(amax, max_value, rule, tensor_amax)


register_scale_format("float32", float32_scales)
register_scale_format("e8m0", e8m0_scales)
register_scale_format("e8m0", e8m0_floor_scales, "floor")
register_scale_format("e4m3", e4m3_scales)
register_scale_format("e4m3", e4m3_nearest_scales, "nearest")
