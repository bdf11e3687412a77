"""VGG-16 with batch norm, CIFAR style (single linear classifier on 1×1×512 features)."""

from __future__ import annotations

import torch
from torch import nn

from .init import init_weights, scale_channels
from .registry import register_model

POOL = "M"
"""Marker for a 2×2 max-pool in a VGG config."""
VGG16_CFG: list[int | str] = [
    64, 64, POOL,
    128, 128, POOL,
    256, 256, 256, POOL,
    512, 512, 512, POOL,
    512, 512, 512, POOL,
]  # fmt: skip
"""Output channels of the 13 conv3×3-BN-ReLU layers, with the 5 max-pools."""


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGG(nn.Module):
    """VGG-BN for 32×32 inputs: ``stem`` (first conv block), ``features``, ``classifier``.

    The five pools reduce 32×32 to 1×1, so the classifier sees the last conv's channels.
    """

    def __init__(
        self,
        cfg: list[int | str],
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not cfg or cfg[0] == POOL:
            raise ValueError("a VGG config must start with a convolution")
        layers: list[nn.Module] = []
        current = in_channels
        for v in cfg:
            if isinstance(v, str):
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_channels = scale_channels(v, width)
                layers.append(_conv_bn_relu(current, out_channels))
                current = out_channels
        self.stem = layers[0]
        self.features = nn.Sequential(*layers[1:])
        self.classifier = nn.Linear(current, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(x, 1))


@register_model
def vgg16(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> VGG:
    """VGG-16-BN for CIFAR (~14.7M parameters at width 1)."""
    return VGG(VGG16_CFG, num_classes=num_classes, width=width, in_channels=in_channels)
