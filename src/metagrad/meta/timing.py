"""Timing the hypernetwork inside a MetaGrad step, its backward pass included."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn


class HyperTimer:
    """Seconds spent on the hypernetwork in one step, its backward pass included.

    Autograd runs the hypernetwork's backward after the whole model's (its nodes were created
    first), so it spans from the first ``W_t`` gradient hook to the last gradient accumulated into
    the hypernetwork's parameters. ``elapsed`` collects the parts timed directly (its forward and
    its optimizer's step).
    """

    def __init__(self, hypernet: nn.Module) -> None:
        self.hypernet = hypernet
        self.elapsed = 0.0
        self.backward_start: float | None = None
        self.backward_end: float | None = None

    def capture(self, param: Tensor, grads: dict[Tensor, Tensor]) -> Callable[[Tensor], None]:
        """A tensor hook on ``W_t`` storing (accumulating) its gradient into ``grads[param]``."""

        def hook(grad: Tensor) -> None:
            if self.backward_start is None:
                self.backward_start = time.perf_counter()
            grads[param] = grad if param not in grads else grads[param] + grad

        return hook

    def watch_backward(self) -> HookScope:
        """A scope that marks when the hypernetwork's parameters receive their gradients."""

        def mark_end(_: Tensor) -> None:
            self.backward_end = time.perf_counter()

        return HookScope(
            p.register_post_accumulate_grad_hook(mark_end)
            for p in self.hypernet.parameters()
            if p.requires_grad
        )

    def total(self) -> float:
        """The step's hypernetwork seconds: ``elapsed`` plus its backward pass."""
        backward = 0.0
        if self.backward_start is not None and self.backward_end is not None:
            backward = max(0.0, self.backward_end - self.backward_start)
        return self.elapsed + backward


class HookScope:
    """Removes the given hook handles on exit."""

    def __init__(self, handles: Iterable[Any]) -> None:
        self.handles = list(handles)

    def __enter__(self) -> HookScope:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
