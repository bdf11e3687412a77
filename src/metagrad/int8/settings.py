"""What the ``int8`` backend reads of a layer's settings, and the shapes of its arguments.

:class:`BackwardSettings` lists the attributes the backend reads of its ``config`` argument;
:class:`metagrad.functional.QuantConfig` has them. The backend depends on this protocol, not on
``QuantConfig``, so :mod:`metagrad.int8` never imports :mod:`metagrad.functional` (which imports
the backend).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from metagrad.quant import QuantSpec

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

    @property
    def backend(self) -> str:
        """``"simulate"`` (float products) or ``"int8"`` (integer products)."""
        ...
