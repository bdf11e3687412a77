"""Integer matrix products: ``torch._int_mm``, its size rules, and the CPU workspace.

``int_mm`` is the one place a product runs. Operands are built as zero-padded int8 matrices
(``_matrix``) that already meet ``_int_mm``'s size rules, so nothing is copied for them.

On CPU, temporaries (patch matrices, int32 results, error codes) live in a per-thread workspace
reused across calls, which avoids page-faulting fresh buffers of tens of MB at every layer;
:func:`clear_workspace` frees it.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1
_MIN_ROWS = 17  # torch._int_mm on CUDA: the first operand needs more than 16 rows
_ALIGN = 8  # ... and its inner and output sizes must be multiples of 8
_CPU_CHUNK = 1 << 20  # elements per chunk of elementwise passes on CPU (cache-sized)


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_WORKSPACE = _Workspace()


def _cpu_eager(device: torch.device) -> bool:
    """Whether the CPU-only memory tricks apply: the workspace and cache-sized chunks.

    Not under ``torch.compile``, which plans memory and fuses passes itself: traced code takes
    the plain route other devices take (the same numbers).
    """
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _scratch(name: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A flat temporary of ``numel`` elements; on CPU a reused per-thread buffer named ``name``.

    Only for temporaries that die within one call (never returned or saved for backward).
    """
    if not _cpu_eager(device):
        return torch.empty(numel, dtype=dtype, device=device)
    key = (name, dtype)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype)
        _WORKSPACE.buffers[key] = buf
    return buf[:numel]


def clear_workspace() -> None:
    """Free this thread's CPU workspace (it regrows on the next integer product)."""
    _WORKSPACE.buffers.clear()


def _round_up(n: int, m: int = _ALIGN) -> int:
    return -(-n // m) * m


def _padded(n: int) -> int:
    """A size valid both as the first operand's rows and as an inner or output size."""
    return _round_up(max(n, _MIN_ROWS))


def _matrix(rows: int, cols: int, rows_used: int, cols_used: int, *, device, name=None) -> Tensor:
    """An int8 ``rows×cols`` matrix whose part outside ``[:rows_used, :cols_used]`` is zero."""
    flat = (
        _scratch(name, rows * cols, device, torch.int8)
        if name
        else torch.empty(rows * cols, dtype=torch.int8, device=device)
    )
    mat = flat.view(rows, cols)
    if cols_used < cols:
        mat[:, cols_used:].zero_()
    if rows_used < rows:
        mat[rows_used:].zero_()
    return mat


def _pad_operand(t: Tensor, rows: int, cols: int) -> Tensor:
    if tuple(t.shape) == (rows, cols):
        return t
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def int_mm(
    a: Tensor, b: Tensor, *, a_max: int = 127, b_max: int = 127, out_name: str | None = None
) -> Tensor:
    """Exact ``a @ b`` of int8 matrices through ``torch._int_mm``.

    Zero-pads to ``_int_mm``'s size rules on every device (``a`` more than 16 rows; inner size
    and ``b``'s columns multiples of 8): operands built by this module are already padded, so
    nothing is copied for them. With ``|a| <= a_max`` and ``|b| <= b_max``, a contraction long
    enough to overflow int32 is split and the parts are summed in int64. Returns the
    ``a.shape[0] × b.shape[1]`` result (int32, or int64 after a split); ``out_name`` puts it in
    the workspace (then it must be consumed before the next call with that name).
    """
    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(m, _MIN_ROWS), _round_up(max(k, 1)), _round_up(max(n, 1))
    a, b = _pad_operand(a, mp, kp), _pad_operand(b, kp, np_)
    step = max(_ALIGN, (_INT32_MAX // max(a_max * b_max, 1)) // _ALIGN * _ALIGN)
    if kp <= step:
        if out_name is None:
            res = torch._int_mm(a, b)
        else:
            res = _scratch(out_name, mp * np_, a.device, torch.int32).view(mp, np_)
            torch._int_mm(a, b, out=res)
    else:
        res = torch.zeros(mp, np_, dtype=torch.int64, device=a.device)
        for k0 in range(0, kp, step):
            res += torch._int_mm(a[:, k0 : k0 + step], b[k0 : k0 + step])
    return res[:m, :n]


def _weight_columns(codes: Tensor, width: int, cols_used: int, name: str) -> Tensor:
    """``codes`` (C×K, any strides) in a zero-padded ``round_up(C) × width`` int8 buffer.

    Its transpose is the column-major second operand of ``int_mm`` (K-major, as BLAS likes).
    """
    c = codes.shape[0]
    mat = _matrix(_round_up(c), width, c, cols_used, device=codes.device, name=name)
    mat[:c, :cols_used].copy_(codes)
    return mat
