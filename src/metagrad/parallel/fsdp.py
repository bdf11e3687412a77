"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

:func:`shard_model` shards a (converted) model the way transformer code usually does: each block
of the model's ``nn.ModuleList`` containers (or, for a model without one, each layer holding a
matrix or convolution weight) becomes its own FSDP unit, and the root holds the rest. Quantized
layers work unchanged under it: FSDP gathers the full weight before the layer's forward and
reduce-scatters its (quantized-backward) gradient afterwards. Convert before sharding
(``quantize_`` then ``shard_model``), so that the coverage report sees the plain modules.

:func:`shard_group` and :func:`is_sharded` tell other code (MetaGrad) whether a model's
parameters are sharded and over which process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import TensorStorageMetadata
from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

Units = Callable[[nn.Module], Iterable[nn.Module]]


def default_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of the model's ``nn.ModuleList`` containers, else its weight-holding layers.

    Nested lists keep only their outermost blocks (a block is sharded as a whole), and so do
    nested layers: an attention module holding its input projection and its output projection
    is one unit (its forward may use the projection's weight without calling it).
    """
    blocks: list[nn.Module] = []
    taken: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in taken:
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    blocks.append(block)
                taken.update(id(m) for m in block.modules())
    if blocks:
        return blocks
    layers: list[nn.Module] = []
    for m in model.modules():
        if m is model or id(m) in taken:
            continue
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            layers.append(m)
            taken.update(id(inner) for inner in m.modules())
    return layers


def shard_model(
    model: nn.Module,
    *,
    units: Units = default_units,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` (each unit, then the root); returns it.

    Needs an initialised process group (e.g. under ``torchrun``). ``mp_policy`` is FSDP2's
    ``MixedPrecisionPolicy`` (for example bf16 parameters with float32 gradient reduction);
    ``mesh`` a 1-D device mesh (default: every rank). Call it after ``quantize_``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs a process group: launch with torchrun and call "
            "torch.distributed.init_process_group first"
        )
    if is_sharded(model):
        raise ValueError("the model is already sharded (it holds FSDP modules)")
    options: dict[str, object] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if mesh is not None:
        options["mesh"] = mesh
    for unit in list(units(model)):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any of ``model``'s modules is FSDP2-sharded."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group over which ``model``'s parameters are sharded (None: not sharded).

    Only 1-D sharding (one mesh dimension, ``Shard(0)``) is supported.
    """
    groups = set()
    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ValueError(
                    f"only 1-D sharding is supported, a parameter lies on a {mesh.ndim}-D mesh"
                )
            groups.add(mesh.get_group())
    if len(groups) > 1:
        raise ValueError("the model's parameters are sharded over different process groups")
    return groups.pop() if groups else None


def load_optimizer_state(
    checkpoint_id: str | os.PathLike, optimizer: torch.optim.Optimizer, key: str = "optimizer"
) -> None:
    """Load ``optimizer``'s state from a DCP checkpoint holding its ``state_dict()`` under ``key``.

    For optimizers whose ``state_dict`` keeps ``torch.optim``'s layout (``state`` by parameter
    index), MetaGrad's included, on sharded or unsharded parameters: DCP loads into a template
    of the saved structure, which a fresh optimizer (no state yet) cannot serve as. Here a
    state tensor of a sharded parameter (shaped like it, or like it with one more trailing
    dimension) is read as a DTensor sharded like the parameter, so each rank reads its rows
    only; any other tensor is read whole (the optimizer then takes what it needs of it).
    """
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flat: dict[str, Any] = {}
    mapping: dict[str, tuple] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        path = tuple(metadata.planner_data.get(fqn, (fqn,)))
        if path[0] != key:
            continue
        mapping[fqn] = path
        if not isinstance(item, TensorStorageMetadata):
            flat[fqn] = None  # an object: DCP puts the saved one here
            continue
        owner = params[int(path[2])] if len(path) > 3 and path[1] == "state" else None
        flat[fqn] = _state_template(owner, tuple(item.size), item.properties.dtype)
    if not mapping:
        raise KeyError(f"{checkpoint_id} holds no {key!r} state")
    template = unflatten_state_dict(flat, mapping)
    dcp.load(template, checkpoint_id=checkpoint_id)
    optimizer.load_state_dict(_index_keys(template[key]))


def _index_keys(value: Any) -> Any:
    """``value`` with the parameter indices of every ``"state"`` mapping in it (an optimizer's,
    or one nested in it, such as MetaGrad's hypernetwork optimizer) as ints again: DCP gives
    the keys of a mapping back as text."""
    if not isinstance(value, dict):
        return value
    out = {k: _index_keys(v) for k, v in value.items()}
    state = out.get("state")
    if isinstance(state, dict) and all(isinstance(k, str) and k.isdigit() for k in state):
        out["state"] = {int(k): v for k, v in state.items()}
    return out


def _state_template(param: Tensor | None, size: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor of ``size``, sharded like ``param`` when it is a sharded parameter's."""
    if isinstance(param, DTensor) and size[: param.dim()] == tuple(param.shape):
        shard = param.to_local()
        local_size = (*shard.shape, *size[param.dim() :])
        return DTensor.from_local(
            torch.zeros(local_size, dtype=dtype, device=shard.device),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=torch.Size(size),
            stride=torch.empty(size, device="meta").stride(),
        )
    device = param.device if param is not None and not isinstance(param, DTensor) else "cpu"
    return torch.zeros(size, dtype=dtype, device=device)
