"""Hypernetworks that correct quantized weight gradients (MetaGrad; after MetaQuant's meta-nets).

One hypernetwork is shared by all quantized layers and applied coordinate-wise: every element of a
layer's weight is one sample. For a layer with gradient ``g`` and weight ``W`` it computes

    c = g + rms(g) * net(g / rms(g), W / rms(W)),     H(g, W) = c * rms(g) / rms(c)

so the network sees inputs of order one whatever the layer's scale, and its output is a residual
correction on the gradient's own scale. The final rescaling keeps each layer's gradient norm: the
hypernetwork corrects the direction of the update, the learning rate keeps its size. Without it,
the one-step-ahead training signal teaches the network to inflate the gradient (a larger step
lowers the next loss), and on CIFAR-10 training diverged within an epoch. (With it, MetaGrad
still diverged there within two epochs at hypernetwork lr 1e-3: see docs/results.md.) The
network's last layer starts at zero, so a fresh hypernetwork is exactly the identity on the
quantized gradient. An all-zero gradient stays zero.

Large layers are processed in chunks of ``chunk_size`` elements, each under activation
recomputation (``torch.utils.checkpoint``), so the memory held for the backward pass is the inputs
and outputs plus one chunk's activations at a time. Chunked and unchunked results are equal.

With compiled kernels on (:mod:`metagrad.kernels`), the default one-hidden-layer MLP runs fused
(:mod:`metagrad.meta.fused`): one generated kernel computes features, network and correction
element by element (the rescaling is one multiplication after it), and its hand-derived
backward recomputes the hidden units in two passes instead of storing them, so no
``numel * hidden`` activation is ever held and no chunking is needed.

Variants (:func:`create_hypernet`): ``"grad"`` (an MLP of the gradient), ``"grad+weight"`` (an MLP
of gradient and weight, the default) and ``"lstm"`` (a coordinate-wise ``nn.LSTMCell`` whose
``(h, c)`` per weight element is carried across iterations by the caller); a new kind is one
factory and one :func:`register_hypernet` call.

Forms of the correction: ``"residual"`` (above) and ``"gain"``, a learned gain per element,

    c = g * (1 + net(|g| / rms(g), W / rms(W))),

which is odd in ``g`` (``H(-g, W) = -H(g, W)``, as every usual update rule is) and leaves zero
gradient elements at zero: it can rescale and reweigh the gradient's elements, but not create an
update where the gradient has none, nor one whose sign ignores the gradient's. It sees ``|g|``,
not whether the gradient points along the weight or against it; ``"signed-gain"`` feeds
``g * sign(W) / rms(g)`` instead, so the gain can depend on that (e.g. damp updates that shrink
the weight and not those that grow it); it keeps zero elements at zero but is no longer odd.
Forms are registered in :mod:`metagrad.meta.forms`.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from metagrad import kernels
from metagrad.layout import memory_order
from metagrad.meta import sharded
from metagrad.meta.forms import DEFAULT_FORM, HYPERNET_FORMS
from metagrad.meta.fused import FusedMLP
from metagrad.registry import Registry

HyperState = tuple[Tensor, ...]
"""Per-layer recurrent state of a hypernetwork, one column per weight element (``()`` if none)."""

DEFAULT_KIND = "grad+weight"
DEFAULT_HIDDEN = 8
"""Hidden width. The cost grows with ``numel * hidden`` (``benchmarks/metagrad_overhead.py``
measures widths and variants); MetaQuant's width 100 would cost more than the model's own step."""
DEFAULT_EPS = 1e-12
"""Floor on ``rms`` when normalising inputs (an all-zero tensor then gives zero features)."""


HypernetFactory = Callable[..., "Hypernet"]
"""``factory(*, hidden, layers, form, eps) -> Hypernet`` (see :func:`create_hypernet`)."""

HYPERNET_KINDS: Registry[HypernetFactory] = Registry("hypernetwork kind")
"""The registered hypernetwork kinds by name (``create_hypernet(kind)``)."""


def register_hypernet(name: str, factory: HypernetFactory) -> HypernetFactory:
    """Make ``factory(*, hidden, layers, form, eps) -> Hypernet`` available as a kind."""
    return HYPERNET_KINDS.add(name, factory)


def rms(x: Tensor) -> Tensor:
    """Root mean square of all elements, as a 0-dim tensor (computed in at least float32).

    Its gradient at an all-zero ``x`` is zero, not the ``0 * inf = NaN`` of ``sqrt`` at 0 (an
    all-zero quantized gradient must not poison the hypernetwork's meta-gradient).
    """
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean_square = sharded.mean_square(x)  # over the whole layer when it is sharded
    nonzero = mean_square > 0
    return torch.where(nonzero, torch.where(nonzero, mean_square, 1.0).sqrt(), 0.0)


def apply_chunked(
    fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...], chunk_size: int | None
) -> tuple[Tensor, ...]:
    """``fn(*inputs)`` for a column-wise ``fn``, over chunks of ``chunk_size`` columns when larger.

    With gradients enabled each chunk runs under ``checkpoint`` (its activations are recomputed in
    the backward pass); without, chunks just bound the peak memory. Inputs of at most
    ``chunk_size`` columns (or ``chunk_size=None``) run in one piece without recomputation.
    """
    n = inputs[0].shape[-1]
    if chunk_size is None or n <= chunk_size:
        return fn(*inputs)
    grad = torch.is_grad_enabled()
    pieces = []
    for start in range(0, n, chunk_size):
        chunk = tuple(x[..., start : start + chunk_size] for x in inputs)
        pieces.append(checkpoint(fn, *chunk, use_reentrant=False) if grad else fn(*chunk))
    return tuple(torch.cat(parts, dim=-1) for parts in zip(*pieces, strict=True))


class Hypernet(nn.Module):
    """Base class: normalise inputs, apply :meth:`core` coordinate-wise, rescale the residual.

    Subclasses define :meth:`core` on an ``(in_features, n)`` feature matrix (plus state columns)
    and, if recurrent, :meth:`initial_state`. Elements are columns ("feature-major") because the
    small dense layers then run as ``(out, in) @ (in, n)`` products with contiguous results, about
    twice as fast on a CPU as the row-major ``(n, in) @ (in, out)``.

    Args:
        use_weight: feed ``W / rms(W)`` as a second feature besides ``g / rms(g)``.
        form: ``"residual"`` (``c = g + rms(g) * net``), ``"gain"`` (``c = g * (1 + net)``, the
            network seeing ``|g| / rms(g)``) or ``"signed-gain"`` (the same, seeing
            ``g * sign(W) / rms(g)``); see the module docs.
        eps: floor on ``rms`` when normalising inputs.
    """

    def __init__(
        self, *, use_weight: bool = True, form: str = DEFAULT_FORM, eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.correction = HYPERNET_FORMS.lookup(form)  # raises on an unknown name
        self.use_weight = use_weight
        self.form = form
        self.eps = eps

    @property
    def in_features(self) -> int:
        """Features per weight element: the gradient, and the weight if ``use_weight``."""
        return 2 if self.use_weight else 1

    @property
    def stateful(self) -> bool:
        """Whether the hypernetwork carries a state across iterations."""
        return False

    def initial_state(self, numel: int, like: Tensor) -> HyperState:
        """The state before the first iteration for a layer of ``numel`` weights."""
        return ()

    def core(self, features: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """``(delta, *new_state)``: the correction per column of ``features``, shape ``(n,)``."""
        raise NotImplementedError

    def features(self, grad: Tensor, weight: Tensor) -> Tensor:
        """The normalised inputs, ``(in_features, numel)``: one column per weight element."""
        g = self.correction.feature(grad, weight)
        cols = [g / rms(grad).clamp_min(self.eps)]
        if self.use_weight:
            cols.append(weight / rms(weight).clamp_min(self.eps))
        dtype = self._dtype()
        return torch.stack([c.reshape(-1).to(dtype) for c in cols])

    def forward(
        self,
        grad: Tensor,
        weight: Tensor,
        state: HyperState | None = None,
        *,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, HyperState]:
        """Corrected gradient ``H(g, W)`` (shaped like ``grad``) and the layer's new state.

        ``grad`` and ``weight`` are treated as data: pass them detached. ``state`` is this layer's
        state from the previous iteration (``None`` at the start).
        """
        if grad.shape != weight.shape:
            raise ValueError(f"grad {tuple(grad.shape)} and weight {tuple(weight.shape)} differ")
        if self.fusable() and kernels.compile_enabled() and not sharded.reducing():
            return self.fused(grad, weight), ()
        features = self.features(grad, weight)
        if not state:
            state = self.initial_state(features.shape[1], features)
        state = tuple(s.to(features.dtype) for s in state)
        delta, *new_state = apply_chunked(self.core, (features, *state), chunk_size)
        scale = rms(grad)
        delta = delta.view_as(grad).to(grad.dtype)
        if self.correction.gain:
            corrected = grad + grad * delta
        else:
            corrected = grad + scale.to(grad.dtype) * delta
        corrected = corrected * (scale / rms(corrected).clamp_min(self.eps)).to(grad.dtype)
        return corrected, tuple(new_state)

    def fusable(self) -> bool:
        """Whether :meth:`fused` computes this hypernetwork (see :class:`FusedMLP`)."""
        return False

    def fused(self, grad: Tensor, weight: Tensor) -> Tensor:
        """``forward(grad, weight)[0]`` through :class:`FusedMLP` (needs :meth:`fusable`)."""
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer`` applied to the columns of ``x``: ``W @ x + b``."""
    return torch.addmm(layer.bias.unsqueeze(1), layer.weight, x)


class MLPHypernet(Hypernet):
    """Coordinate-wise MLP (``Linear``/``ReLU`` ``layers`` times, then ``Linear`` to one output).

    MetaQuant's "FC-Grad" with ``use_weight=False``; with the weight as a second input it can
    learn weight-dependent corrections (the role of MetaQuant's "MultiFC").
    """

    def __init__(
        self,
        *,
        use_weight: bool = True,
        hidden: int = DEFAULT_HIDDEN,
        layers: int = 1,
        form: str = DEFAULT_FORM,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(use_weight=use_weight, form=form, eps=eps)
        _check_positive("hidden", hidden)
        _check_positive("layers", layers)
        widths = [self.in_features] + [hidden] * layers
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.head = _zero_init(nn.Linear(hidden, 1))

    def core(self, features: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        x = features
        for layer in self.body:
            x = _linear(layer, x).relu_()
        return (_linear(self.head, x).squeeze(0),)

    def fusable(self) -> bool:
        return len(self.body) == 1

    def fused(self, grad: Tensor, weight: Tensor) -> Tensor:
        hidden, head = self.body[0], self.head
        dtype = self._dtype()
        # Coordinate-wise: any element order will do, so take the weight's memory order and
        # flatten without copies (a reshape of a channels_last tensor would copy it).
        order = memory_order(weight)
        g = grad.permute(order).reshape(-1)
        out = FusedMLP.apply(
            g.to(dtype),
            weight.permute(order).reshape(-1).to(dtype),
            hidden.weight,
            hidden.bias,
            head.weight,
            head.bias,
            self.use_weight,
            self.form,
            self.eps,
        )
        shape = [grad.shape[d] for d in order]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return out.view(shape).permute(inverse).to(grad.dtype)


class LSTMHypernet(Hypernet):
    """Coordinate-wise ``nn.LSTMCell`` with a linear head (MetaQuant's "LSTMFC").

    The state ``(h, c)`` has one column of ``hidden`` values per weight element; the caller
    carries it from one iteration to the next (detached), as :class:`~metagrad.meta.MetaGrad` does.
    The cell's parameters are those of an ``nn.LSTMCell``, applied to columns.
    """

    def __init__(
        self,
        *,
        use_weight: bool = True,
        hidden: int = DEFAULT_HIDDEN,
        form: str = DEFAULT_FORM,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(use_weight=use_weight, form=form, eps=eps)
        _check_positive("hidden", hidden)
        self.hidden = hidden
        self.cell = nn.LSTMCell(self.in_features, hidden)
        self.head = _zero_init(nn.Linear(hidden, 1))

    @property
    def stateful(self) -> bool:
        return True

    def initial_state(self, numel: int, like: Tensor) -> HyperState:
        zeros = like.new_zeros(self.hidden, numel)
        return (zeros, zeros.clone())

    def core(self, features: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        h, c = state
        cell = self.cell
        bias = (cell.bias_ih + cell.bias_hh).unsqueeze(1)
        gates = torch.addmm(bias, cell.weight_ih, features).addmm_(cell.weight_hh, h)
        i, f, g, o = gates.chunk(4)  # nn.LSTMCell's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return _linear(self.head, h).squeeze(0), h, c


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def create_hypernet(
    kind: str = DEFAULT_KIND,
    *,
    hidden: int = DEFAULT_HIDDEN,
    layers: int = 1,
    form: str = DEFAULT_FORM,
    eps: float = DEFAULT_EPS,
) -> Hypernet:
    """Build a registered hypernetwork kind: ``"grad"``, ``"grad+weight"`` or ``"lstm"``.

    Args:
        kind: the variant (see the module docs; :data:`HYPERNET_KINDS`).
        hidden: hidden width.
        layers: hidden layers of the MLP variants (the LSTM has one cell: only 1 is accepted).
        form: a registered correction form, ``"residual"``, ``"gain"`` or ``"signed-gain"``
            (see the module docs; :data:`HYPERNET_FORMS`).
        eps: floor on ``rms`` when normalising inputs.
    """
    return HYPERNET_KINDS.lookup(kind)(hidden=hidden, layers=layers, form=form, eps=eps)


def _mlp_kind(use_weight: bool) -> HypernetFactory:
    def build(*, hidden: int, layers: int, form: str, eps: float) -> Hypernet:
        return MLPHypernet(use_weight=use_weight, hidden=hidden, layers=layers, form=form, eps=eps)

    return build


def _lstm_kind(*, hidden: int, layers: int, form: str, eps: float) -> Hypernet:
    if layers != 1:
        raise ValueError(f"the lstm hypernetwork has a single cell; got layers={layers!r}")
    return LSTMHypernet(hidden=hidden, form=form, eps=eps)


register_hypernet("grad", _mlp_kind(use_weight=False))
register_hypernet("grad+weight", _mlp_kind(use_weight=True))
register_hypernet("lstm", _lstm_kind)
