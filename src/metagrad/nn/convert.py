"""Model conversion: every matmul a handler knows becomes a quantized one, and a report says so.

:func:`quantize_` walks the model and converts each module whose type (or a base class of it)
has a handler registered with :func:`register_handler`. Built in: ``nn.Linear`` (subclasses
included, e.g. the ``out_proj`` of ``nn.MultiheadAttention``), ``nn.Conv2d`` and
``nn.MultiheadAttention``. Every module that multiplies by weights and is left out (no handler,
excluded, a subclass with its own ``forward``) is listed in the returned
:class:`ConversionReport`, with the reason.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from metagrad.nn.attention import QuantMultiheadAttention, unfuse_
from metagrad.nn.layers import QuantConv2d, QuantLinear, twin
from metagrad.quant.spec import QuantConfig
from metagrad.registry import Registry

FilterFn = Callable[[nn.Module, str], bool]
Handler = Callable[[nn.Module, QuantConfig], nn.Module | None]
ConfigArg = QuantConfig | Mapping[str, QuantConfig | None] | None
H = TypeVar("H", bound=Handler)

MATMUL_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
)
"""PyTorch's module types that multiply by their weights; with no handler they are reported."""

EXCLUDED_BY_FILTER = "excluded by filter"
EXCLUDED_BY_CONFIG = "excluded by config"
MAX_WARNED = 10

_OPAQUE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
"""Types whose own forward reads their submodules' weights: unconverted, their submodules are
left as they are (converting them would change nothing)."""


class ConversionWarning(UserWarning):
    """A model holds matmuls that :func:`quantize_` left in full precision."""


@dataclass(frozen=True)
class _Handler:
    fn: Handler
    methods: tuple[str, ...]


_HANDLERS: Registry[_Handler] = Registry("conversion handler")
"""The registered handlers, keyed by module type."""


def register_handler(module_type: type[nn.Module], *, methods: Iterable[str] = ("forward",)):
    """Register ``fn(module, config) -> nn.Module | None`` to convert ``module_type``.

    The handler returns the converted module (it may be ``module`` itself, changed in place), or
    None to leave it as it is (reported as declined). It applies to subclasses of
    ``module_type`` too, unless a more specific handler is registered, or the subclass overrides
    one of ``methods`` (the ones that compute the output): then it is reported, not converted.
    A converted module should share the original's ``Parameter`` objects
    (:func:`metagrad.nn.layers.twin` builds such a copy), so that optimizers keep working.
    Submodules of the converted module are converted by their own handlers afterwards. A type
    takes one handler: registering another for it raises ``ValueError``.

    Example, for a module type of your own::

        class Scale(nn.Module):  # y = x @ weight.T
            def __init__(self, n):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(n, n))

            def forward(self, x):
                return x @ self.weight.T

        class QuantScale(Scale):
            def forward(self, x):
                return metagrad.nn.functional.linear(x, self.weight, config=self.config)

        @metagrad.register_handler(Scale)
        def _(module, config):
            new = metagrad.nn.layers.twin(module, QuantScale)
            new.config = config
            return new
    """
    methods = tuple(methods)

    def register(fn: H) -> H:
        _HANDLERS.add(module_type, _Handler(fn, methods))
        return fn

    return register


def find_handler(module_type: type[nn.Module]) -> tuple[type[nn.Module], _Handler] | None:
    """The most specific registered base of ``module_type`` (by its MRO) and its handler."""
    for base in module_type.__mro__:
        if base in _HANDLERS:
            return base, _HANDLERS[base]
    return None


def _overridden(cls: type, base: type, methods: tuple[str, ...]) -> str | None:
    """The first of ``methods`` that ``cls`` defines anew below ``base``, if any."""
    for klass in cls.__mro__:
        if klass is base:
            return None
        for name in methods:
            if name in vars(klass):
                return name
    return None


@register_handler(nn.Linear)
def _linear(module: nn.Module, config: QuantConfig) -> nn.Module:
    new = twin(module, QuantLinear)
    new.config = config
    return new


@register_handler(nn.Conv2d, methods=("forward", "_conv_forward"))
def _conv2d(module: nn.Module, config: QuantConfig) -> nn.Module:
    new = twin(module, QuantConv2d)
    new.config = config
    return new


@register_handler(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module, config: QuantConfig) -> nn.Module:
    new = twin(module, QuantMultiheadAttention)  # out_proj: converted as a Linear of its own
    new.config = config
    return new


@register_handler(QuantLinear)
@register_handler(QuantConv2d)
@register_handler(QuantMultiheadAttention)
def _reconfigure(module: nn.Module, config: QuantConfig) -> nn.Module:
    module.config = config
    return module


@dataclass
class ConversionReport:
    """What :func:`quantize_` converted and which matmul-bearing modules it left out.

    ``converted`` maps qualified names to the original type's name, ``unconverted`` to the
    reason (``"excluded by filter"``, ``"excluded by config"``, ``"no handler for LSTM"``, ...).
    """

    converted: dict[str, str] = field(default_factory=dict)
    unconverted: dict[str, str] = field(default_factory=dict)

    @property
    def gaps(self) -> dict[str, str]:
        """The unconverted modules that were not explicitly excluded."""
        return {n: r for n, r in self.unconverted.items() if not _explicit(r)}

    def to_dict(self) -> dict[str, Any]:
        return {"converted": dict(self.converted), "unconverted": dict(self.unconverted)}

    def __str__(self) -> str:
        rows = [(n, t, "converted") for n, t in self.converted.items()]
        rows += [(n, r, "unconverted") for n, r in self.unconverted.items()]
        head = f"{len(self.converted)} converted, {len(self.unconverted)} unconverted"
        if not rows:
            return head
        width = max(len(r[0]) for r in rows)
        kind = max(len(r[1]) for r in rows)
        lines = [f"{n:<{width}}  {t:<{kind}}  {s}" for n, t, s in rows]
        return "\n".join([head, *lines])


def _explicit(reason: str) -> bool:
    return reason.startswith((EXCLUDED_BY_FILTER, EXCLUDED_BY_CONFIG))


class _Configs:
    """The config of a module by its qualified name: one for all, or the first matching pattern.

    Patterns are ``fnmatch`` patterns (``"encoder.layers.*.linear1"``) or regular expressions
    after ``"re:"`` (matched against the whole name).
    """

    def __init__(self, config: ConfigArg) -> None:
        self.default: QuantConfig | None = None
        self.patterns: list[tuple[Callable[[str], bool], QuantConfig | None]] = []
        if not isinstance(config, Mapping):
            self.default = config if config is not None else QuantConfig()
            return
        for pattern, value in config.items():
            if value is not None and not isinstance(value, QuantConfig):
                raise TypeError(f"config for {pattern!r} must be a QuantConfig or None")
            self.patterns.append((_matcher(pattern), value))

    def lookup(self, name: str) -> tuple[bool, QuantConfig | None]:
        """``(matched, config)``; a config of None keeps the module in full precision."""
        if self.default is not None:
            return True, self.default
        for matches, value in self.patterns:
            if matches(name):
                return True, value
        return False, None


def _matcher(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str):
        raise TypeError(f"config patterns must be strings, got {pattern!r}")
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _is_matmul(module: nn.Module) -> bool:
    return isinstance(module, MATMUL_TYPES) or find_handler(type(module)) is not None


class _Converter:
    """One pass of :func:`quantize_` over a model."""

    def __init__(self, configs: _Configs, filter_fn: FilterFn | None) -> None:
        self.configs = configs
        self.filter_fn = filter_fn
        self.report = ConversionReport()
        self.done: dict[int, nn.Module] = {}  # shared modules stay shared

    def module(self, module: nn.Module, name: str) -> nn.Module:
        """``module`` converted (or itself), then its submodules."""
        if id(module) in self.done:
            return self.done[id(module)]
        new, reason = module, None
        if _is_matmul(module):
            new, reason = self._convert(module, name)
        self.done[id(module)] = new
        if reason is not None:
            self.report.unconverted[name] = reason
            if isinstance(module, _OPAQUE):
                self._leave_inside(module, name, reason)
                return new
        for child_name, child in list(new._modules.items()):  # shared children too
            if child is None:
                continue
            converted = self.module(child, f"{name}.{child_name}" if name else child_name)
            if converted is not child:
                setattr(new, child_name, converted)
        return new

    def _convert(self, module: nn.Module, name: str) -> tuple[nn.Module, str | None]:
        """The converted module and None, or ``module`` and why it stays as it is."""
        if self.filter_fn is not None and not self.filter_fn(module, name):
            return module, EXCLUDED_BY_FILTER
        matched, config = self.configs.lookup(name)
        if matched and config is None:
            return module, EXCLUDED_BY_CONFIG
        type_name = type(module).__name__
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            return module, "uninitialized lazy module: run a forward pass first"
        found = find_handler(type(module))
        if found is None:
            return module, f"no handler for {type_name}"
        base, handler = found
        method = _overridden(type(module), base, handler.methods)
        if method is not None:
            return module, f"overrides {method}; register a handler for {type_name}"
        if config is None:
            return module, "no config pattern matches its name"
        new = handler.fn(module, config)
        if new is None:
            return module, f"declined by the handler for {base.__name__}"
        self.report.converted[name] = type_name
        return new, None

    def _leave_inside(self, module: nn.Module, name: str, reason: str) -> None:
        """Report the matmuls inside an unconverted opaque module with its reason."""
        inherited = reason if _explicit(reason) else f"inside unconverted {name or 'model'}"
        for sub_name, sub in module.named_modules(prefix=name):
            if sub is not module and _is_matmul(sub):
                self.report.unconverted[sub_name] = inherited

    def unfuse(self, model: nn.Module) -> None:
        """Keep transformer encoders holding converted modules off PyTorch's fused path."""
        converted = list(self.report.converted)
        for name, module in model.named_modules():
            if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
                continue
            prefix = f"{name}." if name else ""
            if not any(c.startswith(prefix) for c in converted):
                continue
            base, cls = nn.TransformerEncoderLayer, type(module)
            if (
                isinstance(module, base)
                and not getattr(cls, "unfused", False)
                and _overridden(cls, base, ("forward",))
            ):
                self.report.unconverted[name] = (
                    "overrides forward of TransformerEncoderLayer, whose fused inference path "
                    f"would skip the converted layers inside; register a handler for {cls.__name__}"
                )
                continue
            unfuse_(module)


def quantize_(
    model: nn.Module, config: ConfigArg = None, filter_fn: FilterFn | None = None
) -> ConversionReport:
    """Convert the model's matmuls to quantized ones, in place, and report what was left out.

    Args:
        model: any ``nn.Module``; its submodules are converted (a bare layer cannot be replaced
            in place: wrap it first, or use :func:`quantize`).
        config: one :class:`~metagrad.nn.functional.QuantConfig` for every module (default
            ``QuantConfig()``), or a mapping from qualified-name patterns to configs: ``fnmatch``
            patterns (``"encoder.layers.*.linear1"``, ``"*"``) or ``"re:<regex>"``; the first
            match in mapping order wins, None keeps the module in full precision. A module no
            pattern matches stays in full precision and is reported.
        filter_fn: ``filter_fn(module, qualified_name)``; False keeps the module in full
            precision (e.g. ``lambda m, name: name not in {"stem.0", "classifier"}``).

    Converted modules keep the very same ``Parameter`` objects (an optimizer built before the
    call still updates them), buffers and hooks; already quantized ones take the new config.
    Transformer encoder layers and encoders holding converted modules are kept off PyTorch's
    fused inference path. When a matmul-bearing module is left out for another reason than the
    filter or a None config, one :class:`ConversionWarning` names them.
    """
    return _quantize(model, config, filter_fn, stacklevel=3)


def quantize(
    model: nn.Module, config: ConfigArg = None, filter_fn: FilterFn | None = None
) -> nn.Module:
    """A converted deep copy of ``model`` (as :func:`quantize_`); the original is untouched."""
    model = copy.deepcopy(model)
    _quantize(model, config, filter_fn, stacklevel=3)
    return model


def _quantize(
    model: nn.Module, config: ConfigArg, filter_fn: FilterFn | None, stacklevel: int
) -> ConversionReport:
    converter = _Converter(_Configs(config), filter_fn)
    if converter.module(model, "") is not model:
        raise ValueError("quantize_ converts layers inside a model; wrap a bare layer first")
    converter.unfuse(model)
    report = converter.report
    if report.gaps:
        warnings.warn(_gap_message(report.gaps), ConversionWarning, stacklevel=stacklevel)
    return report


def _gap_message(gaps: dict[str, str]) -> str:
    items = [f"{name or '<model>'} ({reason})" for name, reason in gaps.items()]
    shown = "; ".join(items[:MAX_WARNED])
    more = f"; and {len(items) - MAX_WARNED} more" if len(items) > MAX_WARNED else ""
    return (
        f"quantize_ left {len(items)} matmul module(s) in full precision: {shown}{more} "
        "(see the returned ConversionReport)"
    )
