"""The one-hidden-layer MLP hypernetwork as one elementwise kernel per pass (:class:`FusedMLP`).

With compiled kernels on (:mod:`metagrad.kernels`), one generated kernel computes features,
network, correction and rescaling element by element, and the hand-derived backward recomputes
the hidden units in two passes instead of storing them, so no ``numel * hidden`` activation is
ever held. Run eagerly, the same code is the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metagrad import kernels
from metagrad.meta.forms import HYPERNET_FORMS


def _mlp_features(g, w, use_weight: bool, feature: Callable, eps: float):
    """``rms(g)`` and the two normalised features (multiplications by reciprocals: cheaper)."""
    scale_g = g.square().mean().sqrt()
    f0 = feature(g, w) * scale_g.clamp_min(eps).reciprocal()
    f1 = w * w.square().mean().sqrt().clamp_min(eps).reciprocal() if use_weight else None
    return scale_g, f0, f1


def _mlp_hidden(f0, f1, w1, b1, j: int) -> Tensor:
    """Pre-activation of hidden unit ``j`` for every element."""
    a = w1[j, 0] * f0 + b1[j]
    return a if f1 is None else a + w1[j, 1] * f1


def _mlp_delta(f0, f1, w1, b1, w2, b2) -> Tensor:
    delta = b2[0]
    for j in range(w1.shape[0]):
        delta = delta + w2[0, j] * torch.relu(_mlp_hidden(f0, f1, w1, b1, j))
    return delta


@kernels.kernel(recompute=True)
def _mlp_forward(g, w, w1, b1, w2, b2, use_weight: bool, feature: Callable, gain: bool, eps: float):
    """The corrected gradient, and ``rms(c)`` of ``c`` before its rescaling (flat ``g``, ``w``)."""
    scale_g, f0, f1 = _mlp_features(g, w, use_weight, feature, eps)
    delta = _mlp_delta(f0, f1, w1, b1, w2, b2)
    c = g + (g if gain else scale_g) * delta
    scale_c = c.square().mean().sqrt()
    return c * (scale_g / scale_c.clamp_min(eps)), scale_c


@kernels.kernel(recompute=True)
def _mlp_backward(
    dout, g, w, w1, b1, w2, b2, scale_c, use_weight: bool, feature: Callable, gain: bool, eps: float
):
    """Gradients of the four parameters (hidden weight/bias, head weight/bias)."""
    scale_g, f0, f1 = _mlp_features(g, w, use_weight, feature, eps)
    delta = _mlp_delta(f0, f1, w1, b1, w2, b2)
    c = g + (g if gain else scale_g) * delta
    k = scale_g / scale_c.clamp_min(eps)
    # d rms(c)/dc = c / (n rms(c)); zero where the clamp holds (rms(c) < eps)
    through_rms = torch.where(
        scale_c >= eps, scale_g * (dout * c).sum() / (c.numel() * scale_c.pow(3)), 0.0
    )
    d_delta = (k * dout - through_rms * c) * (g if gain else scale_g)
    grads_w1, grads_b1, grads_w2 = [], [], []
    for j in range(w1.shape[0]):
        a = _mlp_hidden(f0, f1, w1, b1, j)
        grads_w2.append((d_delta * torch.relu(a)).sum())
        d_a = torch.where(a > 0, w2[0, j] * d_delta, 0.0)
        grads_b1.append(d_a.sum())
        row = [(d_a * f0).sum()] + ([(d_a * f1).sum()] if use_weight else [])
        grads_w1.append(torch.stack(row))
    return (
        torch.stack(grads_w1),
        torch.stack(grads_b1),
        torch.stack(grads_w2).unsqueeze(0),
        d_delta.sum().reshape(1),
    )


class FusedMLP(torch.autograd.Function):
    """:class:`MLPHypernet` with one hidden layer, as one elementwise kernel per pass.

    ``apply(g, w, hidden.weight, hidden.bias, head.weight, head.bias, use_weight, form, eps)``
    on flat ``g`` and ``w`` returns the corrected gradient. Gradients flow to the four parameters
    only (``g`` and ``w`` are data). The backward recomputes the hidden units from ``g`` and ``w``
    (two passes: one reduction for the rescaling's gradient, one for all parameter gradients).
    Run compiled (:mod:`metagrad.kernels`); eagerly the same code is the reference.
    """

    @staticmethod
    def forward(ctx, g, w, w1, b1, w2, b2, use_weight, form, eps):
        correction = HYPERNET_FORMS.lookup(form)
        options = (use_weight, correction.feature, correction.gain, eps)
        out, scale_c = _mlp_forward(g, w, w1, b1, w2, b2, *options)
        ctx.save_for_backward(g, w, w1, b1, w2, b2, scale_c)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, dout):
        g, w, w1, b1, w2, b2, scale_c = ctx.saved_tensors
        grads = _mlp_backward(dout, g, w, w1, b1, w2, b2, scale_c, *ctx.options)
        return (None, None, *grads, None, None, None)
