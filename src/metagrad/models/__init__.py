"""CIFAR-sized CNNs and small transformers behind a small timm-style registry.

Every model is built from plain ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``,
``nn.LayerNorm``, ``nn.Embedding`` and ``nn.MultiheadAttention`` modules (the transformers' blocks
are ``nn.TransformerEncoderLayer``), so that the rest of the library can swap layers by walking
the module tree. Two names are shared by all models: ``model.stem[0]`` is the model's first
layer, the one applied to its input (the first convolution of a CNN, the patch embedding of
``vit_tiny``, the token embedding of ``gpt_char``, an ``nn.Embedding`` that ``quantize_`` leaves
alone), and ``model.classifier`` is the final ``nn.Linear`` (see :data:`FIRST_CONV_NAME` and
:data:`CLASSIFIER_NAME`).

Each model is registered with the task it is trained on (:func:`model_task`): ``"image"``
(classification of N×C×H×W images; ``num_classes`` outputs, ``in_channels`` input channels) or
``"charlm"`` (next-character prediction on B×T token ids; ``num_classes`` and ``in_channels``
are the output and input vocabulary sizes).

Example::

    model = create_model("resnet20", num_classes=10, width=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import overload

from torch import nn

from metagrad.registry import Registry

__all__ = [
    "CLASSIFIER_NAME",
    "FIRST_CONV_NAME",
    "TASKS",
    "ModelFn",
    "create_model",
    "gpt",
    "init_transformer_weights",
    "init_weights",
    "list_models",
    "mobilenet",
    "model_task",
    "register_model",
    "resnet",
    "scale_channels",
    "small",
    "vgg",
    "vit",
]

FIRST_CONV_NAME = "stem.0"
"""Qualified module name of the first layer (the first ``nn.Conv2d`` of an image model)."""
CLASSIFIER_NAME = "classifier"
"""Qualified module name of the final ``nn.Linear`` in every registered model."""

ModelFn = Callable[..., nn.Module]
"""A model builder: ``fn(*, num_classes: int, width: float, in_channels: int) -> nn.Module``."""

TASKS = ("image", "charlm")
"""What a registered model is trained on: image classification, or character language modelling."""

_REGISTRY: Registry[ModelFn] = Registry("model")
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
        _REGISTRY.add(fn.__name__, fn)
        _TASKS[fn.__name__] = task
        return fn

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_task(name: str) -> str:
    """The task (one of :data:`TASKS`) the registered model ``name`` is trained on."""
    _REGISTRY.lookup(name)  # raises on an unknown name
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
    build = _REGISTRY.lookup(name)  # raises on an unknown name
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


def init_transformer_weights(model: nn.Module, depth: int, std: float = 0.02) -> None:
    """GPT-2-style initialisation of a transformer with ``depth`` residual blocks.

    Linear layers, attention input projections and embeddings: normal with ``std`` (truncated at
    two standard deviations), zero biases; the projections that write into the residual stream
    (attention output, second MLP layer) ``std / sqrt(2 * depth)``; layer norms weight 1 / bias
    0; convolutions (patch embeddings) Xavier-uniform over their flattened kernel, zero bias.
    """
    residual = std / math.sqrt(2 * depth)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            nn.init.trunc_normal_(module.in_proj_weight, std=std, a=-2 * std, b=2 * std)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight.view(module.out_channels, -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for layer in (module.self_attn.out_proj, module.linear2):
                nn.init.trunc_normal_(layer.weight, std=residual, a=-2 * residual, b=2 * residual)


# Importing the families registers their models; they need the helpers defined above.
from . import gpt, mobilenet, resnet, small, vgg, vit  # noqa: E402
