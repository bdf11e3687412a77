"""A tiny CNN for tests and quick demos; accepts any input of at least 8×8 pixels."""

from __future__ import annotations

import torch
from torch import nn

from .init import init_weights, scale_channels
from .registry import register_model

SMALL_CNN_CHANNELS = (16, 32, 64)
"""Output channels of the three conv3×3-BN-ReLU layers."""
SMALL_CNN_STRIDES = (1, 2, 2)
"""Their strides: an 8×8 input ends at 2×2 before global average pooling."""


class SmallCNN(nn.Module):
    """``stem`` (first conv block), ``features``, global average pool, ``classifier``."""

    def __init__(self, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Sequential] = []
        current = in_channels
        for channels, stride in zip(SMALL_CNN_CHANNELS, SMALL_CNN_STRIDES, strict=True):
            out_channels = scale_channels(channels, width)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(current, out_channels, 3, stride, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
            current = out_channels
        self.stem = blocks[0]
        self.features = nn.Sequential(*blocks[1:])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(current, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model
def small_cnn(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> SmallCNN:
    """Three conv layers (16/32/64 × width), ~24k parameters at width 1."""
    return SmallCNN(num_classes=num_classes, width=width, in_channels=in_channels)
