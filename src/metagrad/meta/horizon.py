"""MetaGrad's horizon window (``horizon=K > 1``): each meta weight's anchor and the gradients
recorded since, and the unrolled updates the hypernetwork is trained through.

A meta weight's optimizer state holds ``anchor`` (its weights ``K`` updates back),
``anchor_base`` and ``anchor_hyper`` (the base rule's and the hypernetwork's state then) and
``window`` (the gradients recorded since, oldest first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from metagrad.meta.updates import BaseRule

WINDOW_KEYS = ("anchor", "anchor_base", "anchor_hyper", "window")
"""The optimizer-state keys of a meta weight's window."""


def detach(value: Any) -> Any:
    """``value`` detached if it is a tensor."""
    return value.detach() if isinstance(value, Tensor) else value


def unroll(
    state: Mapping[str, Any],
    group: Mapping[str, Any],
    hypernet: nn.Module,
    rule: BaseRule,
    chunk_size: int | None,
) -> tuple:
    """``W_t`` from the window's anchor through its recorded gradients.

    Returns ``(W_t, base state, hypernet state, first)``, ``first`` being the same triple
    after the window's first update (the next anchor).
    """
    w, base, hyper = state["anchor"], state["anchor_base"], state["anchor_hyper"]
    first = None
    for g in state["window"]:
        corrected, hyper = hypernet(g, w.detach(), hyper, chunk_size=chunk_size)
        w, base = rule.update(w, corrected, base, group)
        if first is None:
            first = (w, base, hyper)
    if not w.requires_grad:  # a frozen hypernet: still collect g_t
        w = w.detach().requires_grad_()
    return w, base, hyper, first


def slide(
    p: Tensor,
    state: dict[str, Any],
    grad: Tensor,
    first: tuple | None,
    horizon: int,
    rule: BaseRule,
) -> None:
    """Record ``g_t`` in the window; past ``horizon`` gradients, advance the anchor by one."""
    if "window" not in state:  # the first gradient: the window starts at the current weights
        state["anchor"] = p.detach().clone()
        state["anchor_base"] = {k: detach(state[k]) for k in rule.state_keys if k in state}
        hyper = state.get("hyper_state")
        state["anchor_hyper"] = tuple(hyper) if hyper else None
        state["window"] = []
    state["window"].append(grad)
    if len(state["window"]) > horizon and first is not None:
        w, base, hyper = first
        state["anchor"] = w.detach()
        state["anchor_base"] = {k: detach(v) for k, v in base.items()}
        state["anchor_hyper"] = tuple(h.detach() for h in hyper) if hyper else None
        state["window"].pop(0)
