"""A learned per-layer gradient scale: the simplest learned control for MetaGrad.

Each quantized layer ``l`` multiplies its weight gradient by ``s_l = exp(theta_l)``; ``theta``
is trained on the training loss one step ahead, as MetaGrad's hypernetwork is: the weights after
step ``t - 1`` depend on ``s`` through ``-lr * s_l * g_{t-1}``, so the loss at step ``t`` has
the hypergradient ``dL_t/dtheta_l = -lr * s_l * <g_t, g_{t-1}>`` (the derivative through the
momentum buffer's earlier terms truncated, as MetaGrad's horizon 1 truncates it), with ``g`` the
quantized gradients, the only ones training sees. ``theta`` takes Adam steps of ``hyper_lr`` on
it (per-layer learning-rate hypergradient descent, Baydin et al. 2018), from ``s = 1``. Unlike
MetaGrad's hypernetwork the scale is not normalised away: it can correct a quantizer that
shrinks or inflates gradients, and it can also inflate the step, which the one-step objective
rewards. The final scales are written to ``layer-scales.json`` in the run's directory.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from metagrad.nn.layers import quantized_weights
from metagrad.training.trainer import Trainer

SCALES = "layer-scales.json"


class LayerScaleTrainer(Trainer):
    """``metagrad train``'s trainer with each quantized layer's weight gradient scaled by a
    learned ``exp(theta_l)`` before the optimizer step (``hyper_lr``: Adam's on ``theta``)."""

    def __init__(self, cfg: Any, *, hyper_lr: float = 1e-4) -> None:
        if not hyper_lr > 0:
            raise ValueError(f"hyper_lr must be > 0, got {hyper_lr!r}")
        self.hyper_lr = hyper_lr
        super().__init__(cfg)

    def _setup(self, cfg: Any, rank: int, world_size: int) -> None:
        super()._setup(cfg, rank, world_size)
        self.names, self.weights = zip(*quantized_weights(self.model), strict=True)
        self.theta = torch.zeros(len(self.weights), dtype=torch.float64, requires_grad=True)
        self.theta_optimizer = torch.optim.Adam([self.theta], lr=self.hyper_lr)
        self.previous: list[Tensor | None] = [None] * len(self.weights)
        self.optimizer.register_step_pre_hook(lambda *_: self._scale())

    @torch.no_grad()
    def _scale(self) -> None:
        grads = [w.grad for w in self.weights]
        dots = torch.zeros_like(self.theta)
        for i, (g, p) in enumerate(zip(grads, self.previous, strict=True)):
            if g is not None and p is not None:
                dots[i] = (g.double() * p.double()).sum()
        if any(p is not None for p in self.previous):
            self.theta.grad = -dots * self.theta.exp()
            self.theta_optimizer.step()
        scales = self.theta.exp()
        for i, g in enumerate(grads):
            if g is not None:
                self.previous[i] = g.detach().clone()
                g.mul_(scales[i].to(g.dtype))

    def scales(self) -> dict[str, float]:
        """Each quantized layer's current gradient scale, by name."""
        return dict(zip(self.names, self.theta.exp().tolist(), strict=True))

    def fit(self) -> dict[str, Any]:
        summary = super().fit()
        (self.out / SCALES).write_text(json.dumps(self.scales(), indent=1) + "\n")
        return summary
