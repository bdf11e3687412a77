"""Turning converted modules back into their original classes (:func:`unquantize_`).

:func:`~metagrad.nn.convert.quantize_` keeps on each module a handler converted into a new one
(a :func:`~metagrad.nn.layers.twin`) what it was: its class, and the attributes conversion added
or replaced (``config``). :func:`restore` builds the twin back; quantized modules built directly
(``QuantLinear(...)``) turn into their class's ``unquantized_class``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from metagrad.nn.attention import QuantMultiheadAttention, refuse_
from metagrad.nn.coverage import ConversionReport
from metagrad.nn.hf import QuantConv1DMixin
from metagrad.nn.layers import QuantConv2d, QuantLinear, twin

QUANTIZED_TYPES: tuple[type, ...] = (
    QuantLinear,
    QuantConv2d,
    QuantMultiheadAttention,
    QuantConv1DMixin,
)
"""metagrad's quantized module types (built directly or converted)."""

_ORIGINAL = "_metagrad_original"
"""The attribute of a converted module that says what it was converted from."""


@dataclass(frozen=True)
class _Original:
    """What a converted module was: its class, and the attributes conversion added or changed."""

    cls: type[nn.Module]
    added: tuple[str, ...]
    replaced: dict[str, Any]


def refuse_sharded(model: nn.Module, action: str) -> None:
    """Raise ``ValueError`` if ``model`` is FSDP2-sharded: FSDP keeps the modules it sharded,
    so a module replaced afterwards would run on shards it never gathers."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not loaded: nothing can be sharded
    if fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
        raise ValueError(
            f"{action} replaces modules, which FSDP2 does not follow once a model is sharded: "
            f"call it before metagrad.parallel.fsdp.shard_model"
        )


def record(module: nn.Module, new: nn.Module) -> None:
    """Keep on ``new`` (converted from ``module``) what :func:`restore` needs."""
    before, after = vars(module), vars(new)
    added = tuple(k for k in after if k not in before)
    replaced = {
        k: v
        for k, v in before.items()
        if not isinstance(v, dict) and (k not in after or after[k] is not v)
    }
    after[_ORIGINAL] = _Original(type(module), added, replaced)


def is_converted(module: nn.Module) -> bool:
    """Whether ``module`` is quantized: converted into a new module by a handler, or of one of
    metagrad's quantized types."""
    return _ORIGINAL in vars(module) or isinstance(module, QUANTIZED_TYPES)


def restore(module: nn.Module) -> nn.Module:
    """A twin of the converted ``module`` in its original class: the same parameters, buffers
    and hooks, without the attributes conversion added."""
    original = vars(module).get(_ORIGINAL)
    if original is None:  # built as a quantized module: its full-precision base
        original = _Original(type(module).unquantized_class, ("config",), {})
    new = twin(module, original.cls)
    state = vars(new)
    for name in (*original.added, _ORIGINAL):
        state.pop(name, None)
    state.update(original.replaced)
    return new


def _holds_converted(module: nn.Module) -> bool:
    return any(is_converted(m) for m in module.modules())


def unquantize_(model: nn.Module) -> ConversionReport:
    """Turn every converted module of ``model`` back into its original class, in place.

    They keep the same ``Parameter`` objects, buffers and hooks (those added since too);
    transformer encoders go back on PyTorch's fused inference path. The report lists them as
    ``restored``. A module a handler converted in place (returning the module itself) has no
    original to go back to and stays as it is.
    """
    if is_converted(model):
        raise ValueError("unquantize_ turns back layers inside a model; wrap a bare layer first")
    refuse_sharded(model, "unquantize_")
    report = ConversionReport()
    done: dict[int, nn.Module] = {}  # shared modules stay shared

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = restore(child) if is_converted(child) else child
                if done[id(child)] is not child:
                    report.restored[f"{prefix}{child_name}"] = type(done[id(child)]).__name__
                walk(done[id(child)], f"{prefix}{child_name}.")
            if done[id(child)] is not child:
                setattr(parent, child_name, done[id(child)])

    walk(model, "")
    for module in model.modules():
        if not _holds_converted(module):
            refuse_(module)
    return report
