"""What the built-in models share: channel scaling and weight initialisation."""

from __future__ import annotations

import math

from torch import nn


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
