"""The training run's settings: one dataclass, validated once, loadable from YAML/TOML and flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from metagrad.backward.backend import list_backends
from metagrad.models import list_models
from metagrad.quant.presets import list_presets, preset_config
from metagrad.quant.spec import INTEGER_GRANULARITIES, ROUNDINGS, QuantConfig, QuantSpec

METHODS = ("plain", "metagrad")
OPTIMIZERS = ("sgd", "adam")
HYPERNETS = ("grad", "grad+weight", "lstm")
HYPER_FORMS = ("residual", "gain", "signed-gain")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "off", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "kernels", "model")
NONFINITE_POLICIES = ("stop", "skip")
COMM_BITS = (32, 16, 8, 4)

MAX_SEED = 2**32 - 1  # the digits split (scikit-learn) takes seeds in [0, 2**32)
MAX_WIDTH = 16.0  # a sanity bound: parameter counts grow with the square of the width
MAX_THREADS = 4096  # torch.set_num_threads takes a C int; no machine has more cores
MAX_HYPER_HIDDEN = 4096  # a sanity bound on the hypernetwork's hidden width
MAX_HYPER_HORIZON = 64  # each step runs the hypernetwork this many times


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (each field is also a command-line flag)."""

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
    weight_bits: int = 32
    act_bits: int = 32
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
    threads: int = 0
    nonfinite: str = "stop"
    comm_bits: int = 32
    max_steps: int = 0
    out: str = "runs/default"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self._validate_numbers()
        _choice("model", self.model, tuple(list_models()))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("method", self.method, METHODS)
        _choice("hyper", self.hyper, HYPERNETS)
        _choice("hyper_form", self.hyper_form, HYPER_FORMS)
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("compile", self.compile, COMPILE_MODES)
        _choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
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
            not (self.amp == "fp16" and self.method == "metagrad"),
            "amp 'fp16' needs loss scaling, which MetaGrad's step does not do; use amp 'bf16'",
        )
        _choice("backend", self.backend, tuple(list_backends()))
        _choice("grad_rounding", self.grad_rounding, ROUNDINGS)
        _choice("grad_granularity", self.grad_granularity, INTEGER_GRANULARITIES)
        if self.grad_quant is not None:
            _choice("grad_quant", self.grad_quant, tuple(list_presets()))
            custom = {
                "grad_bits": (self.grad_bits, 32),
                "grad_rounding": (self.grad_rounding, "stochastic"),
                "grad_granularity": (self.grad_granularity, "tensor"),
            }
            for name, (value, default) in custom.items():
                _require(
                    value == default,
                    f"grad_quant {self.grad_quant!r} fixes the gradient quantizer; "
                    f"{name} {value!r} would be ignored (give one or the other)",
                )
        try:
            self.quant_config()
        except ValueError as err:
            raise ConfigError(str(err)) from None

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
        _require(self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        _require(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}")

    def quant_config(self) -> QuantConfig:
        """The layers' quantization settings."""
        config = QuantConfig(
            grad=QuantSpec(self.grad_bits, self.grad_rounding, self.grad_granularity),
            weight=QuantSpec(self.weight_bits, "nearest", "channel"),
            activation=QuantSpec(self.act_bits, "nearest", "tensor"),
        )
        if self.grad_quant is not None:
            config = preset_config(self.grad_quant, config)
        return dataclasses.replace(config, backend=self.backend)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting's default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# Keys that may differ between a run and its resumption.
RESUMABLE_KEYS = frozenset(
    {"epochs", "max_steps", "resume", "progress", "out", "threads", "data", "compile", "nonfinite"}
)
# Keys of one invocation, not restored by --resume.
PER_INVOCATION_KEYS = frozenset({"max_steps", "progress", "resume", "out"})
# Keys that only matter with method "metagrad".
HYPER_KEYS = frozenset({"hyper", "hyper_form", "hyper_hidden", "hyper_lr", "hyper_horizon"})

HELP = {
    "model": "model name from the registry (vgg16, resnet20, resnet56, mobilenetv2, small_cnn, "
    "vit_tiny; gpt_char: a character language model)",
    "width": "width multiplier of the model's channels",
    "data": "CIFAR-10 (python release .tar.gz or folder, image-folder dir or .zip) or 'digits'; "
    "for gpt_char a UTF-8 text file or 'pydoc' (the default: Python's documentation)",
    "download": "download the CIFAR-10 python release into --data if it is not there",
    "warmup_epochs": "linear learning-rate warm-up, then cosine decay to zero",
    "grad_bits": "bits of the backward error (2..8, or 32 for full precision)",
    "grad_quant": "a published gradient quantizer by name (plain, psq, bhq, luq, rht-mxfp4, "
    "rht-nvfp4, fp8-e5m2); replaces --grad-bits/--grad-rounding/--grad-granularity",
    "weight_bits": "forward (QAT) bits of weights, 32 = off",
    "act_bits": "forward (QAT) bits of activations, 32 = off",
    "backend": "simulate (float products) or int8 (integer products)",
    "fp_first_last": "keep the first conv and the classifier unquantized",
    "method": "plain quantized gradients or MetaGrad's hypernetwork correction",
    "hyper": "hypernetwork kind (MetaGrad)",
    "hyper_form": "residual correction, or a gain per element (odd in g, keeps zeros) seeing "
    "|g| (gain) or g * sign(W) (signed-gain)",
    "hyper_hidden": "hypernetwork hidden width (MetaGrad)",
    "hyper_lr": "hypernetwork learning rate, Adam (MetaGrad)",
    "hyper_horizon": "updates the hypernetwork is trained through: 1 (the one-step method) or K "
    "(the loss after its last K updates, recomputed each step; MetaGrad)",
    "diag_every": "every N steps, compare used and full-precision gradients (gradients.jsonl)",
    "amp": "mixed precision: off, bf16 or fp16 (fp16 with loss scaling); auto: bf16 on CUDA, "
    "off on CPU",
    "compile": "torch.compile: off, kernels (fused quantizer and hypernetwork), model (kernels "
    "and the model's training forward, method plain); auto: kernels where torch.compile works",
    "threads": "torch CPU threads (0: torch's default)",
    "nonfinite": "a step with a non-finite loss or gradient: stop the run before applying it, "
    "or skip it and count it (summary.json: nonfinite_steps)",
    "comm_bits": "under torchrun: bits of the gradient all-reduce (32; 16: bfloat16; 8 or 4: "
    "stochastically rounded integers with block scales)",
    "max_steps": "stop after this many steps in total (0: no limit)",
    "out": "run directory (metrics.jsonl, summary.json, checkpoint.pt)",
    "resume": "continue the run in --out with its saved settings; only epochs, max-steps, "
    "data, threads, progress, compile and nonfinite may be given again",
    "progress": "show a progress bar",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are suppressed so that only given flags override a file."""
    parser.add_argument("--config", help="YAML or TOML file with the same keys as the flags")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": HELP.get(f.name, "")}
        default = f.default
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(default) if default is not None else str
            kwargs["metavar"] = f.name.upper()
        if kwargs["help"] is not None:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file (keys with - or _), checked against the known fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
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
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    for name, value in values.items():
        values[name] = _coerce(name, value, known[name].default)
    return TrainConfig(**values)


def resume_config(saved: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """The settings of a resumed run: the saved ones, with the given ``RESUMABLE_KEYS``.

    Other given keys must equal the saved values; a setting the checkpoint predates takes its
    default, and so do the settings of one invocation (``PER_INVOCATION_KEYS``: a run stopped
    by ``--max-steps`` and resumed without it trains to the end).
    """
    defaults = TrainConfig.defaults()
    saved = {**defaults, **saved, **{k: defaults[k] for k in PER_INVOCATION_KEYS}}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    fixed = {k: v for k, v in given.items() if k not in RESUMABLE_KEYS}
    coerced = {k: _coerce(k, v, TrainConfig.defaults()[k]) for k, v in fixed.items()}
    changed = sorted(k for k, v in coerced.items() if saved.get(k) != v)
    if changed:
        diffs = ", ".join(f"{k} (saved {saved.get(k)!r}, given {coerced[k]!r})" for k in changed)
        raise ConfigError(
            f"--resume continues the run with its saved settings; these cannot change: {diffs}"
        )
    resumable = {k: v for k, v in given.items() if k in RESUMABLE_KEYS}
    return build_config({**resumable, "resume": True}, {k: saved[k] for k in known})


def _coerce(name: str, value: Any, default: Any) -> Any:
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
