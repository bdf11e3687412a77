"""A small vision transformer for CIFAR-sized images: 4×4 patches, mean-pooled tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metagrad.nn.coverage import register_non_matmul

from .init import init_transformer_weights
from .registry import register_model
from .transformer import TransformerBlock, scale_dim

VIT_TINY_DIM = 192
"""Embedding width at width 1 (scaled by ``width``, rounded to a multiple of the heads)."""
VIT_TINY_HEADS = 3
VIT_TINY_DEPTH = 6
VIT_TINY_MLP_RATIO = 4
VIT_PATCH = 4
VIT_GRID = 8
"""Patches per side of a 32×32 image; the learned position embedding is an 8×8 grid."""


class VisionTransformer(nn.Module):
    """``stem`` (the patch embedding, a stride-``patch`` ``nn.Conv2d``), a learned position
    embedding, ``blocks`` (pre-norm :class:`TransformerBlock`), ``norm`` of the mean-pooled
    tokens and ``classifier``.

    Images whose patch grid is not ``grid``×``grid`` get the position embedding resized
    (bilinear), so any image of at least ``patch``×``patch`` pixels is accepted.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        dim: int = VIT_TINY_DIM,
        depth: int = VIT_TINY_DEPTH,
        heads: int = VIT_TINY_HEADS,
        mlp_ratio: int = VIT_TINY_MLP_RATIO,
        patch: int = VIT_PATCH,
        grid: int = VIT_GRID,
    ) -> None:
        super().__init__()
        dim = scale_dim(dim, width, heads)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim, patch, stride=patch))
        self.position = nn.Parameter(torch.zeros(1, dim, grid, grid))
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads, mlp_ratio * dim) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        init_transformer_weights(self, depth)
        nn.init.trunc_normal_(self.position, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # B×D×h×w
        position = self.position
        if position.shape[-2:] != x.shape[-2:]:
            position = F.interpolate(position, size=x.shape[-2:], mode="bilinear")
        tokens = (x + position).permute(0, 2, 3, 1).flatten(1, 2)  # B×(h·w)×D
        return self.classifier(self.norm(self.blocks(tokens).mean(1)))


register_non_matmul(VisionTransformer, "position")  # learned positions, added to the tokens


@register_model
def vit_tiny(
    *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
) -> VisionTransformer:
    """ViT-Tiny for 32×32 images: 4×4 patches (64 tokens), dim 192 × width, 3 heads, depth 6,
    MLP ratio 4, mean pooling; ~2.7M parameters at width 1."""
    return VisionTransformer(num_classes=num_classes, width=width, in_channels=in_channels)
