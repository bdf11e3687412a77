"""The base update rules MetaGrad refines (SGD, Adam), out of place and differentiable, and their
registry.

A base rule is ``update(param, grad, state, group) -> (new_param, new_state)``: one optimizer step
written with differentiable ops, so that the loss after the step can be differentiated through
it, with the per-parameter state passed in and returned instead of changed in place. ``group`` is
the parameter group (``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``betas``, ``eps``).
A new base rule is one function and one :func:`register_base_rule` call that names the keys of
its state (and, for training without MetaGrad, the ``torch.optim`` optimizer that takes the same
steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metagrad import kernels
from metagrad.registry import Registry

BaseState = dict[str, Any]
UpdateFn = Callable[[Tensor, Tensor, BaseState, Mapping[str, Any]], tuple[Tensor, BaseState]]
OptimizerFn = Callable[..., Optimizer]
"""``fn(params, *, lr, momentum, nesterov, weight_decay) -> Optimizer``."""


SETTINGS: tuple[str, ...] = ("momentum", "nesterov", "weight_decay", "betas", "eps")
"""The base-rule settings ``MetaGrad`` takes (its arguments and the param groups' keys)."""

DEFAULT_SETTINGS: dict[str, Any] = {
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
}
"""The value of each setting a base rule does not take (param groups hold every key)."""


@dataclass(frozen=True)
class BaseRule:
    """A registered base rule: its update, the keys of the state it keeps per parameter, the
    ``torch.optim`` optimizer that takes the same steps without MetaGrad (None: none), and the
    settings (of :data:`SETTINGS`) it reads; ``MetaGrad`` refuses the others."""

    update: UpdateFn
    state_keys: tuple[str, ...]
    optimizer: OptimizerFn | None = None
    settings: tuple[str, ...] = SETTINGS


BASE_RULES: Registry[BaseRule] = Registry("base rule")
"""The registered base rules by name (``MetaGrad(base=...)``, ``--optimizer``)."""


def register_base_rule(
    name: str,
    update: UpdateFn,
    state_keys: tuple[str, ...],
    optimizer: OptimizerFn | None = None,
    settings: tuple[str, ...] = SETTINGS,
) -> BaseRule:
    """Make ``update`` available as ``MetaGrad(base=name)`` (see :class:`BaseRule`)."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown base-rule settings {unknown}; known: {', '.join(SETTINGS)}")
    rule = BaseRule(update, tuple(state_keys), optimizer, tuple(settings))
    return BASE_RULES.add(name, rule)


def get_base_rule(name: str) -> BaseRule:
    """The registered base rule ``name``."""
    return BASE_RULES.lookup(name)


def rule_settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting for base rule ``name``: ``given`` (those not None) over the defaults.

    A given setting the rule does not read raises one ``ValueError`` naming them all.
    """
    rule = get_base_rule(name)
    given = {k: v for k, v in given.items() if v is not None}
    ignored = [k for k in given if k not in rule.settings]
    if ignored:
        others = [n for n, r in BASE_RULES.items() if n != name and set(ignored) <= set(r.settings)]
        hint = f" (or use base={others[0]!r})" if others else ""
        raise ValueError(
            f"MetaGrad(base={name!r}) takes {', '.join(rule.settings)}; "
            f"{', '.join(f'{k}={given[k]!r}' for k in ignored)} would be ignored: "
            f"remove {'it' if len(ignored) == 1 else 'them'}{hint}"
        )
    return {**DEFAULT_SETTINGS, **given}


def check_settings(
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    **rates: float,
) -> None:
    """Refuse base-rule settings out of range (one ``ValueError`` naming the setting).

    ``rates``: other settings that must be numbers >= 0 (``hyper_lr=...``).
    """
    for name, value in (
        ("lr", lr),
        ("momentum", momentum),
        ("weight_decay", weight_decay),
        ("eps", eps),
        *rates.items(),
    ):
        if isinstance(value, Tensor) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov needs momentum > 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at 0 is 0 instead of ``inf`` (no ``inf * 0``)."""
    if not x.requires_grad:
        return x.sqrt()
    positive = x > 0
    root = torch.where(positive, x, torch.ones_like(x)).sqrt()
    return torch.where(positive, root, torch.zeros_like(x))


def sgd_update(
    param: Tensor, grad: Tensor, state: BaseState, group: Mapping[str, Any]
) -> tuple[Tensor, BaseState]:
    """One ``torch.optim.SGD`` step (no dampening) out of place: ``(new_param, new_state)``.

    Differentiable in ``grad``; the same arithmetic as ``torch.optim.SGD``'s single-tensor path.
    """
    lr = torch.as_tensor(group["lr"], dtype=param.dtype, device=param.device)
    new_param, buf = _sgd_arithmetic(
        param,
        grad,
        state.get("momentum_buffer"),
        lr,
        group["momentum"],
        group["weight_decay"],
        group["nesterov"],
    )
    return new_param, ({} if buf is None else {"momentum_buffer": buf})


@kernels.kernel
def _sgd_arithmetic(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    lr: Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(new_param, new_momentum_buffer)``; ``lr`` a tensor, so that schedules never recompile."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf = grad.clone() if buf is None else buf.mul(momentum).add(grad)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    else:
        buf = None
    return param - lr * grad, buf


def adam_update(
    param: Tensor, grad: Tensor, state: BaseState, group: Mapping[str, Any]
) -> tuple[Tensor, BaseState]:
    """One ``torch.optim.Adam`` step (L2 weight decay, no amsgrad) out of place.

    Differentiable in ``grad``; the same arithmetic as ``torch.optim.Adam``'s single-tensor path.
    """
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    step = state.get("step", 0) + 1
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    if exp_avg is None or exp_avg_sq is None:
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = torch.addcmul(exp_avg_sq.mul(beta2), grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (_safe_sqrt(exp_avg_sq) / (1 - beta2**step) ** 0.5).add(eps)
    new_param = torch.addcdiv(param, exp_avg, denom, value=-step_size)
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def sgd_optimizer(
    params: Any, *, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> Optimizer:
    """``torch.optim.SGD`` with these settings (Nesterov only with momentum)."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov and momentum > 0,
        weight_decay=weight_decay,
    )


def adam_optimizer(
    params: Any, *, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> Optimizer:
    """``torch.optim.Adam`` with these settings (``momentum`` and ``nesterov`` do not apply)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


register_base_rule(
    "sgd", sgd_update, ("momentum_buffer",), sgd_optimizer, ("momentum", "nesterov", "weight_decay")
)
register_base_rule(
    "adam",
    adam_update,
    ("step", "exp_avg", "exp_avg_sq"),
    adam_optimizer,
    ("weight_decay", "betas", "eps"),
)
