"""Forms of the hypernetwork's correction, and their registry.

A form says what the network sees of the gradient ``g`` (before normalisation by ``rms(g)``)
and how its output ``delta`` corrects it (see :mod:`metagrad.meta.hyper`):

- ``"residual"``: it sees ``g``; ``c = g + rms(g) * delta``;
- ``"gain"``: it sees ``|g|``; ``c = g * (1 + delta)``, odd in ``g`` and zero where ``g`` is;
- ``"signed-gain"``: it sees ``g * sign(W)``; ``c = g * (1 + delta)``.

A new form is one feature function and one :func:`register_hyper_form` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.registry import Registry

DEFAULT_FORM = "residual"


@dataclass(frozen=True)
class HyperForm:
    """A form of the correction (see the module docs).

    ``feature(g, w)``: what the network sees of the gradient, before normalisation by
    ``rms(g)``; ``gain``: the network's output ``delta`` is a gain per element,
    ``c = g + g * delta``, rather than a residual, ``c = g + rms(g) * delta``.
    """

    feature: Callable[[Tensor, Tensor], Tensor]
    gain: bool


HYPERNET_FORMS: Registry[HyperForm] = Registry("hypernetwork form")
"""The registered forms of the correction by name (``create_hypernet(form=...)``)."""


def register_hyper_form(name: str, feature: Callable[[Tensor, Tensor], Tensor], *, gain: bool):
    """Make a form of the correction available by ``name`` (see :class:`HyperForm`)."""
    return HYPERNET_FORMS.add(name, HyperForm(feature, gain))


def _raw_gradient(g: Tensor, w: Tensor) -> Tensor:
    return g


def _magnitude(g: Tensor, w: Tensor) -> Tensor:
    return g.abs()


def _signed_by_weight(g: Tensor, w: Tensor) -> Tensor:
    return g * torch.sign(w)


register_hyper_form("residual", _raw_gradient, gain=False)
register_hyper_form("gain", _magnitude, gain=True)
register_hyper_form("signed-gain", _signed_by_weight, gain=True)
