"""What :func:`~metagrad.nn.convert.quantize_` reports, and which modules are not matmuls.

Every module holding a parameter of 2 or more dimensions is either converted, reported as left
out (with the reason), or known not to multiply by its weights: the types registered with
:func:`register_non_matmul` (built in: :data:`NON_MATMUL_TYPES`, embeddings and norms), listed
as not applicable. So a matmul module no handler knows can never pass for covered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from metagrad.registry import Registry

EXCLUDED_BY_FILTER = "excluded by filter"
EXCLUDED_BY_CONFIG = "excluded by config"

ATTENTION_SCORES = (
    "not quantized, in the run's forward/backward precision (float32, or the autocast dtype); "
    "only attention's projections are quantized"
)
"""The precision of the attention score products, as every :class:`ConversionReport` states."""

NON_MATMUL_TYPES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
)
"""Built-in module types that look their weights up or scale by them, never multiply by them."""

_NON_MATMUL: Registry[frozenset[str] | None] = Registry("non-matmul module type")
"""Module type -> the parameter names it never multiplies by (None: all of them)."""


def register_non_matmul(module_type: type[nn.Module], *parameter_names: str) -> None:
    """Declare that ``module_type`` (and its subclasses) never multiplies by its parameters, or
    by the ones named (e.g. a learned position embedding that is added).

    :func:`~metagrad.nn.convert.quantize_` then lists such a module as not applicable instead
    of reporting it as a matmul left in full precision (a module holding other parameters of 2
    or more dimensions is still reported).
    """
    _NON_MATMUL.add(module_type, frozenset(parameter_names) if parameter_names else None)


for _type in NON_MATMUL_TYPES:
    register_non_matmul(_type)


def weights(module: nn.Module) -> dict[str, int]:
    """The module's own parameters of 2 or more dimensions: name -> number of dimensions."""
    found = {n: p for n, p in module._parameters.items() if p is not None and not is_lazy(p)}
    return {n: p.dim() for n, p in found.items() if p.dim() >= 2}


def undeclared(module: nn.Module, names: Iterable[str]) -> list[str]:
    """The parameters among ``names`` that no :func:`register_non_matmul` declares for
    ``module``'s type (by its MRO)."""
    declared: set[str] = set()
    for base in type(module).__mro__:
        if base in _NON_MATMUL:
            entry = _NON_MATMUL[base]
            if entry is None:
                return []
            declared |= entry
    return [n for n in names if n not in declared]


@dataclass
class ConversionReport:
    """What :func:`~metagrad.nn.convert.quantize_` (or ``unquantize_``) did, module by module.

    - ``converted``: qualified name -> the original type's name;
    - ``unconverted``: matmul modules left in full precision -> the reason
      (``"excluded by filter"``, ``"excluded by config"``, ``"no handler for LSTM"``, ...);
    - ``already_converted``: quantized modules met again -> their type's name (they keep their
      class and take the new config);
    - ``restored``: quantized modules turned back into their original class -> its name;
    - ``not_applicable``: modules holding parameters of 2 or more dimensions that they never
      multiply by (embeddings, norms, :func:`register_non_matmul`) -> their type's name;
    - ``attention_scores``: the precision of the QK^T and PV products (:data:`ATTENTION_SCORES`).
    """

    converted: dict[str, str] = field(default_factory=dict)
    unconverted: dict[str, str] = field(default_factory=dict)
    already_converted: dict[str, str] = field(default_factory=dict)
    restored: dict[str, str] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    attention_scores: str = ATTENTION_SCORES

    @property
    def gaps(self) -> dict[str, str]:
        """The unconverted modules that were not explicitly excluded."""
        return {n: r for n, r in self.unconverted.items() if not explicit(r)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "converted": dict(self.converted),
            "unconverted": dict(self.unconverted),
            "already_converted": dict(self.already_converted),
            "restored": dict(self.restored),
            "not_applicable": dict(self.not_applicable),
            "attention_scores": self.attention_scores,
        }

    def __str__(self) -> str:
        groups = (
            ("converted", self.converted),
            ("unconverted", self.unconverted),
            ("already converted", self.already_converted),
            ("restored", self.restored),
            ("not applicable", self.not_applicable),
        )
        counts = [f"{len(rows)} {status}" for status, rows in groups[:2]]
        counts += [f"{len(rows)} {status}" for status, rows in groups[2:] if rows]
        rows = [(n or "<model>", t, status) for status, found in groups for n, t in found.items()]
        lines = [", ".join(counts)]
        if rows:
            width = max(len(r[0]) for r in rows)
            kind = max(len(r[1]) for r in rows)
            lines += [f"{n:<{width}}  {t:<{kind}}  {s}" for n, t, s in rows]
        lines.append(f"attention scores (QK^T, PV): {self.attention_scores}")
        return "\n".join(lines)


def explicit(reason: str) -> bool:
    """Whether a module was left out on purpose (by the filter or a None config)."""
    return reason.startswith((EXCLUDED_BY_FILTER, EXCLUDED_BY_CONFIG))
