"""Random integers drawn so that ``torch.compile`` keeps each draw where eager code makes it.

AOT autograd's partitioner cuts a traced training step into a forward and a backward graph and
copies a node without tensor inputs, such as ``torch.randint(low, high, size)``, into each graph
that needs it, as it would a constant: a draw used on both sides of the cut becomes two draws
with different numbers. That happens to a transform's signs shared by the error and a saved
activation when the partitioner moves the activation's quantization into the forward graph.
(``torch.randint_like`` has a tensor input, but AOT's common-subexpression pass merges two such
draws with the same arguments into one.)

:func:`draw_integers` makes each traced draw a function of a tensor's value, by a data
dependence that changes nothing: a draw made from the error, and all that uses it, stays in the
backward graph. Eager code draws as ``torch.randint`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def draw_integers(
    like: Tensor,
    low: int,
    high: int,
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.int64,
) -> Tensor:
    """``torch.randint(low, high, (n,))`` on ``like``'s device, the same numbers from the same
    generator; traced by ``torch.compile``, depending on one element of ``like`` (its value is
    not used)."""
    drawn = torch.randint(low, high, (n,), generator=generator, dtype=dtype, device=like.device)
    if like.numel() == 0 or not torch.compiler.is_compiling():  # eager code: no partitioner
        return drawn
    one = like.detach()[(0,) * like.dim()]  # a view: no copy
    never = (one != one) & (one == one)  # False for every value, NaN included
    return drawn + never.to(dtype)
