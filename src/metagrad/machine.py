"""What a measurement depends on besides the code: the CPU model, a machine fingerprint, and how
the process's memory allocator treats freed memory (:func:`retain_freed_cpu_memory`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from pathlib import Path

import torch

__all__ = ["CPU_MEMORY_MODES", "cpu_model", "fingerprint", "retain_freed_cpu_memory"]


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows (read once)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: torch.device | None = None) -> str:
    """What a timing on ``device`` depends on: CPU model, torch build, CPU threads (and the GPU).

    Two processes with the same fingerprint may share measured choices.
    """
    text = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    if device is not None and device.type == "cuda":
        text += f" | {_gpu_name(device.index)}"
    return text


@functools.cache
def _gpu_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


CPU_MEMORY_MODES = ("retain", "release")
"""``--cpu-memory``: :func:`retain_freed_cpu_memory`, or the C library's default."""
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def retain_freed_cpu_memory() -> bool:
    """Keep the CPU memory this process frees for reuse; returns whether it could be set.

    glibc's malloc serves each allocation of 32 MiB or more with a fresh ``mmap`` and returns it
    at ``free``, so every large temporary of a training step (a float32 copy of an activation's
    gradient, say) is page-faulted in afresh, which can cost more than the arithmetic on it.
    Here malloc serves them from its heap and keeps freed memory (``mallopt``: no mmap'd
    blocks, no trimming), for the rest of the process: its resident memory stays at its peak.
    Elsewhere than glibc (macOS, musl, Windows) nothing changes and the result is False. The
    numbers computed are the same either way.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
