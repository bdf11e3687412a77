"""The spec syntax: the option tokens of a spec string, read into settings and written back.

:class:`~metagrad.quant.spec.QuantSpec` documents the syntax; this module holds the vocabulary
(roundings, granularities, defaults) and the reading of one token, so that the spec class itself
stays a plain value.
"""

from __future__ import annotations

import re
from typing import Any

from metagrad.quant.formats import DITHER_BITS
from metagrad.quant.scaling import DEFAULT_SCALE_ROUNDING, SCALE_ROUNDINGS, list_scale_formats
from metagrad.quant.transforms import list_transforms

ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
INTEGER_GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "sample")
BLOCK_GRANULARITIES: tuple[str, ...] = ("block", "tile")
"""Granularities with ``block_size``: blocks along the contraction axis, or square tiles."""
GRANULARITIES: tuple[str, ...] = (*INTEGER_GRANULARITIES, *BLOCK_GRANULARITIES)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_TRANSFORM_BLOCK = 128
SEPARATOR = ":"
"""Between the tokens of a spec string."""
ROUNDING_SEPARATOR = "-"
"""Between a scale format and its scale rounding in a token: ``e8m0-floor``."""

ROLE = {
    "granularity": "granularity",
    "block_size": "granularity",
    "scale_format": "scale format",
    "scale_rounding": "scale format",
    "rounding": "rounding",
    "dither_bits": "dither",
    "prescale": "pre-scale",
    "transform": "transform",
    "transform_block": "transform",
}
"""The part of a spec each setting belongs to (a token gives one part)."""

_SIZED = re.compile(r"(?P<name>.*?)(?P<size>[0-9]+)")
_PRESCALE = re.compile(r"pre(?P<value>[0-9][0-9.eE+-]*)")


def option_tokens(spec: Any) -> list[str]:
    """The option tokens ``str(spec)`` writes after the number format (defaults left out)."""
    tokens = []
    if spec.granularity in BLOCK_GRANULARITIES:
        tokens.append(f"{spec.granularity}{spec.block_size}")
    elif spec.granularity != "tensor":
        tokens.append(spec.granularity)
    if spec.scale_rounding != DEFAULT_SCALE_ROUNDING:
        tokens.append(f"{spec.scale_format}{ROUNDING_SEPARATOR}{spec.scale_rounding}")
    elif spec.scale_format != "float32":
        tokens.append(spec.scale_format)
    if spec.rounding != "nearest":
        tokens.append(spec.rounding)
    if spec.dither_bits != DITHER_BITS:
        tokens.append(f"dither{spec.dither_bits}")
    if spec.prescale != 1:
        tokens.append(f"pre{spec.prescale!r}")
    if spec.transform is not None:
        tokens.append(f"{spec.transform}{spec.transform_block}")
    return tokens


def parse_option(text: str, token: str) -> dict[str, Any]:
    """The settings one option token of the spec ``text`` gives (see :class:`QuantSpec`)."""
    readings = _readings(token)
    if len(readings) == 1:
        return readings[0]
    if readings:
        roles = " and ".join(sorted({ROLE[next(iter(r))] for r in readings}))
        raise ValueError(f"spec {text!r}: option {token!r} is ambiguous (both {roles})")
    if not token:
        raise ValueError(f"spec {text!r}: empty option (two '{SEPARATOR}' in a row?)")
    raise ValueError(
        f"spec {text!r}: unknown option {token!r}; expected a granularity "
        f"({', '.join(INTEGER_GRANULARITIES)}, block<N>, tile<N>), a scale format "
        f"({', '.join(list_scale_formats())}) with an optional scale rounding "
        f"(-{', -'.join(SCALE_ROUNDINGS)}), a rounding ({', '.join(ROUNDINGS)}), dither<bits>, "
        f"pre<factor> or a transform ({', '.join(f'{t}<N>' for t in list_transforms())})"
    )


def _readings(token: str) -> list[dict[str, Any]]:
    """Every way ``token`` reads as settings (more than one: ambiguous)."""
    prescale = _PRESCALE.fullmatch(token)
    if prescale:
        try:
            return [{"prescale": float(prescale["value"])}]
        except ValueError:
            return []
    sized = _SIZED.fullmatch(token)
    name, size = (sized["name"], int(sized["size"])) if sized else (token, None)
    readings: list[dict[str, Any]] = []
    if token in ROUNDINGS:
        readings.append({"rounding": token})
    if token in INTEGER_GRANULARITIES:
        readings.append({"granularity": token})
    if name in BLOCK_GRANULARITIES:
        block = DEFAULT_BLOCK_SIZE if size is None else size
        readings.append({"granularity": name, "block_size": block})
    if name == "dither" and size is not None:
        readings.append({"dither_bits": size})
    if token in list_scale_formats():
        readings.append({"scale_format": token})
    base, separator, rounding = token.rpartition(ROUNDING_SEPARATOR)
    if separator and base in list_scale_formats() and rounding in SCALE_ROUNDINGS:
        readings.append({"scale_format": base, "scale_rounding": rounding})
    if name in list_transforms():
        block = DEFAULT_TRANSFORM_BLOCK if size is None else size
        readings.append({"transform": name, "transform_block": block})
    return readings
