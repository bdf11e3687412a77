"""Multi-process training under ``torchrun``: process-group set-up and the collectives it needs.

``torchrun --nproc_per_node N -m metagrad train ...`` starts N processes that find each other
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
:func:`from_environment` joins them into one process group: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics, summaries and checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a run of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DEFAULT_TIMEOUT = 300.0
"""Seconds a collective waits for the other ranks before the run stops (``--dist-timeout``)."""
REPORT_SECONDS = 5.0
"""How long a rank whose collective failed waits for the others to report the failure too."""


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out; the message names the ranks that did not report."""


def from_environment(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Distributed | None:
    """Join the process group that ``torchrun`` describes (None for a single process).

    Uses gloo for CPU training and NCCL for CUDA; on CUDA each process takes the device of its
    ``LOCAL_RANK``. A collective that waits ``timeout`` seconds for another rank fails (see
    :func:`collective_failure`).
    """
    if not launched_by_torchrun():
        return None
    try:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise RuntimeError(
            f"WORLD_SIZE is set but the torchrun environment is incomplete ({err}); "
            "launch with torchrun --nproc_per_node N -m metagrad train ..."
        ) from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        limit = datetime.timedelta(seconds=timeout)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=limit)
    return Distributed(rank, world_size, local_rank, backend)


COLLECTIVE_FAILURES = (
    "Timed out",
    "timed out",
    "Application timeout",  # gloo, when a peer stops mid-broadcast ("... caused pair closure")
    "Connection closed by peer",
    "Connection reset",
    "NCCL",
)
"""Marks of a collective that timed out or lost a peer in the message of the ``RuntimeError``
a backend raises (older torch raises no ``DistError``)."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that timed out or lost a peer."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in COLLECTIVE_FAILURES)


def collective_failure(err: BaseException, place: Distributed, timeout: float) -> str:
    """One line on a failed collective: each rank reports the failure through ``torchrun``'s
    store, then waits :data:`REPORT_SECONDS` for the others; a rank that never reports is frozen
    (a stopped process, a hung device) or gone."""
    missing = _unreported_ranks(place)
    if missing is None:
        who = "the other ranks could not be asked which one is missing"
    elif missing:
        ranks = ", ".join(map(str, missing))
        who = f"rank{'s' if len(missing) > 1 else ''} {ranks} did not report: frozen or gone"
    else:
        who = "every rank reported it: " + (str(err).strip().splitlines() or ["?"])[0][-160:]
    return (
        f"rank {place.rank}: a collective failed or waited more than {timeout:g} s "
        f"(--dist-timeout); {who}. Stopping: resume from the last checkpoint with --resume"
    )


def _unreported_ranks(place: Distributed) -> list[int] | None:
    """The ranks that have not reported a failed collective (None: the store is unreachable)."""
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=REPORT_SECONDS),
        )
        prefix = f"metagrad/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/failed/"
        store.set(f"{prefix}{place.rank}", "1")
        keys = [f"{prefix}{r}" for r in range(place.world_size)]
        deadline = time.monotonic() + REPORT_SECONDS
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (KeyError, ValueError, RuntimeError):
        return None


def rank_seed(seed: int, rank: int) -> int:
    """A 64-bit seed mixing ``seed`` and ``rank``, so that ranks draw independent random numbers."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be non-negative, got {seed} and {rank}")
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def shutdown() -> None:
    """Leave the process group, if this process is in one.

    Drop your references to DDP models first: a DDP reducer that outlives its process group
    aborts the process at exit, so unreachable ones are collected here before the group goes.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``rank`` of ``n`` items split into ``world_size`` contiguous parts.

    The parts differ in size by at most one, the larger first (as ``torch.tensor_split``).
    """
    size, extra = divmod(n, world_size)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


def broadcast_tensors_(tensors: list[Tensor], src: int = 0, group=None) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s (one broadcast per dtype)."""
    for same_dtype in _by_dtype(tensors):
        flat = _flatten_dense_tensors([t.detach() for t in same_dtype])
        dist.broadcast(flat, src=_global_rank(src, group), group=group)
        with torch.no_grad():
            for t, value in zip(
                same_dtype, _unflatten_dense_tensors(flat, same_dtype), strict=True
            ):
                t.copy_(value)


def all_reduce_sum(values: Tensor, group=None) -> Tensor:
    """The sum over ranks of ``values`` (a new tensor, the same on every rank)."""
    total = values.clone()
    dist.all_reduce(total, group=group)
    return total


def all_gather_tensors(value: Tensor, group=None) -> list[Tensor]:
    """Every rank's ``value`` (same shape and dtype on all ranks), in rank order."""
    out = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, value.contiguous(), group=group)
    return out


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _global_rank(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
