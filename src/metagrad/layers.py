"""Drop-in ``nn.Conv2d`` / ``nn.Linear`` with quantized backward passes, and model conversion."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from metagrad import functional as QF
from metagrad.functional import QuantConfig

FilterFn = Callable[[nn.Module, str], bool]


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward and backward are quantized as ``config`` says."""

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

    def __init__(self, *args, config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else QuantConfig()

    def forward(self, input: Tensor) -> Tensor:
        return QF.linear(input, self.weight, self.bias, config=self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"


def _convert(module: nn.Module, config: QuantConfig) -> nn.Module:
    """A quantized twin of ``module`` that shares its parameters, buffers and hooks."""
    if isinstance(module, (QuantConv2d, QuantLinear)):
        module.config = config
        return module
    if type(module) is nn.Conv2d:
        new_cls: type[nn.Module] = QuantConv2d
    elif type(module) is nn.Linear:
        new_cls = QuantLinear
    else:
        return module
    new = new_cls.__new__(new_cls)
    new.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    new.config = config
    return new


def default_filter(module: nn.Module, name: str) -> bool:
    """Quantize every ``nn.Conv2d`` and ``nn.Linear``."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


def quantize_(
    model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None
) -> nn.Module:
    """Swap the model's ``Conv2d``/``Linear`` layers for quantized ones, in place.

    The swapped layers keep the very same ``Parameter`` objects, so an optimizer built before the
    call still updates them. ``filter_fn(module, qualified_name)`` chooses which layers to convert
    (e.g. ``lambda m, name: name not in {"conv1", "classifier"}`` keeps the first and last layer in
    full precision). Returns ``model``.
    """
    config = config if config is not None else QuantConfig()
    filter_fn = filter_fn or default_filter
    if isinstance(model, (nn.Conv2d, nn.Linear)):
        raise ValueError("quantize_ converts layers inside a model; wrap a bare layer first")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            fqn = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (nn.Conv2d, nn.Linear)) and filter_fn(child, fqn):
                setattr(module, child_name, _convert(child, config))
    return model


def quantize(
    model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None
) -> nn.Module:
    """A converted deep copy of ``model``; the original is left untouched."""
    return quantize_(copy.deepcopy(model), config, filter_fn)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's quantized layers with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
