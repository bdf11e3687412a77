"""What a run's summary records besides its results: provenance, memory, communication and the
hypernetwork."""

from __future__ import annotations

import platform
import resource
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metagrad._version import __version__
from metagrad.machine import cpu_model
from metagrad.parallel.distributed import Distributed
from metagrad.training.config import TrainConfig

if TYPE_CHECKING:
    from metagrad.parallel.comm import QuantizedHookState

__all__ = [
    "communication_summary",
    "cpu_model",
    "hypernet_summary",
    "peak_memory_mb",
    "provenance",
]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def provenance(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides its settings: code version, torch, device, threads."""
    return {
        "commit": _git_commit(),
        "metagrad": _package_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        ),
        "threads": torch.get_num_threads(),
    }


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from (``+dirty`` if the package's files
    are modified), or None."""
    here = _PACKAGE_DIR
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _package_version() -> str:
    return __version__


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA's allocator peak, or the process's peak resident set on CPU.

    On Linux the peak is ``VmHWM`` of ``/proc/self/status``: unlike ``getrusage``'s maxrss, it
    does not inherit the peak of the parent process that started this one.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process_max_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def communication_summary(
    dist: Distributed | None,
    comm_bits: int,
    model: nn.Module,
    comm_state: QuantizedHookState | None,
    steps: int,
    sharded: bool = False,
) -> dict[str, Any] | None:
    """Bytes each rank sent per step for the model's gradients (torchrun runs), else None.

    Counted by the quantized hook (``comm_state``); otherwise the ring all-reduce's cost model
    (32 and 16 bits) or the quantized payload of one all-reduce of every gradient (MetaGrad).
    ``sharded`` (FSDP2): the ring model of an all-gather of the parameters in the forward and
    again in the backward, and a reduce-scatter of the gradients, each half an all-reduce.
    """
    if not dist:
        return None
    from metagrad.parallel.comm import payload_bytes, ring_all_reduce_bytes

    world_size = dist.world_size
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if comm_state is not None and comm_state.calls:
        per_step, how = comm_state.bytes_sent / max(1, steps), "counted"
    elif sharded:
        per_step, how = 1.5 * ring_all_reduce_bytes(numel, 4, world_size), "fsdp ring model"
    elif comm_bits in (32, 16):
        per_step, how = ring_all_reduce_bytes(numel, comm_bits // 8, world_size), "ring model"
    else:
        per_step, how = payload_bytes(numel, comm_bits, world_size), "payload"
    return {
        "world_size": dist.world_size,
        "shard": "fsdp" if sharded else "ddp",
        "comm_bits": comm_bits,
        "bytes_per_step": per_step,
        "bytes_how": how,
    }


def hypernet_summary(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The hypernetwork's settings and size (MetaGrad runs), else None."""
    hypernet = getattr(optimizer, "hypernet", None)
    if hypernet is None:
        return None
    return {
        "kind": cfg.hyper,
        "form": cfg.hyper_form,
        "hidden": cfg.hyper_hidden,
        "lr": cfg.hyper_lr,
        "horizon": cfg.hyper_horizon,
        "parameters": sum(p.numel() for p in hypernet.parameters()),
    }


def gradient_record(cfg: TrainConfig) -> dict[str, Any]:
    """What a run's backward pass quantizes, read from its resolved configuration: the method,
    the preset (None for specs given directly), each backward operand's spec in the spec syntax
    (``"fp32"``: full precision) and a ``label`` that names the run's gradients in tables."""
    error_dx, error_dw, weight_dx, input_dw = cfg.quant_config().backward_specs
    record = {
        "method": cfg.method,
        "preset": cfg.grad_quant,
        "recipe": cfg.recipe,
        "grad_spec": str(error_dx),
        "grad_spec_wgrad": str(error_dw),
        "weight_spec_dgrad": str(weight_dx),
        "input_spec_wgrad": str(input_dw),
    }
    label = cfg.grad_quant or str(error_dx)
    if cfg.recipe:  # the paper's whole recipe, as the methods benchmark names it
        label = f"recipe+{label}"
    if cfg.grad_quant is None and error_dw != error_dx:
        label += f", wgrad {error_dw}"
    for name, spec in (("weight", weight_dx), ("input", input_dw)):
        if spec.enabled and not cfg.recipe:
            label += f", {name} {spec}"
    record["label"] = f"metagrad+{label}" if cfg.method == "metagrad" else label
    return record
