"""Multi-head attention with quantized projections, and transformer layers that keep them.

:class:`QuantMultiheadAttention` computes the query, key and value projections with
:func:`metagrad.nn.functional.linear` (each its own quantized product, with its own scales, also
when the weights are packed in ``in_proj_weight``) and the output projection with its
``out_proj`` submodule (a :class:`~metagrad.nn.layers.QuantLinear`). The attention itself
(``softmax(q k^T / sqrt(d)) v``) is not quantized: it runs in the run's precision (float32, or
the autocast dtype), through
``torch.nn.functional.scaled_dot_product_attention``, or explicitly when the attention weights
are asked for. Without a recorded gradient and without forward quantization it runs
``nn.MultiheadAttention``'s own forward (fast path included): the same numbers, nothing saved.

PyTorch's ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` take a fused inference
path in eval mode without gradients, which reads the weights directly and so would bypass the
converted layers; :class:`UnfusedTransformerEncoderLayer` always runs the regular path.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.nn import functional as QF
from metagrad.nn.layers import QuantLinear, twin
from metagrad.quant.spec import QuantConfig


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections are quantized as ``config`` says.

    Same parameters, arguments and outputs as ``nn.MultiheadAttention`` (numerically the same
    with a full-precision ``config``). ``config`` applies to the q/k/v projections; the output
    projection is the ``out_proj`` submodule, with its own ``config``. The projections work on
    the inputs in their own layout (batch first or not), so per-sample quantization groups are
    those of a linear layer applied to the same tensors.
    """

    unquantized_class: type[nn.Module] = nn.MultiheadAttention

    def __init__(self, *args, config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else QuantConfig()
        self.out_proj = twin(self.out_proj, QuantLinear)
        self.out_proj.config = self.config

    @property
    def quantized_weight_names(self) -> tuple[str, ...]:
        """The input projections' weights (``out_proj`` lists its own)."""
        if self._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        args = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if self._plain_forward(query, key, value):
            return super().forward(query, key, value, *args)
        return self._quantized_forward(query, key, value, *args)

    def _plain_forward(self, *inputs: Tensor) -> bool:
        """Whether ``nn.MultiheadAttention.forward`` computes the output: no gradient recorded,
        no forward quantization here or in ``out_proj`` (a quantized or plain ``Linear``)."""
        out_proj = self.out_proj
        if self.config.quantizes_forward or type(out_proj).forward not in _PLAIN_LINEAR_FORWARDS:
            return False
        if getattr(out_proj, "config", None) is not None and out_proj.config.quantizes_forward:
            return False
        return not QF.records_grad(*inputs, *self.parameters())

    def _quantized_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = F._mha_shape_check(
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}"
            )

        if not is_batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        layout = _Layout(is_batched, self.batch_first, self.num_heads)
        q, k, v = (layout.heads(t) for t in self._in_projection(query, key, value))
        batch, _, tgt_len, head_dim = q.shape
        mask = _attention_mask(attn_mask, batch, self.num_heads, tgt_len, k.shape[2])
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, _key_position(self.bias_k, batch, self.num_heads)], dim=2)
            v = torch.cat([v, _key_position(self.bias_v, batch, self.num_heads)], dim=2)
            mask, key_padding_mask = _pad_column(mask), _pad_column(key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, self.num_heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, self.num_heads, 1, head_dim)], dim=2)
            mask, key_padding_mask = _pad_column(mask), _pad_column(key_padding_mask)
        src_len = k.shape[2]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, src_len):
                raise AssertionError(
                    f"expecting key_padding_mask shape of {(batch, src_len)}, "
                    f"but got {tuple(key_padding_mask.shape)}"
                )
            padding = key_padding_mask.view(batch, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        return self.out_proj(layout.merge(out)), weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """The q, k, v projections, one quantized product each."""
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    f"key shape {key.shape} does not match value shape {value.shape}"
                )
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return [
            QF.linear(x, w, b, config=self.config)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        ]

    def extra_repr(self) -> str:
        return f"config={self.config}"


_PLAIN_LINEAR_FORWARDS = (nn.Linear.forward, QuantLinear.forward)


class _Layout:
    """Between the inputs' layout and the ``(batch, heads, length, head_dim)`` of attention."""

    def __init__(self, is_batched: bool, batch_first: bool, num_heads: int) -> None:
        self.is_batched, self.batch_first, self.num_heads = is_batched, batch_first, num_heads

    def heads(self, x: Tensor) -> Tensor:
        if not self.is_batched:  # (L, E)
            x = x.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E)
            x = x.transpose(0, 1)
        batch, length, dim = x.shape
        return x.reshape(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:
        batch, heads, length, head_dim = x.shape
        if not self.is_batched:
            return x[0].transpose(0, 1).reshape(length, heads * head_dim)
        if self.batch_first:
            return x.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return x.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)


def _attention_mask(
    mask: Tensor | None, batch: int, heads: int, tgt_len: int, src_len: int
) -> Tensor | None:
    """``attn_mask`` of shape ``(L, S)`` or ``(N * heads, L, S)`` as a 4-D mask."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {mask.shape}, but should be "
                f"{(tgt_len, src_len)}."
            )
        return mask.view(1, 1, tgt_len, src_len)
    if mask.dim() == 3:
        if mask.shape != (batch * heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {mask.shape}, but should be "
                f"{(batch * heads, tgt_len, src_len)}."
            )
        return mask.view(batch, heads, tgt_len, src_len)
    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")


def _key_position(bias: Tensor, batch: int, heads: int) -> Tensor:
    """``bias_k``/``bias_v`` ``(1, 1, E)`` as one more key position ``(N, heads, 1, E/heads)``."""
    return bias.reshape(1, 1, heads, -1).transpose(1, 2).expand(batch, -1, -1, -1)


def _pad_column(mask: Tensor | None) -> Tensor | None:
    """One more key position, not masked (``bias_k``/``bias_v`` or the zero attention)."""
    return None if mask is None else F.pad(mask, (0, 1))


class UnfusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that never takes PyTorch's fused inference path.

    The fused path (eval mode without gradients) reads the weights directly, so it would skip
    the layer's converted submodules; this forward is the regular path of the base class.
    """

    unfused = True

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


@functools.cache
def unfused_class(cls: type[nn.TransformerEncoderLayer]) -> type[nn.TransformerEncoderLayer]:
    """``cls`` (an encoder layer type that keeps the base ``forward``) with the regular path."""
    if getattr(cls, "unfused", False):
        return cls
    if cls is nn.TransformerEncoderLayer:
        return UnfusedTransformerEncoderLayer
    forward = UnfusedTransformerEncoderLayer.forward
    namespace = {"forward": forward, "unfused": True, "__module__": __name__}
    return type(f"Unfused{cls.__name__}", (cls,), namespace)


_FUSED = "_metagrad_fused"
"""The attribute where :func:`unfuse_` keeps what it changed, for :func:`refuse_`."""


def unfuse_(module: nn.Module) -> None:
    """Keep an encoder layer or encoder of PyTorch's off its fused inference path, in place."""
    before: dict[str, object] = {}
    if isinstance(module, nn.TransformerEncoderLayer):
        cls = unfused_class(type(module))
        if cls is not type(module):
            before["__class__"] = type(module)
            module.__class__ = cls
    if isinstance(module, nn.TransformerEncoder):
        before["enable_nested_tensor"] = module.enable_nested_tensor
        before["use_nested_tensor"] = module.use_nested_tensor
        module.enable_nested_tensor = False
        module.use_nested_tensor = False
    if before and _FUSED not in vars(module):
        vars(module)[_FUSED] = before


def refuse_(module: nn.Module) -> None:
    """Undo :func:`unfuse_` on ``module`` (nothing if it did not change it)."""
    for name, value in vars(module).pop(_FUSED, {}).items():
        setattr(module, name, value)
