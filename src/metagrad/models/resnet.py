"""CIFAR ResNets of He et al. (2016): 6n+2 layers, three stages of n basic blocks."""

from __future__ import annotations

import torch
from torch import nn

from .init import init_weights, scale_channels
from .registry import register_model

STAGE_CHANNELS = (16, 32, 64)
"""Channels of the three stages (the stem has as many as the first stage)."""
STAGE_STRIDES = (1, 2, 2)
"""Stride of the first block of each stage."""


class BasicBlock(nn.Module):
    """Two conv3×3-BN layers with a residual; 1×1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``stem`` (conv-BN-ReLU), ``layer1..3``, global average pool, ``classifier``."""

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = [scale_channels(c, width) for c in STAGE_CHANNELS]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        current = channels[0]
        stages: list[nn.Sequential] = []
        for out_channels, stride in zip(channels, STAGE_STRIDES, strict=True):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(current, out_channels, stride if i == 0 else 1))
                current = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(current, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model
def resnet20(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3, ~0.27M parameters at width 1)."""
    return CifarResNet(3, num_classes=num_classes, width=width, in_channels=in_channels)


@register_model
def resnet56(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9, ~0.86M parameters at width 1)."""
    return CifarResNet(9, num_classes=num_classes, width=width, in_channels=in_channels)
