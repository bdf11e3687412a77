"""A tensor's dims in the order its memory runs, and its elements as one 1-D view."""

from __future__ import annotations

from torch import Tensor


def memory_order(t: Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory (ties in logical order)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def flat_view(t: Tensor) -> Tensor:
    """All elements of ``t`` in memory order as a 1-D tensor: a view when ``t`` is dense in any
    dim order (a plain ``reshape`` of a channels-last tensor would copy it)."""
    return t.permute(memory_order(t)).reshape(-1)
