"""What to quantize and how: :class:`QuantSpec` (one tensor) and :class:`QuantConfig` (a layer).

The bottom of the package: specs are plain frozen values, validated when built, that every other
layer reads. ``str(spec)`` writes a spec in the spec syntax and :meth:`QuantSpec.parse` reads it
back (see :class:`QuantSpec`). A config names its backend; backends register themselves in
:data:`BACKENDS` (from :mod:`metagrad.backward`), so a config is checked against the backend it
names without this module importing any backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from metagrad.quant.formats import (
    DITHER_BITS,
    FULL_PRECISION_NAMES,
    IntFormat,
    NumberFormat,
    dither_dtype,
    get_format,
)
from metagrad.quant.formats import list_formats as _list_formats
from metagrad.quant.scaling import DEFAULT_SCALE_ROUNDING, get_scale_rule
from metagrad.quant.syntax import (
    BLOCK_GRANULARITIES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_TRANSFORM_BLOCK,
    GRANULARITIES,
    INTEGER_GRANULARITIES,
    ROLE,
    ROUNDINGS,
    SEPARATOR,
    option_tokens,
    parse_option,
)
from metagrad.quant.transforms import get_transform
from metagrad.registry import Registry


class BackendInfo(Protocol):
    """What a config reads of the backend it names (:class:`metagrad.backward.Backend`)."""

    operand_bits: int | None

    def check(self, config: QuantConfig) -> str | None: ...


BACKENDS: Registry[BackendInfo] = Registry("backend")
"""The registered backends by name; :func:`metagrad.backward.register_backend` fills it."""

Rounding = Literal["nearest", "stochastic"]
Granularity = Literal["tensor", "channel", "sample", "block", "tile"]
ScaleRounding = Literal["up", "floor", "nearest"]

FULL_PRECISION_BITS = 32
MIN_BITS, MAX_BITS = 2, 8
MAX_BLOCK_SIZE = 1 << 16


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one kind of tensor: number format, scaling, rounding and a transform.

    Args:
        bits: integer formats: 2 to 8, or 32 meaning "leave in full precision" (ignored when
            ``format`` names another format).
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased).
        granularity: one scale for the whole ``"tensor"``, one per ``"channel"`` (the axis is
            given when quantizing: dim 1 for a convolution's error, the last dim for a linear
            layer's), one per ``"sample"`` (dim 0), one per ``"block"`` of ``block_size``
            elements along the product's contraction axis (MX and NVFP4 scaling), or one per
            ``"tile"`` of ``block_size`` x ``block_size`` elements of the tensor laid out as a
            matrix with the contraction axis last (NVFP4's 2-D weight scaling: a linear layer's
            weight has the same tiles in both of its products).
        format: a registered number format (:mod:`metagrad.quant.formats`: ``"fp8_e5m2"``,
            ``"fp4_e2m1"``, ``"log4"``, ...); None: the integers of ``bits`` bits. An integer
            format given by name (``"int4"``) is the same spec as ``bits=4``.
        block_size: elements per scale (per side of a tile) under ``"block"`` (``"tile"``).
        scale_format: a registered scale format (:mod:`metagrad.quant.scaling`): ``"float32"``
            scales; ``"e8m0"``: powers of two (MX); ``"e4m3"``: FP8 E4M3 scales under one
            float32 scale per tensor (NVFP4's two levels).
        scale_rounding: how the scale is rounded onto its scale format: ``"up"`` (so that no
            element clips; the default), ``"floor"`` (``e8m0``: the OCP MX v1.0 rule) or
            ``"nearest"`` (``e4m3``: NVIDIA's NVFP4 rule); elements past the format's largest
            value saturate.
        dither_bits: random bits per element of stochastic rounding, 8 (the fast default:
            unbiased to 1/512 of a step) or 16 (for formats that underflow stochastically).
        prescale: a factor in ``(0, 1]`` that the values are multiplied by after scaling and
            divided by after rounding (Tseng et al.'s 3/4, which keeps OCP-scaled FP4 values
            from clipping); 1: none.
        transform: a registered orthogonal transform (:mod:`metagrad.quant.transforms`: ``"rht"``,
            ``"bhq"``) applied before quantization and undone after; None for none.
        transform_block: the transform's block (``rht``) or group (``bhq``) size.

    Settings that do not apply take their defaults, so that two specs that quantize alike are
    equal: a full-precision spec is ``QuantSpec()`` whatever else it was given, ``bits`` is 32
    under a non-integer ``format``, ``block_size`` is 32 without ``"block"`` or ``"tile"``
    granularity, ``dither_bits`` is 8 under nearest rounding and ``transform_block`` 128
    without a transform.

    Text (``str(spec)``, :meth:`parse`): tokens joined by ``:``, the number format first, then
    any of (in any order, each at most once; defaults left out)

    - a granularity: ``tensor`` (default), ``channel``, ``sample``, ``block<N>`` or
      ``tile<N>`` (the name alone: 32);
    - a scale format: ``float32`` (default), ``e8m0``, ``e4m3`` or another registered one,
      with its scale rounding after a ``-`` where it is not ``up``: ``e8m0-floor``,
      ``e4m3-nearest``;
    - a rounding: ``nearest`` (default) or ``stochastic``;
    - ``dither<bits>``: ``dither16`` (``dither8`` is the default);
    - ``pre<factor>``: ``pre0.75``;
    - a transform with its block: ``rht<N>``, ``bhq<N>`` or another registered one (the name
      alone: block 128).

    ``fp32`` (or ``off``) alone is full precision. ``str`` writes this order, with block sizes
    always given: ``fp4_e2m1:block32:e8m0-floor:stochastic:pre0.75:rht64``,
    ``int4:sample:stochastic``, ``log4:stochastic:dither16``, ``fp32``.
    """

    bits: int = FULL_PRECISION_BITS
    rounding: Rounding = "nearest"
    granularity: Granularity = "tensor"
    format: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    scale_format: str = "float32"
    transform: str | None = None
    transform_block: int = DEFAULT_TRANSFORM_BLOCK
    scale_rounding: ScaleRounding = DEFAULT_SCALE_ROUNDING
    dither_bits: int = DITHER_BITS
    prescale: float = field(default=1.0, compare=False)
    # prescale as integers, which equality and compiled code read instead: under
    # torch.compile(dynamic=True) a float attribute is a symbolic input, which the backward of
    # an autograd.Function cannot capture
    prescale_ratio: tuple[int, int] = field(default=(1, 1), init=False, repr=False)

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
        get_scale_rule(self.scale_format, self.scale_rounding)  # raises on an unknown name
        if isinstance(self.dither_bits, bool) or not isinstance(self.dither_bits, int):
            raise ValueError(f"dither_bits must be an integer, got {self.dither_bits!r}")
        dither_dtype(self.dither_bits)  # raises on an unsupported resolution
        prescale = self.prescale
        if isinstance(prescale, bool) or not isinstance(prescale, (int, float)):
            raise ValueError(f"prescale must be a number in (0, 1], got {prescale!r}")
        if not 0 < prescale <= 1:
            raise ValueError(f"prescale must be in (0, 1], got {prescale!r}")
        object.__setattr__(self, "prescale", float(prescale))
        if self.transform is not None:
            get_transform(self.transform, self.transform_block)  # validates name and size
        self._drop_unused_settings()
        object.__setattr__(self, "prescale_ratio", self.prescale.as_integer_ratio())

    def _drop_unused_settings(self) -> None:
        """Give the settings that do not apply their defaults (see the class docs)."""
        if not self.enabled:
            for f in dataclasses.fields(self):
                object.__setattr__(self, f.name, f.default)
            return
        if self.format is not None:
            object.__setattr__(self, "bits", FULL_PRECISION_BITS)
        if self.granularity not in BLOCK_GRANULARITIES:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)
        if self.rounding == "nearest":
            object.__setattr__(self, "dither_bits", DITHER_BITS)
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
            and self.granularity in INTEGER_GRANULARITIES
            and self.scale_format == "float32"
            and self.prescale_ratio == (1, 1)
            and self.transform is None
        )

    @property
    def qmax(self) -> int:
        """Largest code magnitude of an integer spec: codes lie in ``[-qmax, qmax]``."""
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, object]:
        """The spec as plain values (what summary.json records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __str__(self) -> str:
        if not self.enabled:
            return FULL_PRECISION_NAMES[0]
        return SEPARATOR.join([self.format or f"int{self.bits}", *option_tokens(self)])

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
            for name, value in parse_option(text, token).items():
                if name in settings:
                    raise ValueError(f"spec {text!r}: {token!r} gives the {ROLE[name]} again")
                settings[name] = value
        try:
            return cls(**settings)
        except ValueError as err:
            raise ValueError(f"spec {text!r}: {err}") from None


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
        weight: forward quantizer of the weight, one scale per output channel by default; blocks
            and tiles run along the input features (a convolution's input channels, per
            kernel tap: the contraction axis of an implicit GEMM on channels-last data).
        activation: forward quantizer of the layer input (blocks along its features, or a
            convolution's channels). Any spec under ``"simulate"`` with full-precision
            ``backward_operand_bits``; integer specs otherwise.
        backend: a registered backend (:mod:`metagrad.backward`): ``"simulate"`` (quantize,
            then compute in float) or ``"int8"`` (integer products; :mod:`metagrad.backward.int8`).
        backward_operand_bits: bits of the other operand of each backward product (the weight
            for ``dL/dx``, the layer input for ``dL/dW``) under ``"simulate"``: 32 keeps it in
            full precision; 8 quantizes it exactly as the ``"int8"`` backend does (same folding
            of the error's scale, same codes and scales) but computes in float, so simulate
            reproduces int8's numbers. The ``"int8"`` backend always uses 8-bit operands.
        grad_for_weight_grad: the error's quantizer in ``dL/dW`` (None: ``grad``).
        weight_for_input_grad: the weight's quantizer in ``dL/dx`` (None: as
            ``backward_operand_bits`` says: the forward pass's weight, quantized there if
            ``weight`` says so, or 8-bit codes). Given, it quantizes the full-precision weight,
            as hardware recipes quantize a transposed operand from its high-precision copy.
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
        eight = BACKENDS.lookup(self.backend).operand_bits is not None
        if eight or self.backward_operand_bits != FULL_PRECISION_BITS:
            for name in ("weight", "activation"):
                if not getattr(self, name).is_integer:
                    raise ValueError(
                        f"QuantConfig.{name} (forward quantization) takes integer specs with "
                        f"8-bit backward operands (backend {self.backend!r}, "
                        f"backward_operand_bits {self.backward_operand_bits}), got "
                        f"{getattr(self, name)}"
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
    def requantizes_operands(self) -> bool:
        """Whether a backward product quantizes, with its own spec, an operand that the
        forward pass quantizes too: the layer then keeps the full-precision operand for it."""
        return (self.weight.enabled and self.weight_for_input_grad is not None) or (
            self.activation.enabled and self.input_for_weight_grad is not None
        )

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
