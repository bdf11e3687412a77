"""CIFAR-sized CNNs behind a small timm-style registry.

Every model is built from plain ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm2d`` modules so
that the rest of the library can swap layers by walking the module tree. Two names are shared
by all models: ``model.stem[0]`` is the first convolution and ``model.classifier`` is the final
``nn.Linear`` (see :data:`FIRST_CONV_NAME` and :data:`CLASSIFIER_NAME`).

Example::

    model = create_model("resnet20", num_classes=10, width=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

from torch import nn

__all__ = [
    "CLASSIFIER_NAME",
    "FIRST_CONV_NAME",
    "ModelFn",
    "create_model",
    "init_weights",
    "list_models",
    "mobilenet",
    "register_model",
    "resnet",
    "scale_channels",
    "small",
    "vgg",
]

FIRST_CONV_NAME = "stem.0"
"""Qualified module name of the first ``nn.Conv2d`` in every registered model."""
CLASSIFIER_NAME = "classifier"
"""Qualified module name of the final ``nn.Linear`` in every registered model."""

ModelFn = Callable[..., nn.Module]
"""A model builder: ``fn(*, num_classes: int, width: float, in_channels: int) -> nn.Module``."""

_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register a model builder under its function name (decorator)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output (>= 1).
        width: multiplier on every hidden channel count (finite, > 0).
        in_channels: channels of the input images (>= 1).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    if isinstance(width, bool) or not isinstance(width, Real) or not math.isfinite(width):
        raise ValueError(f"width must be a finite positive number, got {width!r}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return _REGISTRY[name](num_classes=num_classes, width=float(width), in_channels=in_channels)


def _check_positive_int(arg: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 / bias 0, zero conv biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# Importing the families registers their models; they need the helpers defined above.
from . import mobilenet, resnet, small, vgg  # noqa: E402
