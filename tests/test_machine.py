"""What the process does with freed CPU memory (``--cpu-memory``): glibc's malloc retains it for
reuse, or returns it to the system, as the page faults of refilling a freed block show."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metagrad.training.config import ConfigError, TrainConfig

REFILLS = """
import json, resource, sys, torch
from metagrad.machine import retain_freed_cpu_memory
applied = sys.argv[1] == "retain" and retain_freed_cpu_memory()
faults = []
for _ in range(4):  # 64 MiB of float32, above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _refills(mode: str) -> dict:
    """Page faults of four allocations of a 64 MiB block, each filled and freed, in a fresh
    process that retains freed memory or not."""
    out = subprocess.run(
        [sys.executable, "-c", REFILLS, mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def test_retained_memory_is_reused_without_page_faults():
    retained = _refills("retain")
    if not retained["applied"]:
        pytest.skip("the C library is not glibc: --cpu-memory changes nothing here")
    released = _refills("release")["faults"]
    assert min(released) >= 16  # every refill faults: at least once per 2 MiB huge page
    assert retained["faults"][-1] * 4 < min(released)  # a freed block is reused as it is


def test_a_cpu_memory_mode_is_checked():
    with pytest.raises(ConfigError, match="cpu_memory"):
        TrainConfig(cpu_memory="keep")
