"""Model conversion: every matmul a handler knows becomes a quantized one, and a report says so.

:func:`quantize_` walks the model and converts each module whose type (or a base class of it)
has a handler registered with :func:`register_handler`. Built in: ``nn.Linear`` (subclasses
included, e.g. the ``out_proj`` of ``nn.MultiheadAttention``), ``nn.Conv2d``,
``nn.MultiheadAttention`` and Hugging Face's ``Conv1D`` (:mod:`metagrad.nn.hf`, matched by its
import path, without importing transformers). Every module that multiplies by weights and is
left out (no handler, excluded, a subclass with its own ``forward``), and every other module
holding a parameter of 2 or more dimensions that is not known to be no matmul
(:mod:`metagrad.nn.coverage`), is listed in the returned :class:`ConversionReport`, with the
reason. :func:`unquantize_` turns converted modules back.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from metagrad.nn.attention import QuantMultiheadAttention, refuse_, unfuse_
from metagrad.nn.coverage import (
    EXCLUDED_BY_CONFIG,
    EXCLUDED_BY_FILTER,
    ConversionReport,
    explicit,
    undeclared,
    weights,
)
from metagrad.nn.hf import CONV1D_PATHS, conv1d_twin
from metagrad.nn.layers import QuantConv2d, QuantLinear, twin
from metagrad.nn.restore import is_converted, record, refuse_sharded, restore, unquantize_
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.registry import Registry

__all__ = [
    "EXCLUDED_BY_CONFIG",
    "EXCLUDED_BY_FILTER",
    "MATMUL_TYPES",
    "ConversionReport",
    "ConversionWarning",
    "find_handler",
    "quantize",
    "quantize_",
    "register_handler",
    "unquantize_",
]

FilterFn = Callable[[nn.Module, str], bool]
Handler = Callable[[nn.Module, QuantConfig], nn.Module | None]
LayerConfig = QuantConfig | str | None
ConfigArg = QuantConfig | str | Mapping[str, LayerConfig] | None
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
"""The registered handlers, keyed by module type or by a type's import path."""


def register_handler(module_type: type[nn.Module] | str, *, methods: Iterable[str] = ("forward",)):
    """Register ``fn(module, config) -> nn.Module | None`` to convert ``module_type``.

    ``module_type`` is a class, or the import path of one (``"package.module.ClassName"``, the
    class's ``__module__`` and ``__qualname__``): a path matches without importing anything, so
    a handler for an optional dependency's type costs nothing when it is absent.
    The handler returns the converted module (it may be ``module`` itself, changed in place), or
    None to leave it as it is (reported as declined). It applies to subclasses of
    ``module_type`` too, unless a more specific handler is registered, or the subclass overrides
    one of ``methods`` (the ones that compute the output): then it is reported, not converted.
    A converted module should share the original's ``Parameter`` objects
    (:func:`metagrad.nn.layers.twin` builds such a copy, which :func:`unquantize_` can turn
    back), so that optimizers keep working. Submodules of the converted module are converted by
    their own handlers afterwards. A type takes one handler: registering another for it raises
    ``ValueError``.

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
    if isinstance(module_type, str) and "." not in module_type:
        raise ValueError(f"a type's import path is 'package.module.Class', got {module_type!r}")

    def register(fn: H) -> H:
        _HANDLERS.add(module_type, _Handler(fn, methods))
        return fn

    return register


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_handler(module_type: type[nn.Module]) -> tuple[type[nn.Module], _Handler] | None:
    """The most specific registered base of ``module_type`` (by its MRO, a class before its
    import path) and its handler."""
    for base in module_type.__mro__:
        for key in (base, _path(base)):
            if key in _HANDLERS:
                return base, _HANDLERS[key]
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


for _conv1d_path in CONV1D_PATHS:
    register_handler(_conv1d_path)(conv1d_twin)


# ----------------------------------------------------------------------------------- configs


def _layer_config(value: Any, where: str) -> QuantConfig | None:
    """A config, a preset name or None, as a config (or None); anything else raises."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, str):
        return preset_config(value)
    if isinstance(value, QuantSpec):
        raise TypeError(
            f"{where} is a QuantSpec (how one tensor is quantized), not a QuantConfig: "
            "QuantConfig(grad=spec) quantizes the backward error with it"
        )
    raise TypeError(
        f"{where} must be a QuantConfig, a preset name ({', '.join(list_presets())}) or None, "
        f"got {type(value).__name__}"
    )


class _Configs:
    """The config of a module by its qualified name: one for all, or the first matching pattern.

    Patterns are ``fnmatch`` patterns (``"encoder.layers.*.linear1"``) or regular expressions
    after ``"re:"`` (matched against the whole name).
    """

    def __init__(self, config: ConfigArg) -> None:
        self.default: QuantConfig | None = None
        self.patterns: list[tuple[Callable[[str], bool], QuantConfig | None]] = []
        if not isinstance(config, Mapping):
            where = "quantize_'s config"
            if config is not None and not isinstance(config, (QuantConfig, str, QuantSpec)):
                raise TypeError(
                    f"{where} must be a QuantConfig, a preset name ({', '.join(list_presets())})"
                    f" or a mapping from module-name patterns to those (or None), got "
                    f"{type(config).__name__}"
                )
            self.default = _layer_config(config, where) or QuantConfig()
            return
        for pattern, value in config.items():
            matcher = _matcher(pattern)
            self.patterns.append((matcher, _layer_config(value, f"the config for {pattern!r}")))

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
        if is_converted(module):
            new, reason = self._again(module, name)
        elif _is_matmul(module):
            new, reason = self._convert(module, name)
        elif weights(module):
            self._weights(module, name)
        self.done[id(module)] = new
        if reason is not None:
            self.report.unconverted[name] = reason
            if isinstance(new, _OPAQUE):
                self._leave_inside(new, name, reason)
                return new
        for child_name, child in list(new._modules.items()):  # shared children too
            if child is None:
                continue
            converted = self.module(child, f"{name}.{child_name}" if name else child_name)
            if converted is not child:
                setattr(new, child_name, converted)
        return new

    def _excluded(self, module: nn.Module, name: str) -> tuple[str | None, QuantConfig | None]:
        """Why ``module`` stays in full precision on purpose (or None), and its config."""
        if self.filter_fn is not None and not self.filter_fn(module, name):
            return EXCLUDED_BY_FILTER, None
        matched, config = self.configs.lookup(name)
        if matched and config is None:
            return EXCLUDED_BY_CONFIG, None
        return None, config

    def _convert(self, module: nn.Module, name: str) -> tuple[nn.Module, str | None]:
        """The converted module and None, or ``module`` and why it stays as it is."""
        excluded, config = self._excluded(module, name)
        if excluded is not None:
            return module, excluded
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
        if new is not module:
            record(module, new)
        self.report.converted[name] = type_name
        return new, None

    def _again(self, module: nn.Module, name: str) -> tuple[nn.Module, str | None]:
        """An already converted module: reconfigured, left as it is, or turned back (a None
        config); the filter leaves it as it is."""
        matched, config = self.configs.lookup(name)
        if matched and config is None:
            new = restore(module)
            self.report.restored[name] = type(new).__name__
            return new, EXCLUDED_BY_CONFIG
        filtered = self.filter_fn is not None and not self.filter_fn(module, name)
        if config is not None and not filtered and getattr(module, "config", config) != config:
            module.config = config
        self.report.already_converted[name] = type(module).__name__
        return module, None

    def _weights(self, module: nn.Module, name: str) -> None:
        """Report a module of no handler's type that holds parameters of 2+ dimensions."""
        found = weights(module)
        left = undeclared(module, found)
        type_name = type(module).__name__
        if not left:
            self.report.not_applicable[name] = type_name
            return
        excluded, _ = self._excluded(module, name)
        held = ", ".join(f"{n!r} ({found[n]}-D)" for n in left)
        self.report.unconverted[name] = (
            excluded or f"no handler for {type_name}, which holds {held}"
        )

    def _leave_inside(self, module: nn.Module, name: str, reason: str) -> None:
        """Report the matmuls inside an unconverted opaque module with its reason (turning
        back the converted ones, which its forward would bypass)."""
        inherited = reason if explicit(reason) else f"inside unconverted {name or 'model'}"
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{name}.{child_name}"
            if is_converted(child):
                restored = restore(child)
                setattr(module, child_name, restored)
                self.report.restored[full] = type(restored).__name__
                child = restored
            if _is_matmul(child):
                self.report.unconverted[full] = inherited
            self._leave_inside(child, full, reason)

    def unfuse(self, model: nn.Module) -> None:
        """Keep transformer encoders holding converted modules off PyTorch's fused path (and
        put back on it those that no longer hold any)."""
        converted = list(self.report.converted)  # converted in place by a handler too
        for name, module in model.named_modules():
            if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
                continue
            prefix = f"{name}." if name else ""
            inside = any(c.startswith(prefix) for c in converted)
            if not inside and not any(is_converted(m) for m in module.modules()):
                refuse_(module)
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
        config: one :class:`~metagrad.quant.spec.QuantConfig` for every module (default
            ``QuantConfig()``) or a preset name (:func:`~metagrad.quant.presets.preset_config`:
            ``"rht-nvfp4"``, ...), or a mapping from qualified-name patterns to those (or None):
            ``fnmatch`` patterns (``"encoder.layers.*.linear1"``, ``"*"``) or ``"re:<regex>"``;
            the first match in mapping order wins, None keeps the module in full precision. A
            module no pattern matches stays in full precision and is reported. Anything else
            (a ``QuantSpec`` included) raises ``TypeError``.
        filter_fn: ``filter_fn(module, qualified_name)``; False keeps the module in full
            precision (e.g. ``lambda m, name: name not in {"stem.0", "classifier"}``).

    Converted modules keep the very same ``Parameter`` objects (an optimizer built before the
    call still updates them), buffers and hooks. Calling it again is safe: modules already
    quantized are reported as ``already_converted`` and take the new config, or, where the
    config is None, turn back into their original class (``restored``); ``filter_fn`` leaves
    them as they are. Transformer encoder layers and encoders holding converted modules are
    kept off PyTorch's fused inference path. When a matmul-bearing module is left out for
    another reason than the filter or a None config, one :class:`ConversionWarning` names them.
    An FSDP2-sharded model is refused (``ValueError``): convert before sharding.
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
    refuse_sharded(model, "quantize_")
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
        f"quantize_ left {len(items)} module(s) with weights of 2 or more dimensions in full "
        f"precision: {shown}{more} (see the returned ConversionReport; declare a module that "
        "never multiplies by such a weight, e.g. an added position embedding, with "
        "metagrad.register_non_matmul)"
    )
