"""Number formats that quantized values are rounded to, and their registry.

A format is a small value object that knows its largest magnitude and how to round a tensor,
already divided by its scale, onto its grid: to nearest (ties to even) or stochastically
(unbiased: up with probability equal to the distance from the grid point below, in units of the
local grid step, to the resolution of the dither: :data:`DITHER_BITS` random bits per element, or
16). Two families are built in:

- :class:`IntFormat`: symmetric integers of ``bits`` bits, from ``-(2**(bits-1) - 1)`` to
  ``2**(bits-1) - 1``;
- :class:`FloatFormat`: sign, ``exponent`` and ``mantissa`` bits, IEEE-style bias and subnormals,
  with the top of the range as the format defines it (``"ieee"`` reserves the top exponent for
  inf/NaN, ``"fn"`` only the all-ones pattern, as FP8 E4M3FN; ``"none"`` reserves nothing).
  Rounding never overflows: values past the largest magnitude saturate to it.

Named formats: ``int2`` ... ``int8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1`` (the element type of
MXFP4 and NVFP4) and ``log4`` (1 sign and 3 exponent bits, no mantissa: zero and seven powers of
two, the format of LUQ). A new format is one class with ``max_value`` and ``round`` and one
:func:`register_format` call; see docs/extending.md for a worked example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from metagrad.registry import Registry

DITHER_BITS = 8
"""Random bits per element of stochastic rounding by default: one byte (fast, and unbiased to
1/512 of a step)."""
DITHER_BITS_CHOICES: tuple[int, ...] = (8, 16)
"""Dither resolutions: one random byte (``uint8`` dither) or two (held in ``int32``)."""
DITHER_LEVELS = 2**DITHER_BITS
_DITHER_DTYPES = {8: torch.uint8, 16: torch.int32}
"""A 16-bit draw is held in an ``int32`` (as ``k - 2**15``): compiled CPU kernels vectorise
``int32`` loads and not ``int16`` ones, which made a 16-bit-dither quantizer several times slower
than an 8-bit one."""

Specials = Literal["ieee", "fn", "none"]

# (integer view, mantissa bits, exponent bias) of the dtypes values are rounded in
_BIT_LAYOUT: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 23, 127),
    torch.float64: (torch.int64, 52, 1023),
}


@runtime_checkable
class NumberFormat(Protocol):
    """What the quantizer needs from a format."""

    @property
    def max_value(self) -> float:
        """The largest finite magnitude."""
        ...

    def round(self, y: Tensor, dither: Tensor | None) -> Tensor:
        """``y`` (float32+, already scaled) rounded onto the grid, in ``y``'s dtype.

        ``dither``: random integers shaped like ``y`` for stochastic rounding (``uint8``: 8
        bits, ``int32`` or ``int16``: 16 bits; :func:`add_dither` adds them), None for nearest.
        """
        ...


def dither_dtype(bits: int) -> torch.dtype:
    """The dtype of a dither of ``bits`` random bits per element (:data:`DITHER_BITS_CHOICES`)."""
    if bits not in _DITHER_DTYPES:
        raise ValueError(f"dither_bits must be one of {DITHER_BITS_CHOICES}, got {bits!r}")
    return _DITHER_DTYPES[bits]


def add_dither(units: Tensor, dither: Tensor, *, inplace: bool = False) -> Tensor:
    """``units + (k + 0.5) / 2**bits``, ``k`` the dither's value in ``[0, 2**bits)``.

    ``floor`` of it is stochastic rounding: up with probability ``f`` (the fraction of
    ``units``) to within ``2**-(bits+1)``. A ``uint8`` dither holds ``k``; a 16-bit one
    (``int32`` or ``int16``) holds ``k - 2**15``. Exact in float32 for ``|units| < 2**(23 - bits)``.
    """
    if dither.dtype == torch.uint8:
        offset, levels = 0.5, 256
    else:  # 16 bits: k - 32768
        offset, levels = 32768.5, 65536
    units = units.add_(offset / levels) if inplace else units.add(offset / levels)
    return units.add_(dither, alpha=1 / levels)


def _round(units: Tensor, dither: Tensor | None) -> Tensor:
    """To nearest (ties to even), or ``floor(units + (k + 0.5) / 2**bits)`` (stochastic)."""
    if dither is None:
        return torch.round(units)
    return add_dither(units, dither).floor_()


@dataclass(frozen=True)
class IntFormat:
    """Symmetric integers of ``bits`` bits (2 to 8)."""

    bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntFormat bits must be an integer in 2..8, got {self.bits!r}")

    @property
    def max_value(self) -> float:
        return float(2 ** (self.bits - 1) - 1)

    def round(self, y: Tensor, dither: Tensor | None) -> Tensor:
        return _round(y, dither).clamp_(-self.max_value, self.max_value)

    def __str__(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign, ``exponent`` and ``mantissa`` bits.

    The bias is ``2**(exponent-1) - 1`` and subnormals are kept (with no mantissa bits the
    subnormal range holds zero only, so values below the smallest normal round to zero or to
    it: stochastic underflow under stochastic rounding).
    """

    exponent: int
    mantissa: int
    specials: Specials = "none"
    _max_value: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("exponent", "mantissa"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"FloatFormat {name} must be a non-negative integer, got {v!r}")
        if not 1 <= self.exponent <= 8 or self.mantissa > 10:
            raise ValueError(
                "FloatFormat needs 1..8 exponent bits and at most 10 mantissa bits, got "
                f"e{self.exponent}m{self.mantissa}"
            )
        if self.specials not in ("ieee", "fn", "none"):
            raise ValueError(f"specials must be 'ieee', 'fn' or 'none', got {self.specials!r}")
        if self.specials == "fn" and self.mantissa == 0:
            raise ValueError("specials 'fn' needs mantissa bits (its NaN takes the top mantissa)")
        # a plain float, computed once: compiled kernels read it as a constant
        object.__setattr__(self, "_max_value", self._largest())

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        top = 2**self.exponent - 1
        return (top - 1 if self.specials == "ieee" else top) - self.bias

    @property
    def max_value(self) -> float:
        if torch.compiler.is_compiling():
            # traced from the int fields: under torch.compile(dynamic=True) a float attribute
            # is a symbolic input, which the backward of an autograd.Function cannot capture
            return self._largest()
        return self._max_value

    def _largest(self) -> float:
        """The largest finite magnitude (exact: a power of two times a short fraction)."""
        steps = 2**self.mantissa - (2 if self.specials == "fn" else 1)
        return (1 + steps / 2**self.mantissa) * 2.0**self.max_exponent

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    def round(self, y: Tensor, dither: Tensor | None) -> Tensor:
        a = y.abs()
        layout = _BIT_LAYOUT.get(a.dtype)
        if layout is None or self.min_exponent - self.mantissa + layout[2] < 1:
            return self._round_frexp(y, a, dither)
        int_dtype, mantissa_bits, bias = layout
        # the binade of a is 2**(binade - bias); subnormals share the smallest normal binade and
        # values past the top one saturate below
        binade = (a.view(int_dtype) >> mantissa_bits).clamp_(
            self.min_exponent + bias, self.max_exponent + bias
        )
        binade -= self.mantissa  # the grid step's exponent binade: step = 2**(e - mantissa)
        step = (binade << mantissa_bits).view(a.dtype)
        inverse = ((2 * bias - binade) << mantissa_bits).view(a.dtype)  # exactly 1 / step
        units = _round(a * inverse, dither)
        return (units * step).clamp_(max=self.max_value).copysign_(y)

    def _round_frexp(self, y: Tensor, a: Tensor, dither: Tensor | None) -> Tensor:
        """:meth:`round` through ``frexp``/``ldexp`` (any float dtype and exponent range)."""
        _, e = torch.frexp(a)
        e = torch.clamp(e - 1, min=self.min_exponent, max=self.max_exponent)
        step = torch.ldexp(torch.ones_like(a), e - self.mantissa)
        units = _round(a / step, dither)
        return (units * step).clamp_(max=self.max_value).copysign_(y)

    def __str__(self) -> str:
        return f"fp_e{self.exponent}m{self.mantissa}"


NAME_CHARS = "A-Za-z0-9_.+-"
"""Characters of the names written in spec strings (formats, scale formats, transforms)."""
NAME_PATTERN = rf"[A-Za-z][{NAME_CHARS}]*"
NAME_HELP = "a letter, then letters, digits or any of _.+-"
FULL_PRECISION_NAMES = ("fp32", "off")
"""What a spec string says for "leave in full precision" (never format names)."""

_FORMATS: Registry[NumberFormat] = Registry(
    "number format", pattern=NAME_PATTERN, pattern_help=NAME_HELP, reserved=FULL_PRECISION_NAMES
)


def register_format(name: str, fmt: NumberFormat) -> NumberFormat:
    """Make ``fmt`` available by ``name`` (in :class:`~metagrad.quant.QuantSpec` and the CLI)."""
    if not isinstance(fmt, NumberFormat):
        raise TypeError(f"format {name!r} must have max_value and round(y, dither)")
    return _FORMATS.add(name, fmt)


def get_format(name: str) -> NumberFormat:
    """The registered format ``name``."""
    return _FORMATS.lookup(name)


def list_formats() -> list[str]:
    """Names of the registered formats."""
    return list(_FORMATS)


for _bits in range(2, 9):
    register_format(f"int{_bits}", IntFormat(_bits))
register_format("fp8_e4m3", FloatFormat(4, 3, "fn"))
register_format("fp8_e5m2", FloatFormat(5, 2, "ieee"))
register_format("fp4_e2m1", FloatFormat(2, 1))
register_format("log4", FloatFormat(3, 0))
