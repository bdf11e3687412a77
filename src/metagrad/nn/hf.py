"""Hugging Face's ``Conv1D``, converted without importing transformers.

GPT-2 and the other OpenAI-GPT-style models of ``transformers`` compute their projections with
``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``, a
linear layer with a transposed weight. :func:`conv1d_twin` builds its quantized twin, an
instance of a subclass of the module's own class (so ``isinstance`` checks in transformers keep
working) with the same ``Parameter`` objects (so the same ``state_dict`` keys and layouts):

- with a recorded gradient, its product runs through :func:`metagrad.nn.functional.linear` on
  ``W.T``, so its gradient is quantized exactly as a ``QuantLinear``'s with weight ``W.T``, and
  MetaGrad sees ``weight`` as a meta weight (``quantized_weight_names``);
- without one (inference), or with a full-precision config, it is ``Conv1D``'s own forward.

The converter finds the class by its import path along the module's MRO
(:data:`CONV1D_PATHS`, see :func:`metagrad.nn.convert.register_handler`): metagrad never imports
transformers; a model that holds a ``Conv1D`` has imported it already.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from metagrad.nn import functional as QF
from metagrad.nn.layers import twin
from metagrad.quant.spec import QuantConfig

CONV1D_PATHS: tuple[str, ...] = (
    "transformers.pytorch_utils.Conv1D",
    "transformers.modeling_utils.Conv1D",  # where transformers before 4.13 defined it
)
"""The import paths of Hugging Face's ``Conv1D`` that the built-in handler converts."""


class QuantConv1DMixin:
    """The quantized forward of a ``Conv1D`` twin (first base of :func:`quant_conv1d_class`)."""

    quantized_weight_names: tuple[str, ...] = ("weight",)
    config: QuantConfig
    weight: nn.Parameter
    bias: nn.Parameter | None
    nf: int
    nx: int

    def __init__(self, *args: Any, config: QuantConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else QuantConfig()

    def forward(self, x: Tensor) -> Tensor:
        config = self.config
        if not config.quantizes_forward and (
            not QF.records_grad(x, self.weight, self.bias) or not config.quantizes_backward
        ):
            return super().forward(x)  # Conv1D's own addmm: the same numbers
        return QF.linear(x, self.weight.t(), self.bias, config=config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nf={self.nf}, nx={self.nx}, config={self.config})"


@functools.cache
def quant_conv1d_class(base: type[nn.Module]) -> type[nn.Module]:
    """The quantized twin class of ``base`` (``Conv1D`` or a subclass keeping its forward)."""
    name = f"Quant{base.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "unquantized_class": base}
    return type(name, (QuantConv1DMixin, base), namespace)


def conv1d_twin(module: nn.Module, config: QuantConfig) -> nn.Module | None:
    """The quantized twin of a ``Conv1D``; None (declined) unless its ``weight`` is a 2-D
    tensor of shape ``(nx, nf)``."""
    weight = getattr(module, "weight", None)
    shape = (getattr(module, "nx", None), getattr(module, "nf", None))
    if not isinstance(weight, Tensor) or weight.dim() != 2 or tuple(weight.shape) != shape:
        return None
    new = twin(module, quant_conv1d_class(type(module)))
    new.config = config
    return new


def __getattr__(name: str) -> Any:
    """``QuantConv1D`` by name, so that pickled models holding one load again."""
    if name == "QuantConv1D":
        from transformers.pytorch_utils import Conv1D

        return quant_conv1d_class(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
