"""How many weight elements the hypernetwork processes at once (``MetaGrad(chunk_size="auto")``).

On CUDA the hypernetwork runs unchunked when the activations of the largest meta weight fit in
:data:`ACTIVATION_MEMORY_SHARE` of the free memory, else in chunks that do; on CPU in chunks of
:data:`CPU_CHUNK_SIZE` elements. Chunked and unchunked results are equal
(:func:`metagrad.meta.hyper.apply_chunked`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CPU_CHUNK_SIZE = 1 << 17
"""Weight elements per hypernetwork chunk on CPU under ``chunk_size="auto"``: a chunk's
activations stay in cache, which is faster there than one pass over a whole layer."""
ACTIVATION_MEMORY_SHARE = 0.25
"""Share of the device's free memory the hypernetwork's activations may take before
``chunk_size="auto"`` chunks them (CUDA)."""
DEFAULT_WIDTH = 8
"""Hidden width assumed for a hypernetwork without linear layers or a ``hidden`` attribute."""


def check_chunk_size(chunk_size: object) -> None:
    """Refuse a ``chunk_size`` that is not an integer >= 1, None or ``"auto"``."""
    if chunk_size not in (None, "auto") and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an integer >= 1, None or 'auto', got {chunk_size!r}")


def auto_chunk_size(meta: list[Tensor], hypernet: nn.Module | None) -> int | None:
    """``chunk_size="auto"`` for these meta weights and hypernetwork (see the module docs)."""
    if not meta or meta[0].device.type == "cpu":
        return CPU_CHUNK_SIZE
    device = meta[0].device
    if device.type != "cuda":
        return None
    hidden = getattr(hypernet, "hidden", None) or _widest_layer(hypernet)
    per_element = 4 * 4 * max(hidden, 1)  # pre-activation, activation, mask and grad, float32
    budget = torch.cuda.mem_get_info(device)[0] * ACTIVATION_MEMORY_SHARE
    largest = max(p.numel() for p in meta)
    if largest * per_element <= budget:
        return None
    return max(1, int(budget // per_element))


def _widest_layer(module: nn.Module | None) -> int:
    widths = (
        [m.out_features for m in module.modules() if isinstance(m, nn.Linear)] if module else []
    )
    return max(widths, default=DEFAULT_WIDTH)
