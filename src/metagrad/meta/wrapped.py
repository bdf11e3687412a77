"""MetaGrad given the inner module of a ``DistributedDataParallel``: it adopts the wrapper.

Lightning's DDP strategy (and hand-written loops that build the optimizer from ``ddp.module``)
give the optimizer the inner module while the forward runs through the DDP wrapper. DDP's reducer
cannot work there: it waits for gradients of the meta weights, which the closure never produces
(they are replaced by ``W_t``), and fails at the next step ("Expected to have finished reduction
in the prior iteration"), after the ranks have drifted apart.

So while a step's closure runs in a process group and MetaGrad knows no wrapper, a global forward
pre-hook watches for a ``DistributedDataParallel`` call whose module holds the model (or is part
of it). The first one seen is adopted before its forward runs, exactly as if MetaGrad had been
given the wrapper: its reducer is off during the closure (``no_sync``), rank 0's buffers and
hypernetwork are broadcast, and MetaGrad averages the gradients itself from then on. It refuses,
with one line saying what to pass instead, a wrapper that also holds trainable parameters
MetaGrad does not update, or one first seen after MetaGrad's first step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from metagrad.meta.optim import MetaGrad

PASS_INSTEAD = "give MetaGrad the DDP-wrapped model itself, MetaGrad(ddp_model, ...)"


class WrapperError(RuntimeError):
    """MetaGrad's model runs under a ``DistributedDataParallel`` it cannot adopt."""


def _related(ddp: DistributedDataParallel, model: nn.Module) -> bool:
    """Whether ``ddp`` runs ``model``, part of it, or a module that holds it."""
    return any(m is model for m in ddp.module.modules()) or any(
        m is ddp.module for m in model.modules()
    )


def _foreign(ddp: DistributedDataParallel, optimizer: MetaGrad) -> int:
    """How many trainable parameters of ``ddp`` the optimizer does not update."""
    owned = {id(p) for p in optimizer.model.parameters()}
    owned |= {id(p) for g in optimizer.param_groups for p in g["params"]}
    return sum(1 for p in ddp.module.parameters() if p.requires_grad and id(p) not in owned)


def _adopt(optimizer: MetaGrad, ddp: DistributedDataParallel) -> None:
    """Make ``ddp`` the optimizer's wrapper, as if given to the constructor; sync its state."""
    from metagrad.parallel.distributed import broadcast_tensors_

    hypernet = optimizer.hypernet
    broadcast_tensors_([*hypernet.parameters(), *hypernet.buffers()], group=ddp.process_group)
    if ddp.broadcast_buffers:  # what MetaGrad does before each forward given the wrapper
        broadcast_tensors_(list(ddp.module.buffers()), group=ddp.process_group)
    optimizer._ddp = ddp


@contextmanager
def adopt_ddp_wrapper(optimizer: MetaGrad) -> Iterator[None]:
    """Around a step's closure: adopt the DDP wrapper that runs the optimizer's model, if any.

    Does nothing when the optimizer has its wrapper or no process group is initialized.
    """
    if optimizer._ddp is not None or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    first = not optimizer.pending_gradients()  # a wrapper first seen later is refused
    adopted: list[tuple[DistributedDataParallel, bool]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if adopted or not isinstance(module, DistributedDataParallel):
            return
        if not _related(module, optimizer.model):
            return
        foreign = _foreign(module, optimizer)
        if foreign:
            raise WrapperError(
                f"MetaGrad was given part of the model that DistributedDataParallel runs "
                f"({foreign} of its trainable parameters are not MetaGrad's): {PASS_INSTEAD}"
            )
        if not first:
            raise WrapperError(
                "MetaGrad's model first ran under DistributedDataParallel after MetaGrad's first "
                "step (the ranks have drifted apart): wrap the model before the first step, or "
                f"{PASS_INSTEAD}"
            )
        adopted.append((module, module.require_backward_grad_sync))
        module.require_backward_grad_sync = False  # no_sync(), entered before DDP's forward
        _adopt(optimizer, module)

    handle = register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for ddp, sync in adopted:
            ddp.require_backward_grad_sync = sync
