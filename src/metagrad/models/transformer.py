"""The pre-norm transformer block shared by ``vit_tiny`` and ``gpt_char``."""

from __future__ import annotations

from torch import Tensor, nn

from .init import scale_channels


class TransformerBlock(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(batch_first=True, norm_first=True, activation="gelu",
    dropout=0)``: ``x + attn(norm1(x))``, then ``x + linear2(gelu(linear1(norm2(x))))``.

    ``forward`` always takes the module path, never PyTorch's fused inference kernel
    (``torch._transformer_encoder_layer_fwd``, used in eval mode without autograd): that kernel
    reads the weights directly, so it would skip layers that ``quantize_`` converted and
    evaluate a different network than the one trained.
    """

    unfused = True  # tells quantize_ that this forward never takes the fused path

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__(
            dim,
            heads,
            dim_feedforward=hidden,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src + self._sa_block(self.norm1(src), src_mask, src_key_padding_mask, is_causal)
        return x + self._ff_block(self.norm2(x))


def scale_dim(dim: int, width: float, heads: int) -> int:
    """``dim * width`` rounded to the nearest multiple of ``heads`` (at least ``heads``)."""
    return heads * scale_channels(dim, width / heads)
