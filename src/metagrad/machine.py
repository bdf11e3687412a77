"""What a measurement depends on besides the code: the CPU model, and a machine fingerprint."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

__all__ = ["cpu_model", "fingerprint"]


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
