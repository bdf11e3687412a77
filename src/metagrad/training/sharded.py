"""``--shard fsdp``: the trained model sharded with FSDP2, and its checkpoint in shards.

Under ``torchrun`` :func:`shard_for_training` shards the converted model over every rank
(:func:`metagrad.parallel.fsdp.shard_model`), starting from rank 0's weights and buffers as
DDP does; one process trains the model unsharded, with the same checkpoints.

The model and optimizer state go through ``torch.distributed.checkpoint`` (DCP): every rank
writes its shards into ``OUT/shards-stepNNNNNN/`` (:func:`save_shards`), then rank 0 writes
``checkpoint.pt`` (the rest of the run: settings, position, history, every rank's random state,
schedule), which names that directory with the SHA-256 of each of its files; older shard
directories are removed only then (:func:`remove_old_shards`). A run killed at any moment thus
resumes from the last complete pair. DCP reshards on load (:func:`load_shards`), so a run
resumes with any number of processes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metagrad import kernels
from metagrad.checkpoint import CheckpointError
from metagrad.parallel import distributed

# torch.distributed.checkpoint and FSDP are imported where used: they take a while to import,
# which every ``metagrad train`` would pay.

__all__ = [
    "SHARDS_NAME",
    "all_finite_shards",
    "load_shards",
    "local_tensors",
    "on_every_rank",
    "read_shards",
    "remove_old_shards",
    "save_shards",
    "shard_for_training",
    "shards_name",
    "weights_state",
]

SHARDS_NAME = re.compile(r"shards-step\d{6,}")
"""The name of a checkpoint's shard directory in the run folder."""
PARTS = ("model", "optimizer")
"""What a shard directory may hold (``optimizer`` is absent before the optimizer has state)."""


def shards_name(step: int) -> str:
    """The shard directory of the checkpoint written at ``step``."""
    return f"shards-step{step:06d}"


def shard_for_training(model: nn.Module) -> None:
    """Shard ``model`` over the process group, from rank 0's weights and buffers.

    Convolution weights go back to the contiguous layout first (from ``channels_last``):
    FSDP2 shards contiguous parameters only.
    """
    from metagrad.parallel.fsdp import shard_model

    model.to(memory_format=torch.contiguous_format)
    distributed.broadcast_tensors_([*model.parameters(), *model.buffers()])
    shard_model(model)


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's part of each tensor: a DTensor's local shard, else the tensor itself."""
    module = sys.modules.get("torch.distributed.tensor")  # not imported: there is no DTensor
    if module is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, module.DTensor) else t for t in tensors]


def all_finite_shards(tensors: list[Tensor], device: torch.device, everywhere: bool) -> bool:
    """Whether every element of every tensor (of this rank's shard, for a DTensor) is finite;
    with ``everywhere``, on every rank (one all-reduce, the same answer on all)."""
    ok = bool(kernels.all_finite(local_tensors(tensors), device))
    return on_every_rank(ok, device) if everywhere else ok


def on_every_rank(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce; the same answer on all)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag[0])


def weights_state(model: nn.Module, optimizer: torch.optim.Optimizer, method: str) -> dict:
    """The model and optimizer state that DCP saves, and loads in place (DTensors: shards).

    Torch optimizers go through ``get_state_dict`` (state keyed by parameter name, so that DCP
    can reshard it); MetaGrad through its own ``state_dict()``. An optimizer without state yet
    (no step applied; SGD without momentum) is left out: ``get_state_dict`` would create its
    state by taking a step of its own.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if method == "metagrad":
        return {"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()}
    if not optimizer.state:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """Without the warning DCP gives every call of a single process (no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def save_shards(state: dict[str, Any], out: Path, step: int) -> dict[str, Any]:
    """Write ``state`` (:func:`weights_state`) as ``out/shards-stepNNNNNN`` on every rank.

    Returns what ``checkpoint.pt`` records of it: its name, its parts, and (rank 0) the SHA-256
    of each of its files. A directory of the same name (left by a killed run) is replaced.
    """
    import torch.distributed.checkpoint as dcp

    name = shards_name(step)
    folder = out / name
    if _is_main() and folder.exists():
        shutil.rmtree(folder)
    _barrier()
    try:
        with _one_process_quietly():
            dcp.save(state, checkpoint_id=folder)
    except Exception as err:  # DCP raises its CheckpointException on every rank
        raise CheckpointError(f"could not write {folder}: {_first_line(err)}") from err
    _barrier()
    sha256 = _file_hashes(folder) if _is_main() else {}
    return {"name": name, "parts": sorted(state), "sha256": sha256}


def _file_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of each file of ``folder``, by name."""
    hashes = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            hashes[path.name] = digest.hexdigest()
    return hashes


def remove_old_shards(out: Path, keep: str) -> None:
    """Remove every shard directory of ``out`` but ``keep`` (older ones, a killed run's)."""
    for entry in out.iterdir():
        if SHARDS_NAME.fullmatch(entry.name) and entry.name != keep and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _shards_problem(folder: Path, sha256: dict[str, str]) -> str | None:
    """What is wrong with the files of ``folder`` against their recorded SHA-256, or None."""
    if not folder.is_dir():
        return f"{folder} is missing (the checkpoint names it)"
    try:
        found = _file_hashes(folder)
    except OSError as err:
        return f"{folder}: unreadable ({err.strerror or type(err).__name__})"
    for name, digest in sha256.items():
        if name not in found:
            return f"{folder} lacks {name}"
        if found[name] != digest:
            return f"{folder / name}: damaged (its checksum does not match the checkpoint's)"
    return None


def load_shards(
    model: nn.Module, optimizer: torch.optim.Optimizer, method: str, out: Path, shards: dict
) -> None:
    """Load the shard directory that ``checkpoint.pt`` names (``shards``) into the model and
    the optimizer, resharded to this run's processes; rank 0 checks the files' SHA-256 first.

    Raises:
        CheckpointError: a missing, damaged or unreadable shard directory (on every rank).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    folder = out / shards["name"]
    problem = [_shards_problem(folder, shards["sha256"]) if _is_main() else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(problem[0])
    with_optimizer = "optimizer" in shards["parts"]
    if method == "metagrad":  # its own state_dict; a fresh one has no state to load into
        state = {"model": get_model_state_dict(model)}
    elif with_optimizer:  # get_state_dict creates the optimizer's state, which DCP then fills
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    else:
        state = {"model": get_model_state_dict(model)}
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=folder)
            if method == "metagrad" and with_optimizer:
                from metagrad.parallel.fsdp import load_optimizer_state

                load_optimizer_state(folder, optimizer)
    except Exception as err:  # DCP raises its CheckpointException on every rank
        raise CheckpointError(f"{folder}: damaged or incompatible ({_first_line(err)})") from err
    if method == "metagrad":
        set_model_state_dict(model, state["model"])
    elif with_optimizer:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    else:
        set_model_state_dict(model, state["model"])


def read_shards(folder: str | Path) -> dict[str, Any]:
    """The full (unsharded) state of a shard directory, read by one process: ``{"model": ...,
    "optimizer": ...}`` with plain tensors (to inspect or export a sharded run's weights)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        dcp_to_torch_save(Path(folder), path)
        return torch.load(path, weights_only=True)
