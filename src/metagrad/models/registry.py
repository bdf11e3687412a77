"""The model registry: builders by name, each with the task it is trained on."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import overload

from torch import nn

from metagrad.registry import Registry

FIRST_CONV_NAME = "stem.0"
"""Qualified module name of the first layer (the first ``nn.Conv2d`` of an image model)."""
CLASSIFIER_NAME = "classifier"
"""Qualified module name of the final ``nn.Linear`` in every registered model."""

ModelFn = Callable[..., nn.Module]
"""A model builder: ``fn(*, num_classes: int, width: float, in_channels: int) -> nn.Module``."""

TASKS = ("image", "charlm")
"""What a registered model is trained on: image classification, or character language modelling."""

MODELS: Registry[ModelFn] = Registry("model")
"""The registered model builders by name."""
_TASKS: dict[str, str] = {}  # a model's task, when not "image"


@overload
def register_model(fn: ModelFn, *, task: str = "image") -> ModelFn: ...
@overload
def register_model(fn: None = None, *, task: str = "image") -> Callable[[ModelFn], ModelFn]: ...
def register_model(
    fn: ModelFn | None = None, *, task: str = "image"
) -> ModelFn | Callable[[ModelFn], ModelFn]:
    """Register a model builder under its function name (decorator).

    ``@register_model`` registers an image model; ``@register_model(task="charlm")`` one trained
    on another task of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")

    def register(fn: ModelFn) -> ModelFn:
        MODELS.add(fn.__name__, fn)
        _TASKS[fn.__name__] = task
        return fn

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(MODELS)


def model_task(name: str) -> str:
    """The task (one of :data:`TASKS`) the registered model ``name`` is trained on."""
    MODELS.lookup(name)  # raises on an unknown name
    return _TASKS.get(name, "image")


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
    build = MODELS.lookup(name)  # raises on an unknown name
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    if isinstance(width, bool) or not isinstance(width, Real) or not math.isfinite(width):
        raise ValueError(f"width must be a finite positive number, got {width!r}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return build(num_classes=num_classes, width=float(width), in_channels=in_channels)


def _check_positive_int(arg: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
