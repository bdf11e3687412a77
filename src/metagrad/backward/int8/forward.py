"""Forward quantization of a layer's weight and input, and what it keeps for the backward pass.

With both weight and activation quantization on (and scales that factor out of the product), the
forward product is integer too and its int8 codes (:class:`ForwardState`) are reused by the
backward products; otherwise the forward runs in float on the dequantized values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from metagrad.backward.int8.codes import Quantized, quantize_codes_int8
from metagrad.backward.int8.settings import BackwardSettings
from metagrad.quant.spec import QuantSpec


@dataclass
class ForwardState:
    """What a quantized layer's forward keeps for its backward pass besides its raw inputs.

    ``x`` / ``weight``: the forward quantization of the input / weight (None when off).
    ``x_buffer``: the padded int8 layout holding ``x.codes`` (conv: N×Hp×Wp×C with the layer's
    padding; linear: rows×cols matrix), reused by the integer ``dL/dW``.
    """

    x: Quantized | None = None
    weight: Quantized | None = None
    x_buffer: Tensor | None = None

    def pack(self) -> tuple[Tensor | None, ...]:
        """The tensors, for ``ctx.save_for_backward`` (freed with the graph)."""
        x, w = self.x, self.weight
        x_parts = (x.codes, x.scale) if x is not None else (None, None)
        w_parts = (w.codes, w.scale) if w is not None else (None, None)
        return (*x_parts, *w_parts, self.x_buffer)

    @staticmethod
    def unpack(tensors: Sequence[Tensor | None]) -> ForwardState:
        """Inverse of :meth:`pack`."""
        x_codes, x_scale, w_codes, w_scale, x_buffer = tensors
        x = Quantized(x_codes, x_scale) if x_codes is not None else None
        w = Quantized(w_codes, w_scale) if w_codes is not None else None
        return ForwardState(x, w, x_buffer)


def _quantize_forward(t: Tensor, spec: QuantSpec, channel_dim: int) -> Quantized | None:
    return Quantized(*quantize_codes_int8(t, spec, channel_dim)) if spec.enabled else None


def _integer_forward_reason(config: BackwardSettings, groups: int) -> str | None:
    """Why the forward product cannot be integer under ``config`` (None if it can)."""
    if not (config.weight.enabled or config.activation.enabled):
        return None
    if not (config.weight.enabled and config.activation.enabled):
        return "forward: only one of weight/activation is quantized, so the forward runs in float"
    if config.activation.granularity == "channel":
        return (
            "forward: per-channel activation scales lie on the contraction axis, so the forward "
            "runs in float"
        )
    if groups != 1:
        return f"forward: groups={groups} > 1, so the forward runs in float"
    return None


def _uses_integer_forward(config: BackwardSettings, groups: int, integer: bool) -> bool:
    """Whether the forward product runs on integers (``integer``: the backend asks for it)."""
    return integer and config.weight.enabled and _integer_forward_reason(config, groups) is None
