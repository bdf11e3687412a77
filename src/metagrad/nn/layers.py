"""Drop-in ``nn.Conv2d`` / ``nn.Linear`` with quantized backward passes.

Converting a model's layers (:func:`metagrad.nn.convert.quantize_`) builds these as twins of the
original layers (:func:`twin`): same ``Parameter`` objects, buffers, submodules and hooks.
"""

from __future__ import annotations

from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.nn import functional as QF
from metagrad.quant.spec import QuantConfig

M = TypeVar("M", bound=nn.Module)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward and backward are quantized as ``config`` says."""

    quantized_weight_names: tuple[str, ...] = ("weight",)
    unquantized_class: type[nn.Module] = nn.Conv2d

    def __init__(self, *args, config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else QuantConfig()

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return QF.conv2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            config=self.config,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward and backward are quantized as ``config`` says."""

    quantized_weight_names: tuple[str, ...] = ("weight",)
    unquantized_class: type[nn.Module] = nn.Linear

    def __init__(self, *args, config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else QuantConfig()

    def forward(self, input: Tensor) -> Tensor:
        return QF.linear(input, self.weight, self.bias, config=self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"


def twin(module: nn.Module, cls: type[M]) -> M:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, submodules and hooks.

    ``cls`` must be able to run on ``module``'s attributes (typically a subclass of its type that
    only changes ``forward``); no ``__init__`` runs. The containers (``_parameters``,
    ``_modules``, hook dicts) are copied, their contents are not, so an optimizer built on
    ``module``'s parameters keeps updating the twin's.
    """
    new = cls.__new__(cls)
    new.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    return new


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's quantized ``Conv2d``/``Linear`` layers (those with one ``weight``), by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def quantized_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every weight that enters a quantized product, by qualified name, each once.

    A module lists its own in ``quantized_weight_names`` (``weight`` for the quantized
    convolution and linear layers, the input projections for quantized attention); a module of
    a user's own declares them the same way.
    """
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "quantized_weight_names", ()):
            weight = getattr(module, name, None)
            if isinstance(weight, nn.Parameter) and id(weight) not in found:
                found[id(weight)] = (f"{prefix}.{name}" if prefix else name, weight)
    return list(found.values())
