"""The one-hidden-layer MLP hypernetwork as one elementwise kernel per pass (:class:`FusedMLP`).

With compiled kernels on (:mod:`metagrad.kernels`), one generated kernel computes features,
network and correction element by element (and the root mean squares the rescaling needs), and
the hand-derived backward recomputes the hidden units instead of storing them, so no
``numel * hidden`` activation is ever held. Run eagerly, the same code is the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metagrad import kernels
from metagrad.meta.forms import HYPERNET_FORMS


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _mlp_features(g, w, scale_g, scale_w, use_weight: bool, feature: Callable, eps: float):
    """The two normalised features (multiplications by reciprocals: cheaper)."""
    f0 = feature(g, w) * scale_g.clamp_min(eps).reciprocal()
    f1 = w * scale_w.clamp_min(eps).reciprocal() if use_weight else None
    return f0, f1


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
    """``c`` before its rescaling (stored: the network runs once per element), and ``rms`` of
    ``g``, ``w`` and ``c`` (flat ``g``, ``w``)."""
    scale_g = _rms(g)
    scale_w = _rms(w) if use_weight else scale_g  # (unused without the weight feature)
    f0, f1 = _mlp_features(g, w, scale_g, scale_w, use_weight, feature, eps)
    c = g + (g if gain else scale_g) * _mlp_delta(f0, f1, w1, b1, w2, b2)
    return c, scale_g, scale_w, _rms(c)


@kernels.kernel(recompute=True)
def _mlp_backward(
    dout,
    g,
    w,
    w1,
    b1,
    w2,
    b2,
    scale_g,
    scale_w,
    scale_c,
    use_weight: bool,
    feature: Callable,
    gain: bool,
    eps: float,
):
    """The parameter gradients as 0-d sums: the head bias's, then for each hidden unit its head
    weight's, its bias's and its input weights' (separate sums, not stacked: stacking them here
    would keep inductor from computing them all in one loop; :func:`_parameter_grads` shapes
    them)."""
    f0, f1 = _mlp_features(g, w, scale_g, scale_w, use_weight, feature, eps)
    c = g + (g if gain else scale_g) * _mlp_delta(f0, f1, w1, b1, w2, b2)
    k = scale_g / scale_c.clamp_min(eps)
    # d rms(c)/dc = c / (n rms(c)); zero where the clamp holds (rms(c) < eps)
    through_rms = torch.where(
        scale_c >= eps, scale_g * (dout * c).sum() / (c.numel() * scale_c.pow(3)), 0.0
    )
    d_delta = (k * dout - through_rms * c) * (g if gain else scale_g)
    sums = [d_delta.sum()]
    for j in range(w1.shape[0]):
        a = _mlp_hidden(f0, f1, w1, b1, j)
        d_a = torch.where(a > 0, w2[0, j] * d_delta, 0.0)
        sums += [(d_delta * torch.relu(a)).sum(), d_a.sum(), (d_a * f0).sum()]
        if use_weight:
            sums.append((d_a * f1).sum())
    return sums


def _parameter_grads(sums: list[Tensor], hidden: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of hidden weight and bias, head weight and bias from :func:`_mlp_backward`."""
    per_unit = torch.stack(sums[1:]).view(hidden, -1)
    return per_unit[:, 2:], per_unit[:, 1], per_unit[:, 0].unsqueeze(0), sums[0].reshape(1)


class FusedMLP(torch.autograd.Function):
    """:class:`MLPHypernet` with one hidden layer, as one elementwise kernel per pass.

    ``apply(g, w, hidden.weight, hidden.bias, head.weight, head.bias, use_weight, form, eps)``
    on flat ``g`` and ``w`` returns the corrected gradient. Gradients flow to the four parameters
    only (``g`` and ``w`` are data). The backward recomputes the hidden units from ``g`` and ``w``
    (one reduction for the rescaling's gradient, then the parameter gradients); the forward's
    root mean squares are saved for it, not recomputed.
    Run compiled (:mod:`metagrad.kernels`); eagerly the same code is the reference.
    """

    @staticmethod
    def forward(ctx, g, w, w1, b1, w2, b2, use_weight, form, eps):
        correction = HYPERNET_FORMS.lookup(form)
        options = (use_weight, correction.feature, correction.gain, eps)
        c, scale_g, scale_w, scale_c = _mlp_forward(g, w, w1, b1, w2, b2, *options)
        ctx.save_for_backward(g, w, w1, b1, w2, b2, scale_g, scale_w, scale_c)
        ctx.options = options
        return c.mul_(scale_g / scale_c.clamp_min(eps))

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        sums = _mlp_backward(dout, *saved, *ctx.options)
        return (None, None, *_parameter_grads(sums, saved[2].shape[0]), None, None, None)
