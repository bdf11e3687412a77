"""The training run's settings: one dataclass, validated once, loadable from YAML/TOML and flags
(:mod:`metagrad.training.flags`).

The choices of the named settings (models, presets, backends, base rules, hypernetwork kinds and
forms, spec formats) are those of their registries when the settings are checked, so a plugin
(``--plugin MODULE``, imported first) can add to them.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from metagrad.backward.backend import list_backends
from metagrad.machine import CPU_MEMORY_MODES
from metagrad.meta.forms import HYPERNET_FORMS
from metagrad.meta.hyper import HYPERNET_KINDS
from metagrad.meta.updates import BASE_RULES
from metagrad.models import CLASSIFIER_NAME, FIRST_CONV_NAME, list_models
from metagrad.parallel.comm import COMM_BITS
from metagrad.parallel.distributed import DEFAULT_TIMEOUT
from metagrad.plugins import PluginError, load_plugins
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.recipes import get_recipe, list_recipes, recipe_config
from metagrad.quant.spec import (
    FULL_PRECISION_BITS,
    INTEGER_GRANULARITIES,
    ROUNDINGS,
    QuantConfig,
    QuantSpec,
)

METHODS = ("plain", "metagrad")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "off", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "kernels", "model")
ROUTE_MODES = ("auto", "measured", "fixed")
ATTENTION_KERNELS = ("default", "math")
NONFINITE_POLICIES = ("stop", "skip")
SHARD_MODES = ("ddp", "fsdp")
FSDP_METHODS = ("plain", "metagrad")
"""The methods that train under ``shard 'fsdp'``."""

SPEC_KEYS = {
    "grad_spec": "grad",
    "grad_spec_wgrad": "grad_for_weight_grad",
    "weight_spec_dgrad": "weight_for_input_grad",
    "input_spec_wgrad": "input_for_weight_grad",
    "weight_spec": "weight",
    "act_spec": "activation",
}
"""Settings written in the spec syntax (:meth:`QuantSpec.parse`) -> the QuantConfig field each
sets."""
SPEC_REPLACES = {
    "grad_spec": ("grad_bits", "grad_rounding", "grad_granularity"),
    "weight_spec": ("weight_bits",),
    "act_spec": ("act_bits",),
}
"""The settings a spec replaces: giving one of them (other than its default) too is refused."""
PRESET_FIXES = ("grad_spec", "grad_spec_wgrad")
"""Spec settings of the error's quantizer, which a gradient preset fixes."""

MAX_SEED = 2**32 - 1  # the digits split (scikit-learn) takes seeds in [0, 2**32)
MAX_WIDTH = 16.0  # a sanity bound: parameter counts grow with the square of the width
MAX_THREADS = 4096  # torch.set_num_threads takes a C int; no machine has more cores
MAX_HYPER_HIDDEN = 4096  # a sanity bound on the hypernetwork's hidden width
MAX_HYPER_HORIZON = 64  # each step runs the hypernetwork this many times
MAX_DIST_TIMEOUT = 7 * 24 * 3600.0  # a sanity bound: a week
MAX_RATE = 1e6  # a sanity bound on learning rates and weight decay: larger ones only diverge


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (each field is also a command-line flag).

    Building one imports the ``plugins`` first, then writes the spec settings
    (:data:`SPEC_KEYS`) in their canonical form and validates everything.
    """

    model: str = "vgg16"
    width: float = 1.0
    data: str | None = None
    download: bool = False
    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    grad_bits: int = 32
    grad_rounding: str = "stochastic"
    grad_granularity: str = "tensor"
    grad_quant: str | None = None
    recipe: bool = False
    grad_spec: str | None = None
    grad_spec_wgrad: str | None = None
    weight_spec_dgrad: str | None = None
    input_spec_wgrad: str | None = None
    weight_bits: int = 32
    weight_spec: str | None = None
    act_bits: int = 32
    act_spec: str | None = None
    backend: str = "simulate"
    fp_first_last: bool = False
    method: str = "plain"
    hyper: str = "grad+weight"
    hyper_form: str = "residual"
    hyper_hidden: int = 8
    hyper_lr: float = 1e-4
    hyper_horizon: int = 1
    diag_every: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    compile: str = "auto"
    routes: str = "auto"
    attention_kernel: str = "default"
    threads: int = 0
    cpu_memory: str = "retain"
    nonfinite: str = "stop"
    comm_bits: int = 32
    shard: str = "ddp"
    dist_timeout: float = DEFAULT_TIMEOUT
    max_steps: int = 0
    out: str = "runs/default"
    resume: bool = False
    progress: bool = True
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plugins = _coerce("plugins", self.plugins, [])
        _load(self.plugins)
        for name in SPEC_KEYS:  # the canonical text: equal specs are equal settings
            setattr(self, name, canonical_spec(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        self._validate_numbers()
        _choice("model", self.model, tuple(list_models()))
        _choice("optimizer", self.optimizer, tuple(BASE_RULES))
        _choice("method", self.method, METHODS)
        _choice("hyper", self.hyper, tuple(HYPERNET_KINDS))
        _choice("hyper_form", self.hyper_form, tuple(HYPERNET_FORMS))
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("compile", self.compile, COMPILE_MODES)
        _choice("routes", self.routes, ROUTE_MODES)
        _choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _choice("cpu_memory", self.cpu_memory, CPU_MEMORY_MODES)
        _choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _choice("shard", self.shard, SHARD_MODES)
        _require(
            self.comm_bits in COMM_BITS,
            f"comm_bits must be one of {', '.join(map(str, COMM_BITS))}; got {self.comm_bits!r}",
        )
        _require(
            not (self.compile == "model" and self.method == "metagrad"),
            "compile 'model' is for method plain; MetaGrad runs its forward inside its own "
            "step (use compile 'kernels')",
        )
        _require(
            self.method != "plain" or BASE_RULES[self.optimizer].optimizer is not None,
            f"optimizer {self.optimizer!r} is a MetaGrad base rule with no optimizer of its own "
            "for method plain; use method metagrad",
        )
        _require(
            not (self.amp == "fp16" and self.method == "metagrad"),
            "amp 'fp16' needs loss scaling, which MetaGrad's step does not do; use amp 'bf16'",
        )
        if self.shard == "fsdp":
            self._validate_fsdp()
        _choice("backend", self.backend, tuple(list_backends()))
        _choice("grad_rounding", self.grad_rounding, ROUNDINGS)
        _choice("grad_granularity", self.grad_granularity, INTEGER_GRANULARITIES)
        self._validate_specs()
        try:
            self.quant_config()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _validate_fsdp(self) -> None:
        """What ``shard 'fsdp'`` does not combine with, one line each."""
        _require(
            self.comm_bits == 32,
            f"comm_bits {self.comm_bits} is a DDP communication hook; shard 'fsdp' "
            "reduce-scatters float32 gradients (use comm_bits 32, or shard 'ddp')",
        )
        _require(
            self.method in FSDP_METHODS,
            f"method {self.method!r} does not train under shard 'fsdp' yet (its optimizer "
            "state is not sharded); use shard 'ddp'",
        )
        _require(
            self.amp != "fp16",
            "amp 'fp16' with shard 'fsdp': the loss scaler would check each rank's gradient "
            "shards alone; use amp 'bf16'",
        )
        _require(
            self.diag_every == 0,
            "diag_every runs the model on rank 0 alone, which a sharded model cannot; use "
            "shard 'ddp' for gradient diagnostics",
        )

    def _validate_specs(self) -> None:
        """Refuse settings that contradict each other: a spec and the settings it replaces, a
        gradient preset and the error's specs or the operand specs it sets itself."""
        defaults = self.defaults()
        for spec, replaced in SPEC_REPLACES.items():
            for name in replaced:
                value = getattr(self, name)
                _require(
                    getattr(self, spec) is None or value == defaults[name],
                    f"{spec} {getattr(self, spec)!r} replaces {name}; {name} {value!r} "
                    "would be ignored (give one or the other)",
                )
        _require(
            not self.recipe or self.grad_quant is not None, "recipe needs grad_quant: a preset"
        )
        if self.grad_quant is None:
            return
        _choice("grad_quant", self.grad_quant, tuple(list_presets()))
        if self.recipe:
            self._validate_recipe(defaults)
        preset = preset_config(self.grad_quant)
        fixed = {name: defaults[name] for name in SPEC_REPLACES["grad_spec"]}
        fixed.update(dict.fromkeys(PRESET_FIXES))
        for name in ("weight_spec_dgrad", "input_spec_wgrad"):
            operand_bits = preset.backward_operand_bits
            if getattr(preset, SPEC_KEYS[name]) is not None or operand_bits != FULL_PRECISION_BITS:
                fixed[name] = None
        for name, default in fixed.items():
            value = getattr(self, name)
            _require(
                value == default,
                f"grad_quant {self.grad_quant!r} fixes the gradient quantizer; "
                f"{name} {value!r} would be ignored (give one or the other)",
            )

    def _validate_recipe(self, defaults: dict[str, Any]) -> None:
        """A recipe sets every quantizer of its layers: refuse the settings it would ignore."""
        _require(
            self.grad_quant in list_recipes(),
            f"grad_quant {self.grad_quant!r} has no recipe; recipes: {', '.join(list_recipes())}",
        )
        fixed = ("weight_bits", "act_bits", "weight_spec", "act_spec")
        for name in (*fixed, "weight_spec_dgrad", "input_spec_wgrad"):
            value = getattr(self, name)
            _require(
                value == defaults[name],
                f"recipe {self.grad_quant!r} fixes the forward and backward quantizers; "
                f"{name} {value!r} would be ignored (give one or the other)",
            )

    def _validate_numbers(self) -> None:
        """Ranges of the numeric settings; NaN and infinities fail every check."""
        _require(
            0 < self.width <= MAX_WIDTH,
            f"width must be a positive number <= {MAX_WIDTH:g}, got {self.width!r}",
        )
        for name in ("epochs", "batch_size", "hyper_hidden", "hyper_horizon"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("threads", "max_steps", "diag_every"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        for name, limit in (
            ("threads", MAX_THREADS),
            ("hyper_hidden", MAX_HYPER_HIDDEN),
            ("hyper_horizon", MAX_HYPER_HORIZON),
        ):
            _require(getattr(self, name) <= limit, f"{name} must be <= {limit}")
        for name in ("warmup_epochs", "weight_decay", "hyper_lr"):
            value = getattr(self, name)
            _require(
                value >= 0 and math.isfinite(value),
                f"{name} must be a finite number >= 0, got {value!r}",
            )
        _require(
            self.warmup_epochs <= self.epochs,
            f"warmup_epochs must be <= epochs ({self.epochs}), got {self.warmup_epochs!r}",
        )
        _require(self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number")
        for name in ("lr", "weight_decay", "hyper_lr"):
            value = getattr(self, name)
            _require(value <= MAX_RATE, f"{name} must be <= {MAX_RATE:g}, got {value!r}")
        _require(bool(self.out.strip()), "out must name a directory for the run, got ''")
        _require(
            0 < self.dist_timeout <= MAX_DIST_TIMEOUT,
            f"dist_timeout must be in (0, {MAX_DIST_TIMEOUT:g}] seconds, got {self.dist_timeout!r}",
        )
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        _require(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}")

    def quant_config(self) -> QuantConfig:
        """The layers' quantization settings.

        The spec settings where given, else the bits (and rounding, granularity) settings; a
        gradient preset then sets the backward error's quantizers, and the operand specs, the
        other operand of each backward product.
        """
        specs = {key: self._spec(name) for name, key in SPEC_KEYS.items()}
        config = QuantConfig(
            grad=specs["grad"]
            or QuantSpec(self.grad_bits, self.grad_rounding, self.grad_granularity),
            weight=specs["weight"] or QuantSpec(self.weight_bits, "nearest", "channel"),
            activation=specs["activation"] or QuantSpec(self.act_bits, "nearest", "tensor"),
            grad_for_weight_grad=specs["grad_for_weight_grad"],
        )
        if self.grad_quant is not None and self.recipe:
            config = recipe_config(self.grad_quant, config)
        elif self.grad_quant is not None:
            config = preset_config(self.grad_quant, config)
        operands = {
            key: specs[key]
            for key in ("weight_for_input_grad", "input_for_weight_grad")
            if specs[key] is not None
        }
        return dataclasses.replace(config, backend=self.backend, **operands)

    def high_precision_layers(self) -> tuple[str, ...]:
        """Qualified names of the layers the run keeps in full precision (``fp_first_last``,
        and the recipe's)."""
        names = (FIRST_CONV_NAME, CLASSIFIER_NAME) if self.fp_first_last else ()
        if self.recipe and self.grad_quant is not None:
            names += get_recipe(self.grad_quant).high_precision
        return tuple(dict.fromkeys(names))

    def _spec(self, name: str) -> QuantSpec | None:
        """The spec setting ``name`` as a :class:`QuantSpec` (None where not given)."""
        text = getattr(self, name)
        return None if text is None else QuantSpec.parse(text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting's default value."""
        return {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
        }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _load(plugins: list[str]) -> None:
    """Import the plugin modules (:mod:`metagrad.plugins`); a failure is one ConfigError line."""
    try:
        load_plugins(plugins)
    except PluginError as err:
        raise ConfigError(str(err)) from None


def canonical_spec(name: str, text: str | None) -> str | None:
    """The spec setting ``name``'s text in the canonical form (``str(QuantSpec.parse(text))``)."""
    if text is None:
        return None
    try:
        return str(QuantSpec.parse(text))
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


# Keys that may differ between a run and its resumption.
RESUMABLE_KEYS = frozenset(
    {
        "epochs",
        "max_steps",
        "resume",
        "progress",
        "out",
        "threads",
        "cpu_memory",
        "data",
        "compile",
        "routes",
        "attention_kernel",
        "nonfinite",
        "dist_timeout",
    }
)
# Keys of one invocation, not restored by --resume.
PER_INVOCATION_KEYS = frozenset({"max_steps", "progress", "resume", "out"})
# Keys that only matter with method "metagrad".
HYPER_KEYS = frozenset({"hyper", "hyper_form", "hyper_hidden", "hyper_lr", "hyper_horizon"})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file (keys with - or _), checked against the known fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def build_config(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a config file), then ``overrides`` (flags); types are checked."""
    values = {**(base or {}), **overrides}
    defaults = TrainConfig.defaults()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    for name, value in values.items():
        values[name] = _coerce(name, value, defaults[name])
    return TrainConfig(**values)


def resume_config(saved: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """The settings of a resumed run: the saved ones, with the given ``RESUMABLE_KEYS``.

    Other given keys must equal the saved values (specs compared in their canonical form); a
    setting the checkpoint predates takes its default, and so do the settings of one invocation
    (``PER_INVOCATION_KEYS``: a run stopped by ``--max-steps`` and resumed without it trains to
    the end). The saved plugins are imported first.
    """
    defaults = TrainConfig.defaults()
    saved = {**defaults, **saved, **{k: defaults[k] for k in PER_INVOCATION_KEYS}}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    _load(_coerce("plugins", saved["plugins"], []))  # the run's registrations, for its specs
    fixed = {k: v for k, v in given.items() if k not in RESUMABLE_KEYS}
    coerced = {k: _canonical(k, _coerce(k, v, defaults[k])) for k, v in fixed.items()}
    changed = sorted(k for k, v in coerced.items() if _canonical(k, saved.get(k)) != v)
    if changed:
        diffs = ", ".join(f"{k} (saved {saved.get(k)!r}, given {coerced[k]!r})" for k in changed)
        raise ConfigError(
            f"--resume continues the run with its saved settings; these cannot change: {diffs}"
        )
    resumable = {k: v for k, v in given.items() if k in RESUMABLE_KEYS}
    return build_config({**resumable, "resume": True}, {k: saved[k] for k in known})


def _canonical(name: str, value: Any) -> Any:
    """``value`` of setting ``name`` as the config holds it (a spec in its canonical form)."""
    return canonical_spec(name, value) if name in SPEC_KEYS and isinstance(value, str) else value


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, list):  # a list of names; one name alone is a list of one
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(
            isinstance(item, str) and item for item in items
        ):
            raise ConfigError(f"{name} must be a list of names, got {value!r}")
        return list(items)
    if default is None or value is None:
        return value if value is None else str(value)
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}")
    return value
