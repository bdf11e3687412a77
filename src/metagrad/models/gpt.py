"""A small character-level GPT: causal pre-norm transformer blocks over token ids."""

from __future__ import annotations

import torch
from torch import nn

from metagrad.nn.coverage import register_non_matmul

from .init import init_transformer_weights
from .registry import register_model
from .transformer import TransformerBlock, scale_dim

GPT_CHAR_DIM = 128
"""Embedding width at width 1 (scaled by ``width``, rounded to a multiple of the heads)."""
GPT_CHAR_HEADS = 4
GPT_CHAR_DEPTH = 4
GPT_CHAR_MLP_RATIO = 4
GPT_CHAR_CONTEXT = 128
"""Longest sequence the model reads (its learned positions); training windows are this long."""


class CharGPT(nn.Module):
    """``stem`` (the token ``nn.Embedding``), learned positions, ``blocks`` (pre-norm
    :class:`TransformerBlock` with a causal mask), final ``norm`` and ``classifier`` (the head).

    ``forward(ids)`` maps B×T int token ids (T <= ``context``) to B×T×``num_classes`` logits;
    position ``t`` sees the tokens ``0..t`` only.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        width: float = 1.0,
        in_channels: int,
        dim: int = GPT_CHAR_DIM,
        depth: int = GPT_CHAR_DEPTH,
        heads: int = GPT_CHAR_HEADS,
        mlp_ratio: int = GPT_CHAR_MLP_RATIO,
        context: int = GPT_CHAR_CONTEXT,
    ) -> None:
        super().__init__()
        dim = scale_dim(dim, width, heads)
        self.context = context
        self.stem = nn.Sequential(nn.Embedding(in_channels, dim))
        self.position = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio * dim) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        init_transformer_weights(self, depth)
        nn.init.trunc_normal_(self.position, std=0.02, a=-0.04, b=0.04)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.context or ids.is_floating_point():
            raise ValueError(
                f"expected B×T integer token ids with T <= {self.context}, got "
                f"{ids.dtype} of shape {tuple(ids.shape)}"
            )
        length = ids.shape[1]
        x = self.stem(ids) + self.position[:, :length]
        mask = torch.full((length, length), float("-inf"), device=ids.device).triu_(1)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.classifier(self.norm(x))


register_non_matmul(CharGPT, "position")  # learned positions, added to the tokens


@register_model(task="charlm")
def gpt_char(*, num_classes: int = 96, width: float = 1.0, in_channels: int = 96) -> CharGPT:
    """Character GPT: dim 128 × width, 4 heads, 4 blocks, MLP ratio 4, context 128;
    ``num_classes``/``in_channels`` are the vocabulary size (~0.8M parameters at width 1)."""
    return CharGPT(num_classes=num_classes, width=width, in_channels=in_channels)
