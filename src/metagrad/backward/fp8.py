"""The ``fp8`` backend: a linear layer's backward products as FP8 GEMMs (``torch._scaled_mm``).

The production FP8 training recipe (torchao's float8 training, NVIDIA Transformer Engine): for
``y = x W^T`` and the error ``e = dL/dy``, each backward product multiplies FP8 codes on the
tensor cores with float32 accumulation, and the scales are applied to the result:

* the error, with the gradient spec of that product (``fp8_e5m2`` as the ``fp8-e5m2`` preset, or
  ``fp8_e4m3``), its codes and float32 scales exactly as :func:`metagrad.quant.quantize_along`
  computes them (:func:`metagrad.quant.quantize.quantize_float_codes`);
* the other operand (the weight in ``dL/dx = e W``, the layer input in ``dL/dW = e^T x``)
  quantized to FP8 E4M3 with its own float32 scale per tensor, rounded to nearest
  (:data:`OPERAND_SPEC`), unless the config gives FP8 specs of its own
  (``weight_for_input_grad``, ``input_for_weight_grad``).

A scale per row of a product's first operand or per column of its second (the error's
per-channel scales in ``dL/dW``, its per-sample scales in ``dL/dx``) is a row-wise scale of
``_scaled_mm``; a scale on a product's contraction axis cannot be applied to the result, so that
product multiplies the dequantized codes in float32 instead. Everything else takes the bf16
route: the ``simulate`` backend's products on the same config (in the autocast dtype under mixed
precision; the operands as the config says, full precision unless it gives specs), for
convolutions, gradient specs that are not FP8 with one scale per tensor, channel or sample
(integer, FP4, block scales, transforms), and devices without FP8 GEMMs. CUDA needs FP8
tensor cores (compute capability 8.9: Ada, Hopper, Blackwell); PyTorch also runs
``_scaled_mm`` on the CPU, slowly, which is what the CPU tests use.
:meth:`Fp8.fallback_reason` (through :func:`metagrad.backward.fallback_report`) names each
layer that does not run all its products as FP8 GEMMs, and why.

``_scaled_mm``'s layout rules on CUDA (a row-major first operand, a column-major second one,
every dim a multiple of 16) are met by copying and zero-padding (:data:`LAYOUTS`: zeros add
nothing to the sums). Where ``_scaled_mm`` refuses a recipe on a device (some GPUs and PyTorch
versions take row-wise scales only with E4M3 codes, or only with bf16 outputs), the refusal is
kept in :data:`REFUSED` and the product multiplies the dequantized codes in float32: the same
numbers up to float32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad.backward.backend import Backend, Grads, get_backend, register_backend
from metagrad.quant.quantize import quantize_float_codes
from metagrad.quant.spec import FULL_PRECISION_BITS, QuantConfig, QuantSpec

FP8_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
"""The spec formats with a hardware FP8 dtype."""
OPERAND_SPEC = QuantSpec(format="fp8_e4m3")
"""The weight's and the layer input's spec in the backward products when the config gives
none: FP8 E4M3, one float32 scale per tensor, rounded to nearest."""
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS: dict[str, tuple[int, bool]] = {"cuda": (16, True)}
"""``device type -> (multiple every dim is padded to, whether the second operand must be
column-major)`` for ``torch._scaled_mm``; other devices take any shape and layout."""
REFUSED: dict[tuple[str, torch.dtype, torch.dtype, bool, torch.dtype], str] = {}
"""``(device type, first dtype, second dtype, row-wise, output dtype) -> error`` for each
recipe ``torch._scaled_mm`` refused here: those products run on the dequantized codes."""
MIN_CUDA_CAPABILITY = (8, 9)


def gemm_reason(spec: QuantSpec) -> str | None:
    """Why codes of ``spec`` cannot be an FP8 GEMM operand (None: they can)."""
    if not spec.enabled:
        return "full precision"
    if spec.format not in FP8_DTYPES:
        return f"{spec} is not an FP8 format ({', '.join(FP8_DTYPES)})"
    if spec.granularity == "block" or spec.transform is not None:
        return f"{spec} has block scales or a transform"
    return None


def device_reason(device: torch.device) -> str | None:
    """Why ``device`` runs no FP8 GEMMs (None: it does; on the CPU slowly, for testing)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no FP8 GEMMs on {device.type}"
    if torch.version.hip is not None:
        return "ROCm's FP8 GEMMs take the fnuz formats, not the OCP E4M3/E5M2 codes"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CUDA_CAPABILITY:
        return f"compute capability {capability} has no FP8 tensor cores (needs 8.9+)"
    return None


def fp8_specs(config: QuantConfig) -> tuple[QuantSpec, QuantSpec, QuantSpec, QuantSpec]:
    """The error's spec in ``dL/dx`` and in ``dL/dW``, the weight's and the layer input's."""
    err_x, err_w = config.backward_specs[:2]
    return (
        err_x,
        err_w,
        config.weight_for_input_grad or OPERAND_SPEC,
        config.input_for_weight_grad or OPERAND_SPEC,
    )


@dataclass
class Fp8Matrix:
    """A product's operand: FP8 codes as a matrix and their float32 scale, broadcasting against
    them as ``(1, 1)``, ``(rows, 1)`` or ``(1, cols)``."""

    codes: Tensor
    scale: Tensor

    def t(self) -> Fp8Matrix:
        return Fp8Matrix(self.codes.t(), self.scale.t())

    def dequantize(self) -> Tensor:
        """``codes * scale`` in float32: the operand's quantized values."""
        return self.codes.to(self.scale.dtype) * self.scale

    @property
    def rows_scaled(self) -> bool:
        """Whether the scale is constant along the columns (one per row or per tensor)."""
        return self.scale.shape[1] == 1 or self.codes.shape[1] == 1

    @property
    def columns_scaled(self) -> bool:
        """Whether the scale is constant along the rows (one per column or per tensor)."""
        return self.scale.shape[0] == 1 or self.codes.shape[0] == 1


def fp8_matrix(t: Tensor, spec: QuantSpec, channel_dim: int) -> Fp8Matrix:
    """``t`` quantized as ``spec`` says (``channel_dim``: the axis of per-channel scales), as a
    matrix of FP8 codes over its last dim."""
    codes, scale = quantize_float_codes(t, spec, channel_dim)
    cols = t.shape[-1] if t.dim() else 1
    matrix = codes.to(FP8_DTYPES[spec.format]).reshape(-1, cols)
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(1, 1)
    elif t.dim() and scale.shape[-1] == 1:  # one per row: per sample, or a weight's channel
        scale = scale.expand(*t.shape[:-1], 1).reshape(-1, 1)
    else:  # one per column
        scale = scale.reshape(1, cols)
    return Fp8Matrix(matrix, scale)


def dequantized_mm(a: Fp8Matrix, b: Fp8Matrix, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` as the product of the dequantized codes in float32 (what ``_scaled_mm``
    computes, up to float32 summation order)."""
    return a.dequantize().mm(b.dequantize()).to(out_dtype)


def _padded(t: Tensor, rows: int, cols: int, fill: float = 0.0) -> Tensor:
    if t.shape == (rows, cols):
        return t
    out = torch.full((rows, cols), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _scaled_mm(a: Fp8Matrix, b: Fp8Matrix, out_dtype: torch.dtype, rowwise: bool) -> Tensor:
    """``torch._scaled_mm`` of the codes, its scales per tensor or row-wise, laid out as the
    device needs (:data:`LAYOUTS`)."""
    (m, k), n = a.codes.shape, b.codes.shape[1]
    if rowwise:  # (m, 1) and (1, n), each with unit strides
        sa = a.scale.reshape(-1).expand(m).contiguous().view(m, 1)
        sb = b.scale.reshape(-1).expand(n).contiguous().view(1, n)
    else:
        sa, sb = a.scale.reshape(()), b.scale.reshape(())
    ca, cb = a.codes, b.codes
    align, column_major = LAYOUTS.get(ca.device.type, (1, False))
    if align > 1:
        m2, k2, n2 = (-(-size // align) * align for size in (m, k, n))
        ca, cb = _padded(ca, m2, k2), _padded(cb, k2, n2)
        if rowwise:
            sa, sb = _padded(sa, m2, 1, 1.0), _padded(sb, 1, n2, 1.0)
    if column_major:
        ca, cb = ca.contiguous(), cb.t().contiguous().t()
    out = torch._scaled_mm(ca, cb, sa, sb, out_dtype=out_dtype)
    return out[:m, :n]


def fp8_mm(a: Fp8Matrix, b: Fp8Matrix, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` as an FP8 GEMM where the scales allow it (per tensor, per row of ``a``, per
    column of ``b``) and ``_scaled_mm`` takes the recipe here; else :func:`dequantized_mm`."""
    if not (a.rows_scaled and b.columns_scaled) or 0 in (*a.codes.shape, b.codes.shape[1]):
        return dequantized_mm(a, b, out_dtype)
    rowwise = a.scale.numel() > 1 or b.scale.numel() > 1
    key = (a.codes.device.type, a.codes.dtype, b.codes.dtype, rowwise, out_dtype)
    if key not in REFUSED:
        try:
            return _scaled_mm(a, b, out_dtype, rowwise)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            REFUSED[key] = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    return dequantized_mm(a, b, out_dtype)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in OUT_DTYPES else torch.float32


def fp8_linear_backward(
    e: Tensor,
    x: Tensor,
    weight: Tensor,
    config: QuantConfig,
    mask: tuple[bool, bool, bool],
    dtypes: tuple[torch.dtype, ...],
) -> Grads:
    """``(dL/dx, dL/dW, dL/db)`` of ``F.linear`` from FP8 GEMMs (None where masked).

    The operands are quantized in the order and with the random draws of
    :func:`metagrad.backward.emulated.linear_backward`, so that the ``simulate`` backend with
    the same specs computes the same codes and scales.
    """
    need_x, need_w, need_b = mask
    err_x, err_w, w_spec, x_spec = fp8_specs(config)
    c_in = weight.shape[1]
    grad_x = grad_w = grad_b = None
    shared = None
    if err_x == err_w and need_x and (need_w or need_b):
        shared = fp8_matrix(e, err_x, -1)  # one quantized error for both products
    if need_x:
        # dL/dx = e W: contracts the output features
        eq = shared if shared is not None else fp8_matrix(e, err_x, -1)
        wq = fp8_matrix(weight, w_spec, 0)
        grad_x = fp8_mm(eq, wq, _out_dtype(dtypes[0])).reshape(*e.shape[:-1], c_in)
        grad_x = grad_x.to(dtypes[0])
    if need_w or need_b:
        # dL/dW = e^T x: contracts every leading dim (samples, tokens)
        eq = shared if shared is not None else fp8_matrix(e, err_w, -1)
        if need_w:
            xq = fp8_matrix(x, x_spec, -1)
            grad_w = fp8_mm(eq.t(), xq, _out_dtype(dtypes[1])).to(dtypes[1])
        if need_b:
            grad_b = eq.dequantize().sum(0).to(dtypes[2])
    return grad_x, grad_w, grad_b


def _bf16_route() -> Backend:
    return get_backend("simulate")


def _contraction_notes(config: QuantConfig) -> list[str]:
    """Which of a linear layer's products have a scale on their contraction axis."""
    err_x, err_w, w_spec, x_spec = fp8_specs(config)
    notes = []
    on_x = [f"the error's per-channel scales ({err_x})"] if err_x.granularity == "channel" else []
    if w_spec.granularity != "tensor":
        on_x.append(f"the weight's {w_spec.granularity} scales ({w_spec})")
    on_w = [f"the error's per-sample scales ({err_w})"] if err_w.granularity == "sample" else []
    if x_spec.granularity == "sample":
        on_w.append(f"the input's per-sample scales ({x_spec})")
    for product, parts in (("dL/dx", on_x), ("dL/dW", on_w)):
        if parts:
            notes.append(
                f"{product}: {' and '.join(parts)} lie on its contraction axis: float32 product "
                "of the dequantized FP8 codes"
            )
    return notes


class Fp8(Backend):
    """FP8 GEMMs (``torch._scaled_mm``) for linear layers with FP8 gradient specs; the
    ``simulate`` backend's products elsewhere."""

    def check(self, config: QuantConfig) -> str | None:
        err_x, err_w = config.backward_specs[:2]
        if not (err_x.enabled or err_w.enabled):
            return "backend 'fp8' needs quantized gradients (grad fp8_e5m2 or fp8_e4m3)"
        if config.backward_operand_bits != FULL_PRECISION_BITS:
            return (
                "backend 'fp8' quantizes the backward operands to FP8 E4M3 itself; "
                "leave backward_operand_bits at 32 or give FP8 operand specs"
            )
        for name in ("weight_for_input_grad", "input_for_weight_grad"):
            spec = getattr(config, name)
            if spec is not None and gemm_reason(spec) is not None:
                return (
                    f"backend 'fp8' takes FP8 operand specs (fp8_e4m3 or fp8_e5m2, one scale "
                    f"per tensor, channel or sample) or none; got {name}={spec} "
                    "(use backend 'simulate')"
                )
        return None

    def route_reason(self, config: QuantConfig, device: torch.device) -> str | None:
        """Why a linear layer with ``config`` on ``device`` takes the bf16 route (None: its
        products run as FP8 GEMMs)."""
        err_x, err_w = config.backward_specs[:2]
        for spec in dict.fromkeys((err_x, err_w)):
            reason = gemm_reason(spec)
            if reason is not None:
                return f"gradient spec: {reason}: bf16 route (simulate backend's products)"
        reason = device_reason(device)
        if reason is not None:
            return f"{reason}: bf16 route (simulate backend's products)"
        return None

    def linear_backward(self, e, x, weight, config, mask, dtypes, saved) -> Grads:
        if self.route_reason(config, e.device) is not None:
            return _bf16_route().linear_backward(e, x, weight, config, mask, dtypes, saved)
        return fp8_linear_backward(e, x, weight, config, mask, dtypes)

    def conv2d_backward(self, e, x, weight, conv, config, mask, dtypes, saved) -> Grads:
        return _bf16_route().conv2d_backward(e, x, weight, conv, config, mask, dtypes, saved)

    def fallback_reason(self, layer: nn.Module) -> str | None:
        """Convolutions, non-FP8 gradient specs and devices without FP8 GEMMs take the bf16
        route; a product with a scale on its contraction axis, or whose recipe
        ``_scaled_mm`` refused on this device, multiplies the dequantized codes instead."""
        config = layer.config
        if isinstance(layer, nn.Conv2d):
            return "convolution: bf16 route (simulate backend's products; no FP8 convolution)"
        weight = getattr(layer, "weight", None)
        device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
        reason = self.route_reason(config, device)
        if reason is not None:
            return reason
        notes = _contraction_notes(config)
        notes += [
            f"_scaled_mm refused {a} x {b}{' row-wise' if rowwise else ''} -> {out} on "
            f"{kind} ({err}): float32 product of the dequantized FP8 codes"
            for (kind, a, b, rowwise, out), err in REFUSED.items()
            if kind == device.type
        ]
        return "; ".join(notes) or None


FP8 = register_backend("fp8", Fp8())
