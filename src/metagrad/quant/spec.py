"""What to quantize and how: :class:`QuantSpec` (one tensor) and :class:`QuantConfig` (a layer).

The bottom of the package: specs are plain frozen values, validated when built, that every other
layer reads. ``str(spec)`` writes a spec in the spec syntax and :meth:`QuantSpec.parse` reads it
back (see :class:`QuantSpec`). A config names its backend; backends register themselves in
:data:`BACKENDS` (from :mod:`metagrad.backward`), so a config is checked against the backend it
names without this module importing any backend.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from metagrad.quant.formats import FULL_PRECISION_NAMES, IntFormat, NumberFormat, get_format
from metagrad.quant.formats import list_formats as _list_formats
from metagrad.quant.scaling import get_scale_rule, list_scale_formats
from metagrad.quant.transforms import get_transform, list_transforms
from metagrad.registry import Registry


class BackendInfo(Protocol):
    """What a config reads of the backend it names (:class:`metagrad.backward.Backend`)."""

    operand_bits: int | None

    def check(self, config: QuantConfig) -> str | None: ...


BACKENDS: Registry[BackendInfo] = Registry("backend")
"""The registered backends by name; :func:`metagrad.backward.register_backend` fills it."""

Rounding = Literal["nearest", "stochastic"]
Granularity = Literal["tensor", "channel", "sample", "block"]

ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
INTEGER_GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "sample")
GRANULARITIES: tuple[str, ...] = (*INTEGER_GRANULARITIES, "block")
FULL_PRECISION_BITS = 32
MIN_BITS, MAX_BITS = 2, 8
MAX_BLOCK_SIZE = 1 << 16
DEFAULT_BLOCK_SIZE = 32
DEFAULT_TRANSFORM_BLOCK = 128
SEPARATOR = ":"
"""Between the tokens of a spec string."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one kind of tensor: number format, scaling, rounding and a transform.

    Args:
        bits: integer formats: 2 to 8, or 32 meaning "leave in full precision" (ignored when
            ``format`` names another format).
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased).
        granularity: one scale for the whole ``"tensor"``, one per ``"channel"`` (the axis is
            given when quantizing: dim 1 for a convolution's error, the last dim for a linear
            layer's), one per ``"sample"`` (dim 0), or one per ``"block"`` of ``block_size``
            elements along the product's contraction axis (MX and NVFP4 scaling).
        format: a registered number format (:mod:`metagrad.quant.formats`: ``"fp8_e5m2"``,
            ``"fp4_e2m1"``, ``"log4"``, ...); None: the integers of ``bits`` bits. An integer
            format given by name (``"int4"``) is the same spec as ``bits=4``.
        block_size: elements per scale when ``granularity`` is ``"block"``.
        scale_format: a registered scale format (:mod:`metagrad.quant.scaling`): ``"float32"``
            scales; ``"e8m0"``: powers of two (MX), rounded up so that no element is clipped;
            ``"e4m3"``: FP8 E4M3 scales under one float32 scale per tensor (NVFP4's two
            levels), rounded up likewise.
        transform: a registered orthogonal transform (:mod:`metagrad.quant.transforms`: ``"rht"``,
            ``"bhq"``) applied before quantization and undone after; None for none.
        transform_block: the transform's block (``rht``) or group (``bhq``) size.

    Settings that do not apply take their defaults, so that two specs that quantize alike are
    equal: a full-precision spec is ``QuantSpec()`` whatever else it was given, ``bits`` is 32
    under a non-integer ``format``, ``block_size`` is 32 without ``"block"`` granularity and
    ``transform_block`` 128 without a transform.

    Text (``str(spec)``, :meth:`parse`): tokens joined by ``:``, the number format first, then
    any of (in any order, each at most once; defaults left out)

    - a granularity: ``tensor`` (default), ``channel``, ``sample`` or ``block<N>`` (``block``
      alone: 32 elements per scale);
    - a scale format: ``float32`` (default), ``e8m0``, ``e4m3`` or another registered one;
    - a rounding: ``nearest`` (default) or ``stochastic``;
    - a transform with its block: ``rht<N>``, ``bhq<N>`` or another registered one (the name
      alone: block 128).

    ``fp32`` (or ``off``) alone is full precision. ``str`` writes this order, with block sizes
    always given: ``fp4_e2m1:block32:e8m0:stochastic:rht32``, ``int4:sample:stochastic``,
    ``fp8_e5m2``, ``fp32``.
    """

    bits: int = FULL_PRECISION_BITS
    rounding: Rounding = "nearest"
    granularity: Granularity = "tensor"
    format: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    scale_format: str = "float32"
    transform: str | None = None
    transform_block: int = DEFAULT_TRANSFORM_BLOCK

    def __post_init__(self) -> None:
        if self.format is not None:
            fmt = get_format(self.format)  # raises on an unknown name
            if isinstance(fmt, IntFormat):  # "int4" is bits=4
                object.__setattr__(self, "bits", fmt.bits)
                object.__setattr__(self, "format", None)
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be an integer, got {bits!r}")
        if bits != FULL_PRECISION_BITS and not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"bits must be {MIN_BITS}..{MAX_BITS}, or {FULL_PRECISION_BITS} for full "
                f"precision; got {bits}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an integer in 1..{MAX_BLOCK_SIZE}, got {size!r}")
        get_scale_rule(self.scale_format)  # raises on an unknown name
        if self.transform is not None:
            get_transform(self.transform, self.transform_block)  # validates name and size
        self._drop_unused_settings()

    def _drop_unused_settings(self) -> None:
        """Give the settings that do not apply their defaults (see the class docs)."""
        if not self.enabled:
            for f in dataclasses.fields(self):
                object.__setattr__(self, f.name, f.default)
            return
        if self.format is not None:
            object.__setattr__(self, "bits", FULL_PRECISION_BITS)
        if self.granularity != "block":
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)
        if self.transform is None:
            object.__setattr__(self, "transform_block", DEFAULT_TRANSFORM_BLOCK)

    @property
    def enabled(self) -> bool:
        """Whether this spec quantizes at all."""
        return self.format is not None or self.bits != FULL_PRECISION_BITS

    @property
    def number_format(self) -> NumberFormat:
        """The format values are rounded to (an enabled spec only)."""
        return get_format(self.format) if self.format is not None else IntFormat(self.bits)

    @property
    def is_integer(self) -> bool:
        """Symmetric integers with float32 scales per tensor, channel or sample, no transform.

        These are the specs of the integer codes path (:func:`quantize_codes`, the ``int8``
        backend, the exact low-precision products); every other spec is simulated by
        :func:`quantize_along`.
        """
        return (
            self.format is None
            and self.granularity != "block"
            and self.scale_format == "float32"
            and self.transform is None
        )

    @property
    def qmax(self) -> int:
        """Largest code magnitude of an integer spec: codes lie in ``[-qmax, qmax]``."""
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, object]:
        """The spec as plain values (what summary.json records)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if not self.enabled:
            return FULL_PRECISION_NAMES[0]
        tokens = [self.format or f"int{self.bits}"]
        if self.granularity == "block":
            tokens.append(f"block{self.block_size}")
        elif self.granularity != "tensor":
            tokens.append(self.granularity)
        if self.scale_format != "float32":
            tokens.append(self.scale_format)
        if self.rounding != "nearest":
            tokens.append(self.rounding)
        if self.transform is not None:
            tokens.append(f"{self.transform}{self.transform_block}")
        return SEPARATOR.join(tokens)

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """The spec that ``text`` writes (the syntax of the class docs; ``str`` inverts it).

        Raises:
            ValueError: one line naming the token that is wrong and the choices.
        """
        if not isinstance(text, str):
            raise ValueError(f"a spec is a string such as 'int4:stochastic', got {text!r}")
        head, *options = [token.strip() for token in text.strip().split(SEPARATOR)]
        if head in FULL_PRECISION_NAMES:
            if options:
                raise ValueError(f"spec {text!r}: {head} (full precision) takes no options")
            return cls()
        if head not in _list_formats():
            choices = ", ".join([*FULL_PRECISION_NAMES, *_list_formats()])
            raise ValueError(f"spec {text!r}: unknown number format {head!r}; available: {choices}")
        settings: dict[str, Any] = {"format": head}
        for token in options:
            for name, value in _parse_option(text, token).items():
                if name in settings:
                    raise ValueError(f"spec {text!r}: {token!r} gives the {_ROLE[name]} again")
                settings[name] = value
        try:
            return cls(**settings)
        except ValueError as err:
            raise ValueError(f"spec {text!r}: {err}") from None


_ROLE = {
    "granularity": "granularity",
    "block_size": "granularity",
    "scale_format": "scale format",
    "rounding": "rounding",
    "transform": "transform",
    "transform_block": "transform",
}
_SIZED = re.compile(r"(?P<name>.*?)(?P<size>[0-9]+)")


def _parse_option(text: str, token: str) -> dict[str, Any]:
    """The settings one option token of the spec ``text`` gives (see :class:`QuantSpec`)."""
    sized = _SIZED.fullmatch(token)
    name, size = (sized["name"], int(sized["size"])) if sized else (token, None)
    readings = []
    if token in ROUNDINGS:
        readings.append({"rounding": token})
    if token in INTEGER_GRANULARITIES:
        readings.append({"granularity": token})
    if name == "block":
        block = DEFAULT_BLOCK_SIZE if size is None else size
        readings.append({"granularity": "block", "block_size": block})
    if token in list_scale_formats():
        readings.append({"scale_format": token})
    if name in list_transforms():
        block = DEFAULT_TRANSFORM_BLOCK if size is None else size
        readings.append({"transform": name, "transform_block": block})
    if len(readings) == 1:
        return readings[0]
    if readings:
        roles = " and ".join(sorted({_ROLE[next(iter(r))] for r in readings}))
        raise ValueError(f"spec {text!r}: option {token!r} is ambiguous (both {roles})")
    if not token:
        raise ValueError(f"spec {text!r}: empty option (two '{SEPARATOR}' in a row?)")
    raise ValueError(
        f"spec {text!r}: unknown option {token!r}; expected a granularity "
        f"({', '.join(INTEGER_GRANULARITIES)}, block<N>), a scale format "
        f"({', '.join(list_scale_formats())}), a rounding ({', '.join(ROUNDINGS)}) or a "
        f"transform ({', '.join(f'{t}<N>' for t in list_transforms())})"
    )


OPERAND_BITS = 8
"""Bits of a backward product's other operand when it is quantized (the ``int8`` backend's)."""
OPERAND_BITS_CHOICES: tuple[int, ...] = (OPERAND_BITS, FULL_PRECISION_BITS)

PRODUCT_SPECS = ("grad_for_weight_grad", "weight_for_input_grad", "input_for_weight_grad")
FULL_PRECISION_BACKWARD: dict[str, Any] = {
    "grad": QuantSpec(),
    **dict.fromkeys(PRODUCT_SPECS),
    "backward_operand_bits": FULL_PRECISION_BITS,
}
"""The fields of a :class:`QuantConfig` that say how its backward products are quantized, with
the values of a full-precision backward pass."""
BACKWARD_FIELDS = tuple(FULL_PRECISION_BACKWARD)
SPEC_FIELDS = ("grad", "weight", "activation", *PRODUCT_SPECS)


@dataclass(frozen=True)
class QuantConfig:
    """Every low-precision setting of a quantized layer.

    Args:
        grad: quantizer of the backward error ``dL/dy`` (32 bits: full-precision backward), in
            both backward products unless ``grad_for_weight_grad`` is given. Stochastic
            rounding by default: rounding to nearest biases every small gradient component
            towards zero, and the bias accumulates over training.
        weight: forward quantizer of the weight, one scale per output channel by default.
        activation: forward quantizer of the layer input.
        backend: a registered backend (:mod:`metagrad.backward`): ``"simulate"`` (quantize,
            then compute in float) or ``"int8"`` (integer products; :mod:`metagrad.backward.int8`).
        backward_operand_bits: bits of the other operand of each backward product (the weight
            for ``dL/dx``, the layer input for ``dL/dW``) under ``"simulate"``: 32 keeps it in
            full precision; 8 quantizes it exactly as the ``"int8"`` backend does (same folding
            of the error's scale, same codes and scales) but computes in float, so simulate
            reproduces int8's numbers. The ``"int8"`` backend always uses 8-bit operands.
        grad_for_weight_grad: the error's quantizer in ``dL/dW`` (None: ``grad``).
        weight_for_input_grad: the weight's quantizer in ``dL/dx`` (None: as
            ``backward_operand_bits`` says).
        input_for_weight_grad: the layer input's quantizer in ``dL/dW`` (None: likewise).

    With integer ``grad`` specs and no per-product spec, the backward products run on the
    error's integer codes (exact in bf16, scales in float32: :mod:`metagrad.backward.products`); any
    other combination is emulated per product (:mod:`metagrad.backward.emulated`).
    """

    grad: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, rounding="stochastic"))
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(granularity="channel"))
    activation: QuantSpec = field(default_factory=QuantSpec)
    backend: str = "simulate"
    backward_operand_bits: int = FULL_PRECISION_BITS
    grad_for_weight_grad: QuantSpec | None = None
    weight_for_input_grad: QuantSpec | None = None
    input_for_weight_grad: QuantSpec | None = None

    def __post_init__(self) -> None:
        for name in ("grad", "weight", "activation"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec")
        for name in PRODUCT_SPECS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec or None")
        if self.backward_operand_bits not in OPERAND_BITS_CHOICES:
            raise ValueError(
                f"backward_operand_bits must be one of {OPERAND_BITS_CHOICES}, "
                f"got {self.backward_operand_bits!r}"
            )
        reason = BACKENDS.lookup(self.backend).check(self)  # an unknown name raises here
        if reason is not None:
            raise ValueError(reason)
        explicit = self.weight_for_input_grad or self.input_for_weight_grad
        if explicit is not None and self.backward_operand_bits != FULL_PRECISION_BITS:
            raise ValueError(
                "give either backward_operand_bits or per-product operand specs, not both"
            )
        for name in ("weight", "activation"):
            if not getattr(self, name).is_integer:
                raise ValueError(
                    f"QuantConfig.{name} (forward quantization) takes integer specs, "
                    f"got {getattr(self, name)}"
                )

    @classmethod
    def from_specs(cls, **settings: Any) -> QuantConfig:
        """A config whose spec fields may be given as spec strings (:meth:`QuantSpec.parse`).

        ``QuantConfig.from_specs(grad="fp4_e2m1:block16:e4m3:stochastic",
        input_for_weight_grad="int8")``; other fields (``backend``, ...) as in the constructor.
        """
        for name in SPEC_FIELDS:
            if isinstance(settings.get(name), str):
                settings[name] = QuantSpec.parse(settings[name])
        return cls(**settings)

    def with_backward_of(self, other: QuantConfig, **changes: Any) -> QuantConfig:
        """This config with ``other``'s backward quantization (:data:`BACKWARD_FIELDS`).

        ``changes``: fields to replace at the same time, backward ones included (they take
        precedence); the result is validated once.
        """
        backward = {name: getattr(other, name) for name in BACKWARD_FIELDS}
        return dataclasses.replace(self, **{**backward, **changes})

    def without_backward(self, **changes: Any) -> QuantConfig:
        """This config with a full-precision backward pass (and ``changes``, as above)."""
        return dataclasses.replace(self, **{**FULL_PRECISION_BACKWARD, **changes})

    @property
    def uses_integer_path(self) -> bool:
        """Whether the backward runs on the error's integer codes (else it is emulated)."""
        return (
            self.grad.is_integer
            and self.grad_for_weight_grad in (None, self.grad)
            and self.weight_for_input_grad is None
            and self.input_for_weight_grad is None
        )

    @property
    def backward_specs(self) -> tuple[QuantSpec, QuantSpec, QuantSpec, QuantSpec]:
        """The four backward operands' specs: error and weight in ``dL/dx``... resolved.

        In order: the error in ``dL/dx``, the error in ``dL/dW``, the weight in ``dL/dx``, the
        layer input in ``dL/dW``.
        """
        operand = (
            QuantSpec(bits=OPERAND_BITS)
            if self.backward_operand_bits != FULL_PRECISION_BITS
            else QuantSpec()
        )
        return (
            self.grad,
            self.grad_for_weight_grad or self.grad,
            self.weight_for_input_grad or operand,
            self.input_for_weight_grad or operand,
        )

    @property
    def quantizes_backward(self) -> bool:
        """Whether either backward product quantizes anything."""
        explicit = (self.weight_for_input_grad, self.input_for_weight_grad)
        return any(spec.enabled for spec in self.backward_specs[:2]) or any(
            spec is not None and spec.enabled for spec in explicit
        )

    @property
    def quantizes_forward(self) -> bool:
        """Whether the forward pass quantizes the weight or the layer input (QAT)."""
        return self.weight.enabled or self.activation.enabled

    @property
    def quantizes_operands(self) -> bool:
        """Whether the backward products use 8-bit operands (a backend that always does, such as
        ``int8``, or ``backward_operand_bits=8``).

        Never without quantized gradients (``backward_operand_bits`` is then ignored).
        """
        always = BACKENDS.lookup(self.backend).operand_bits is not None
        eight = always or self.backward_operand_bits != FULL_PRECISION_BITS
        return self.grad.enabled and eight and self.uses_integer_path

    def to_dict(self) -> dict[str, object]:
        """The resolved settings as plain values (what summary.json records)."""
        err_x, err_w, w_spec, x_spec = self.backward_specs
        return {
            "backend": self.backend,
            "grad_for_input_grad": err_x.to_dict(),
            "grad_for_weight_grad": err_w.to_dict(),
            "weight_for_input_grad": w_spec.to_dict(),
            "input_for_weight_grad": x_spec.to_dict(),
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "path": "integer codes" if self.uses_integer_path else "emulated",
        }

    def __str__(self) -> str:
        text = (
            f"grad={self.grad}, weight={self.weight}, activation={self.activation}, "
            f"backend={self.backend}"
        )
        if self.backward_operand_bits != FULL_PRECISION_BITS:
            text += f", backward_operands=int{self.backward_operand_bits}"
        for name in PRODUCT_SPECS:
            if getattr(self, name) is not None:
                text += f", {name}={getattr(self, name)}"
        return text
