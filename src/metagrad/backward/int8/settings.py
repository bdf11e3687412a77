"""What the ``int8`` backend reads of a layer's settings, and the shapes of its arguments.

:class:`BackwardSettings` lists the attributes the backend reads of its ``config`` argument
(a :class:`~metagrad.quant.spec.QuantConfig` has them).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from metagrad.quant.spec import QuantSpec

IntPair = tuple[int, int]
Mask = tuple[bool, bool, bool]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


class BackwardSettings(Protocol):
    """The quantization settings of one layer, as the ``int8`` backend reads them."""

    @property
    def grad(self) -> QuantSpec:
        """Quantizer of the backward error ``dL/dy``."""
        ...

    @property
    def weight(self) -> QuantSpec:
        """Forward quantizer of the weight."""
        ...

    @property
    def activation(self) -> QuantSpec:
        """Forward quantizer of the layer input."""
        ...
