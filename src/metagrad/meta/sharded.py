"""MetaGrad on an FSDP2-sharded model: the hypernetwork on each rank's shard of every meta weight.

Under ``fully_shard`` a parameter is a ``DTensor`` whose rank-local part (``to_local()``) is a
slice of the full weight along dimension 0. MetaGrad then runs on those local parts:

- the hypernetwork is coordinate-wise except for its per-layer statistics (``rms`` of the
  gradient, the weight and the correction); inside :func:`statistics_over` they are reduced
  over the shard group (a differentiable all-reduce), so every rank sees the full layer's;
- ``W_t`` is computed on the shard and written into the parameter before the closure runs, so
  FSDP gathers it for the forward pass and reduce-scatters (averages) ``g_t = dL/dW_t`` back
  into the shard's ``.grad``;
- the hypernetwork's gradient is then ``g_t`` pulled back through ``W_t`` on each shard and
  summed over the ranks (each rank holds one part of every layer).

The base rule's and the hypernetwork's state stay rank-local tensors; :func:`to_global` and
:func:`to_local_state` turn them into ``DTensor`` state (for ``torch.distributed.checkpoint``)
and back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

_GROUP: ContextVar[dist.ProcessGroup | None] = ContextVar("metagrad_statistics_group", default=None)


@contextmanager
def statistics_over(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Within this scope :func:`mean_square` reduces over ``group`` (None: local, as usual)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def reducing() -> bool:
    """Whether per-layer statistics are reduced over a shard group here."""
    return _GROUP.get() is not None


def mean_square(x: Tensor) -> Tensor:
    """The mean of ``x**2`` over the whole (possibly sharded) tensor, differentiably."""
    group = _GROUP.get()
    if group is None:
        return x.square().mean()
    parts = torch.stack([x.square().sum(), x.new_tensor(float(x.numel()))])
    total = _SumOverGroup.apply(parts, group)
    return total[0] / total[1].clamp_min(1.0)


class _SumOverGroup(torch.autograd.Function):
    """The sum of a tensor over the ranks of a group; its gradient is summed the same way
    (every rank's loss depends on every rank's part)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def local(t: Tensor) -> Tensor:
    """The rank-local part of a ``DTensor`` (sharing its storage); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def like_param(p: Tensor, t: Tensor) -> Tensor:
    """The rank-local ``t`` as a ``DTensor`` placed like the parameter ``p`` (else ``t``)."""
    if not isinstance(p, DTensor):
        return t
    return DTensor.from_local(
        t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def to_global(p: Tensor, value: Any) -> Any:
    """State ``value`` of the sharded parameter ``p`` with its shard-shaped tensors as DTensors.

    A tensor shaped like ``p``'s shard becomes a DTensor like ``p``; one of shape
    ``(k, shard numel)`` (a recurrent hypernetwork's state) becomes one of shape
    ``(*p.shape, k)`` sharded the same way. Containers are converted element by element (tuples
    to lists, which DCP saves element by element too).
    """
    if isinstance(value, Mapping):
        return {k: to_global(p, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a list: DCP saves a tuple whole, as one object
        return [to_global(p, v) for v in value]
    if not isinstance(value, Tensor) or isinstance(value, DTensor) or not isinstance(p, DTensor):
        return value
    shard = local(p)
    if value.shape == shard.shape:
        return like_param(p, value)
    if value.dim() == 2 and value.shape[1] == shard.numel():
        k = value.shape[0]
        columns = value.t().reshape(*shard.shape, k)
        shape = torch.Size((*p.shape, k))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            columns, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride
        )
    return value


def to_local_state(p: Tensor, value: Any) -> Any:
    """The inverse of :func:`to_global`, for a sharded or an unsharded parameter ``p``.

    Takes the DTensors :func:`to_global` makes (loaded sharded like ``p``, or whole), or whole
    tensors (an unsharded run's state, or a checkpoint loaded whole), and returns the state of
    ``p``'s shard (of ``p`` when it is not sharded): shard-shaped tensors, and ``(k, shard
    numel)`` for the ``(*shape, k)`` ones.
    """
    if isinstance(value, Mapping):
        return {k: to_local_state(p, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_local_state(p, v) for v in value)
    if not isinstance(value, Tensor):
        return value
    shard = local(p)
    if isinstance(value, DTensor):
        same = isinstance(p, DTensor) and value.placements == p.placements
        value = value.to_local() if same else value.full_tensor()
        if same:
            return _columns(value, shard)
    if isinstance(p, DTensor):  # a whole tensor: this rank's rows
        if value.shape != p.shape and value.dim() == 2 and value.shape[1] == p.numel():
            value = value.t().reshape(*p.shape, value.shape[0])
        if value.shape[: p.dim()] == p.shape:
            value = value.narrow(0, _row_offset(p), shard.shape[0])
    return _columns(value, shard)


def _columns(value: Tensor, shard: Tensor) -> Tensor:
    """A ``(*shard.shape, k)`` tensor as ``(k, shard numel)``; any other one as it is."""
    stacked = value.dim() == shard.dim() + 1 and value.shape[:-1] == shard.shape
    if value.shape != shard.shape and stacked:
        return value.reshape(shard.numel(), value.shape[-1]).t().contiguous()
    return value


def _row_offset(p: DTensor) -> int:
    """The first row of ``p`` held by this rank (``torch.chunk``-style sharding)."""
    rows = p.shape[0]
    world = p.device_mesh.size()
    per_rank = -(-rows // world)
    return min(rows, per_rank * p.device_mesh.get_local_rank())


def reduce_hyper_gradients(params: list[Tensor], group: dist.ProcessGroup) -> None:
    """Sum the hypernetwork's gradients over the shard group (each rank holds part of a layer)."""
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def check_sharded(model: nn.Module) -> None:
    """Refuse a partly sharded model, or one sharded otherwise than along dimension 0 of a 1-D
    mesh (MetaGrad's sharded step assumes both)."""
    loose = [
        n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)
    ]
    if loose:
        raise ValueError(
            f"MetaGrad on an FSDP2 model needs every trainable parameter sharded; {loose[0]} is "
            "not (apply fully_shard to the root module too: metagrad.parallel.fsdp.shard_model)"
        )
    for p in model.parameters():
        if p.device_mesh.ndim != 1 or p.placements != (Shard(0),):
            raise ValueError(
                f"MetaGrad supports FSDP2 sharding along dimension 0 of a 1-D mesh; a parameter "
                f"is placed {p.placements} on a {p.device_mesh.ndim}-D mesh"
            )
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("the model holds DTensor parameters but no fully_shard module")


def run_closure(
    closure: Callable[[], Tensor],
    proposals: Mapping[Tensor, tuple],
    hypernet: nn.Module,
    group: dist.ProcessGroup,
    kept: dict[Tensor, Tensor],
    keep: bool,
) -> tuple[Tensor, dict[Tensor, Tensor], float]:
    """MetaGrad's closure on a sharded model: ``(loss, {param: g_t shard}, hypernet seconds)``.

    ``W_t`` (``proposals[p][0]``) is written into each shard first (with ``keep``, the shard's
    old values go to ``kept``, to be put back if the step is skipped); FSDP gathers it for the
    forward pass and reduce-scatters ``g_t`` into the shard's ``.grad``, which is then pulled
    back through ``W_t`` to the hypernetwork and its gradients summed over ``group``.
    """
    with torch.no_grad():
        for p, (new_w, *_) in proposals.items():
            shard = local(p)
            if keep:
                kept[p] = shard.clone()
            shard.copy_(new_w)
    loss = closure()
    grads = {p: local(p.grad) for p in proposals if p.grad is not None}
    start = time.perf_counter()
    if grads:
        outputs = [proposals[p][0] for p in grads]
        pulled = [g.to(w.dtype) for w, g in zip(outputs, grads.values(), strict=True)]
        with statistics_over(group):
            torch.autograd.backward(outputs, pulled)
        reduce_hyper_gradients(list(hypernet.parameters()), group)
    return loss, grads, time.perf_counter() - start
