"""Running the user's closure with the meta weights swapped for ``W_t`` (``functional_call``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from metagrad.meta.timing import HyperTimer

Closure = Callable[[], Tensor]


class _ClosureModule(nn.Module):
    """Holds the model so that ``functional_call`` can run the user's closure on it."""

    def __init__(self, model: nn.Module, closure: Closure) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> Tensor:
        return self.closure()


def run_swapped(
    model: nn.Module,
    names: Mapping[int, str],
    closure: Closure,
    proposals: Mapping[Tensor, tuple],
    timer: HyperTimer,
) -> tuple[Tensor, dict[Tensor, Tensor]]:
    """``closure()`` with each parameter ``p`` of ``proposals`` replaced by ``proposals[p][0]``
    (``W_t``); returns the loss and ``dL/dW_t`` per parameter.

    ``names`` maps ``id(p)`` to the parameter's name in ``model``. ``W_t`` keeps its gradient
    (``retain_grad``), so that code in the closure that reads or changes the model's gradients
    (e.g. ``clip_grad_norm_(model.parameters())``) sees ``g_t`` there; what it leaves there is
    what is returned.
    """
    grads: dict[Tensor, Tensor] = {}
    for p, (new_w, *_) in proposals.items():
        new_w.retain_grad()
        new_w.register_hook(timer.capture(p, grads))
    runner = _ClosureModule(model, closure)
    params = {f"model.{names[id(p)]}": new_w for p, (new_w, *_) in proposals.items()}
    with timer.watch_backward():
        loss = functional_call(runner, params, (), strict=False)
    for p, (new_w, *_) in proposals.items():
        # What the closure left on W_t's grad (e.g. clipped), in the layout autograd gave g_t.
        if p in grads and new_w.grad is not None and new_w.grad is not grads[p]:
            grads[p].copy_(new_w.grad)
    return loss, grads
