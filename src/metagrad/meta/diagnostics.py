"""How close is the gradient that updates the weights to the full-precision one?

On one batch, per quantized layer: the full-precision weight gradient, the quantized one (what
plain low-precision training uses) and, under MetaGrad, the hypernetwork's correction of it;
cosine similarity and relative error of the latter two against the first, and the size of the
correction (``|used - quantized| / |quantized|``, 0 for plain training). The model's buffers
(batch-norm statistics) and the random-number state are restored, so diagnostics never change
the training run they observe. The loss is cross-entropy, or ``loss_fn(out, y)`` where given
(e.g. a task's loss over every position of a language model's windows). With ``amp`` (the run's
autocast dtype, e.g. ``torch.bfloat16``) the model's forward runs under that autocast, as in the
training step it observes, and the loss is taken of its output outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.nn.layers import quantized_layers
from metagrad.quant.spec import QuantConfig

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(model_output, targets) -> scalar loss``."""


@contextmanager
def untouched(model: nn.Module):
    """Restore buffers and the torch RNG afterwards."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        torch.set_rng_state(rng)


@contextmanager
def full_precision_backward(model: nn.Module):
    """Every quantized module of ``model`` (attention included) with a full-precision backward."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "config", None), QuantConfig)]
    configs = [layer.config for layer in layers]
    for layer, config in zip(layers, configs, strict=True):
        layer.config = config.without_backward(backend="simulate")
    try:
        yield
    finally:
        for layer, config in zip(layers, configs, strict=True):
            layer.config = config


def _loss(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None, amp: torch.dtype | None
) -> Tensor:
    """The loss on ``(x, y)``, the forward under autocast to ``amp`` when given (as in training)."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=bool(amp)):
        out = model(x)
    return (loss_fn or F.cross_entropy)(out, y)


def _weight_grads(
    model: nn.Module,
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    amp: torch.dtype | None = None,
) -> list[Tensor]:
    return list(torch.autograd.grad(_loss(model, x, y, loss_fn, amp), weights))


def paired_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per quantized layer, its weight gradient on ``(x, y)``: ``(full precision, quantized)``.

    Both backward passes start from one forward pass each, under autocast to ``amp`` when given.
    The model's buffers and the random-number state are left as they were.
    """
    named = quantized_layers(model)
    layers = [layer for _, layer in named]
    weights = [layer.weight for layer in layers]
    with untouched(model):
        with full_precision_backward(model):
            reference = _weight_grads(model, weights, x, y, loss_fn, amp)
        quantized = _weight_grads(model, weights, x, y, loss_fn, amp)
    return {name: (ref, q) for (name, _), ref, q in zip(named, reference, quantized, strict=True)}


def _compare(g: Tensor, reference: Tensor) -> dict[str, float]:
    g, reference = g.double().flatten(), reference.double().flatten()
    ref_norm = reference.norm()
    return {
        "cosine": float(F.cosine_similarity(g, reference, dim=0, eps=1e-30)),
        "rel_error": float((g - reference).norm() / ref_norm) if ref_norm > 0 else float("nan"),
    }


def _relative_change(new: Tensor, old: Tensor) -> float:
    """``|new - old| / |old|``; 0 when both are zero (nothing to correct, nothing corrected)."""
    change, size = (new - old).double().norm(), old.double().norm()
    if size == 0:
        return 0.0 if change == 0 else float("inf")
    return float(change / size)


def gradient_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """Per-layer cosine similarity and relative error of the used gradients against fp32.

    ``quantized`` is the plain quantized gradient; ``used`` is what updates the weights: the
    quantized gradient, or its hypernetwork correction when ``optimizer`` is a MetaGrad. The
    forward passes run under autocast to ``amp`` when given (the run's ``--amp``); the reference
    differs from the quantized gradient only in its full-precision backward.
    """
    pairs = paired_gradients(model, x, y, loss_fn, amp)
    reference = [ref for ref, _ in pairs.values()]
    quantized = [q for _, q in pairs.values()]
    used = quantized
    corrected = getattr(optimizer, "corrected_gradients", None)
    if corrected is not None:
        weights = [layer.weight for _, layer in quantized_layers(model)]
        fixed = corrected(dict(zip(weights, quantized, strict=True)))
        used = [fixed[w] for w in weights]
    report: dict[str, Any] = {"layers": {}}
    for name, ref, q, u in zip(pairs, reference, quantized, used, strict=True):
        report["layers"][name] = {
            "quantized": _compare(q, ref),
            "used": _compare(u, ref),
            "correction": _relative_change(u, q),
        }
    for kind in ("quantized", "used"):
        per_layer = [r[kind] for r in report["layers"].values()]
        report[f"mean_{kind}"] = {
            key: sum(r[key] for r in per_layer) / max(1, len(per_layer))
            for key in ("cosine", "rel_error")
        }
    corrections = [r["correction"] for r in report["layers"].values()]
    report["mean_correction"] = sum(corrections) / max(1, len(corrections))
    return report


def gradient_draws(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    repeats: int,
    loss_fn: LossFn | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per quantized layer: the full-precision weight gradient and ``repeats`` quantized ones.

    The quantized gradients, stacked as ``(repeats, *weight.shape)``, come from one forward pass
    and ``repeats`` backward passes on the same batch and weights: under stochastic rounding
    they differ only by the rounding's random draws (from the global torch generator), under
    rounding to nearest not at all. The model's buffers and the random-number state are left as
    they were. The forward passes run under autocast to ``amp`` when given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    named = quantized_layers(model)
    layers = [layer for _, layer in named]
    weights = [layer.weight for layer in layers]
    with untouched(model):
        with full_precision_backward(model):
            reference = _weight_grads(model, weights, x, y, loss_fn, amp)
        loss = _loss(model, x, y, loss_fn, amp)
        draws = [
            torch.autograd.grad(loss, weights, retain_graph=i < repeats - 1) for i in range(repeats)
        ]
    return {
        name: (ref, torch.stack([d[i] for d in draws]))
        for i, ((name, _), ref) in enumerate(zip(named, reference, strict=True))
    }
