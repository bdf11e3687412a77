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

from metagrad.models import gpt, mobilenet, resnet, small, vgg, vit  # register the families
from metagrad.models.init import init_transformer_weights, init_weights, scale_channels
from metagrad.models.registry import (
    CLASSIFIER_NAME,
    FIRST_CONV_NAME,
    MODELS,
    TASKS,
    ModelFn,
    create_model,
    list_models,
    model_task,
    register_model,
)

__all__ = [
    "CLASSIFIER_NAME",
    "FIRST_CONV_NAME",
    "MODELS",
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
