"""The error every dataset reader raises, and the pieces of its one-line messages."""

from __future__ import annotations

import re

import numpy as np
from torch import Tensor

__all__ = ["DatasetError", "dataset_error", "describe", "format_size"]


class DatasetError(ValueError):
    """A dataset could not be read; the message is one line naming the path and the expectation."""


def dataset_error(where: object, message: str) -> DatasetError:
    """A DatasetError whose message is ``"<where>: <message>"`` on a single line."""
    return DatasetError(re.sub(r"\s*\n\s*", " ", f"{where}: {message}"))


def format_size(n: int) -> str:
    """``n`` bytes in binary units: ``"4 MiB"``, ``"1.5 GiB"``, ``"812 bytes"``."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.3g} {unit}"


def describe(value: Tensor | np.ndarray | object) -> str:
    """An array as ``"<dtype> of shape (...)"``, anything else as its type's name."""
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__
