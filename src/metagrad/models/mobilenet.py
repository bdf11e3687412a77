"""MobileNetV2 (Sandler et al., 2018), CIFAR variant for 32×32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from .init import init_weights
from .registry import register_model

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
INVERTED_RESIDUAL_CFG: list[tuple[int, int, int, int]] = [
    # (expansion t, output channels c, repeats n, first stride s)
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
"""Inverted-residual stages; with a stride-1 stem, 32×32 inputs end at 4×4."""
CHANNEL_DIVISOR = 8


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Round to the nearest multiple of ``divisor`` (at least ``divisor``), never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand, 3×3 depthwise, 1×1 linear projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """``stem`` (stride-1 conv-BN-ReLU6), ``features``, ``head`` (1×1 conv), ``classifier``.

    Every channel count, including the 1280-channel head, is ``width``-scaled and rounded to
    a multiple of 8 (at least 8).
    """

    def __init__(self, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        current = make_divisible(STEM_CHANNELS * width)
        self.stem = _conv_bn_relu6(in_channels, current)
        blocks: list[nn.Module] = []
        for expansion, channels, repeats, stride in INVERTED_RESIDUAL_CFG:
            out_channels = make_divisible(channels * width)
            for i in range(repeats):
                blocks.append(
                    InvertedResidual(current, out_channels, stride if i == 0 else 1, expansion)
                )
                current = out_channels
        self.features = nn.Sequential(*blocks)
        head_channels = make_divisible(HEAD_CHANNELS * width)
        self.head = _conv_bn_relu6(current, head_channels, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model
def mobilenetv2(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 for CIFAR (~2.2M parameters at width 1)."""
    return MobileNetV2(num_classes=num_classes, width=width, in_channels=in_channels)
