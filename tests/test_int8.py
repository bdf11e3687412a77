"""The int8 backend: integer products equal simulate with the same quantization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import kernels
from metagrad.backward import fallback_report, get_backend, int8
from metagrad.backward.int8.conv import _conv_grad_input_int, _conv_grad_weight_int
from metagrad.backward.int8.im2col import _Conv, _nhwc_canvas
from metagrad.backward.int8.intmm import _matrix, _padded
from metagrad.backward.int8.settings import BackwardSettings
from metagrad.models import create_model
from metagrad.nn.convert import quantize, quantize_
from metagrad.nn.functional import conv2d, linear
from metagrad.quant.quantize import quantize_codes
from metagrad.quant.spec import INTEGER_GRANULARITIES as GRANULARITIES
from metagrad.quant.spec import ROUNDINGS, QuantConfig, QuantSpec

# (N, Cin, H, W, Cout, k, stride, padding, dilation)
CONV_SHAPES = [
    (2, 3, 7, 9, 5, 3, 1, 1, 1),  # odd sizes, channels not multiples of 8
    (3, 8, 8, 8, 16, 3, 2, 1, 1),  # stride 2
    (2, 5, 9, 7, 6, 1, 2, 0, 1),  # 1×1 stride 2
    (1, 4, 11, 10, 24, 3, 1, 2, 2),  # batch 1, dilation 2
    (2, 16, 6, 6, 8, 1, 1, 0, 1),  # 1×1 stride 1 (pointwise fast path)
    (4, 6, 5, 5, 7, 3, 2, 0, 1),  # stride 2, no padding, odd output
]
LINEAR_SHAPES = [(5, 7, 3), (2, 9, 12, 10), (24, 16, 32), (2, 3, 4, 6, 5)]  # (*lead, in, out)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _conv_inputs(shape, seed: int = 0):
    n, ci, h, w, co, k, s, p, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g)
    weight = torch.randn(co, ci, k, k, generator=g)
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    e = torch.randn(n, co, ho, wo, generator=g)
    return x, weight, e, (s, s), (p, p), (d, d)


def _grad_config(granularity: str, rounding: str, bits: int = 8, **kwargs) -> QuantConfig:
    return QuantConfig(grad=QuantSpec(bits, rounding, granularity), **kwargs)


def _conv_both(shape, config: QuantConfig, mask=(True, True, True), channels_last=False):
    x, weight, e, stride, padding, dilation = _conv_inputs(shape)
    if channels_last:
        x, e = (t.contiguous(memory_format=torch.channels_last) for t in (x, e))
    args = (e, x, weight, stride, padding, dilation, 1, config, mask)
    torch.manual_seed(1)
    ints = int8.conv2d_backward(*args)
    torch.manual_seed(1)
    sims = int8.conv2d_backward_simulated(*args)
    return ints, sims, (x, weight, e, stride, padding, dilation)


def _conv_reference(x, weight, e, stride, padding, dilation, spec: QuantSpec, seed: int = 1):
    """float64 products of the same integer codes, times the same scales."""
    torch.manual_seed(seed)
    codes, s_e = quantize_codes(e, spec, 1)
    g = spec.granularity
    w_fold = s_e.reshape(-1, 1, 1, 1) if g == "channel" else None
    x_fold = s_e if g == "sample" else None
    w_codes, s_w = int8.quantize_operand(weight, 1, w_fold)
    x_codes, s_x = int8.quantize_operand(x, 1, x_fold)
    c64 = codes.double()
    dx = (
        torch.nn.grad.conv2d_input(x.shape, w_codes.double(), c64, stride, padding, dilation)
        * s_w.double()
    )
    dw = torch.nn.grad.conv2d_weight(
        x_codes.double(), weight.shape, c64, stride, padding, dilation
    ) * s_x.double().reshape(1, -1, 1, 1)
    if g == "sample":
        dx = dx * s_e.double()
    elif g == "tensor":
        dx, dw = dx * s_e.double(), dw * s_e.double()
    else:
        dw = dw * s_e.double().reshape(-1, 1, 1, 1)
    db = (c64 * s_e.double()).sum((0, 2, 3))
    return dx, dw, db


def _assert_rescale_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to the float64 reference up to float32 rounding of the final rescale."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    assert (err <= 4e-7 * ref.abs() + 1e-30).all(), err.max().item()


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_conv_backward_matches_simulate(shape, granularity: str, rounding: str) -> None:
    config = _grad_config(granularity, rounding, backend="int8")
    ints, sims, inputs = _conv_both(shape, config)
    for got, sim in zip(ints, sims, strict=True):
        assert _rel_err(got, sim) < 2e-6
    refs = _conv_reference(*inputs, config.grad)
    _assert_rescale_close(ints[0], refs[0])
    _assert_rescale_close(ints[1], refs[1])
    assert _rel_err(ints[2], refs[2]) < 1e-6


@pytest.mark.parametrize("bits", [4, 2])
def test_conv_backward_low_bit_error_channels_last(bits: int) -> None:
    shape = (3, 8, 8, 8, 16, 3, 1, 1, 1)
    config = _grad_config("sample", "stochastic", bits, backend="int8")
    ints, sims, inputs = _conv_both(shape, config, mask=(True, True, False), channels_last=True)
    assert ints[2] is None and sims[2] is None
    refs = _conv_reference(*inputs, config.grad)
    for got, sim, ref in zip(ints[:2], sims[:2], refs[:2], strict=True):
        assert _rel_err(got, sim) < 2e-6
        _assert_rescale_close(got, ref)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_integer_products_are_exact(shape) -> None:
    x, weight, e, stride, padding, dilation = _conv_inputs(shape)
    g = _Conv.of(x.shape, weight.shape, stride, padding, dilation)
    gen = torch.Generator().manual_seed(3)
    e_codes = torch.randint(-127, 128, e.shape, generator=gen, dtype=torch.int8)
    w_codes = torch.randint(-127, 128, weight.shape, generator=gen, dtype=torch.int8)
    x_codes = torch.randint(-127, 128, x.shape, generator=gen, dtype=torch.int8)
    err = _matrix(_padded(e[:, 0].numel()), _padded(g.c_out), 0, 0, device="cpu")
    err.zero_()
    inner = err[: e[:, 0].numel(), : g.c_out].view(g.n, g.ho, g.wo, g.c_out)
    inner.copy_(e_codes.permute(0, 2, 3, 1))
    canvas, inside = _nhwc_canvas(g.n, g.h, g.w, g.c_in, padding, device="cpu", name=None)
    inside.copy_(x_codes)
    # results are views into the workspace: copy before the next product
    dx = _conv_grad_input_int(err, inner, w_codes, g, 127).permute(0, 3, 1, 2).clone()
    dw = _conv_grad_weight_int(err, canvas, g, 127).permute(0, 3, 1, 2).clone()
    ref_dx = torch.nn.grad.conv2d_input(
        x.shape, w_codes.double(), e_codes.double(), stride, padding, dilation
    )
    ref_dw = torch.nn.grad.conv2d_weight(
        x_codes.double(), weight.shape, e_codes.double(), stride, padding, dilation
    )
    assert torch.equal(dx.double(), ref_dx)
    assert torch.equal(dw.double(), ref_dw)


@pytest.mark.parametrize(
    ("m", "k", "n"), [(5, 7, 3), (16, 8, 8), (17, 9, 13), (40, 64, 24), (3, 100, 1)]
)
def test_int_mm_pads_to_size_rules_exactly(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t()  # column-major
    ref = a.double() @ b.double()
    out = int8.int_mm(a, b)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out.double(), ref)
    assert torch.equal(int8.int_mm(b.t(), a.t()).double(), ref.t())  # transposed views
    split = int8.int_mm(a, b, a_max=2**15, b_max=2**15)  # splits k into steps of 8
    assert split.dtype == (torch.int64 if k > 8 else torch.int32)
    assert torch.equal(split.double(), ref)


def test_every_int_mm_call_meets_cuda_size_rules(monkeypatch) -> None:
    real = torch._int_mm
    shapes = []

    def checked(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", checked)
    config = _forward_config("int8", "tensor")
    for shape in CONV_SHAPES:
        _run_conv(config, shape)
    for *lead, c_in, c_out in LINEAR_SHAPES:
        x = torch.randn(*lead, c_in, requires_grad=True)
        linear(x, torch.randn(c_out, c_in), torch.randn(c_out), config=config).sum().backward()
    assert len(shapes) == 4 * len(CONV_SHAPES) + 2 * len(LINEAR_SHAPES)  # conv: y, dx, dW, db


def test_int_mm_extreme_codes_do_not_overflow() -> None:
    k = 133_144  # the longest contraction one int32 product allows at |codes| <= 127
    a = torch.full((17, k), -127, dtype=torch.int8)
    b = torch.full((k, 8), 127, dtype=torch.int8)
    assert int(int8.int_mm(a, b)[0, 0]) == -127 * 127 * k
    c = torch.full((17, k + 8), 127, dtype=torch.int8)
    d = torch.full((k + 8, 8), 127, dtype=torch.int8)
    assert int(int8.int_mm(c, d)[3, 5]) == 127 * 127 * (k + 8)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_quantize_codes_int8_matches_quantize_codes(granularity: str, channel_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 3, generator=g) * 3
    x[1] = (torch.arange(90).reshape(6, 5, 3) - 45) * 0.5
    x[1, 0, 0, 0] = 127  # scale 1 at 8 bits: every odd half is a tie
    x[2] = 0  # an all-zero group
    x = x.contiguous(memory_format=torch.channels_last)
    for bits in (8, 4, 2):
        spec = QuantSpec(bits, "nearest", granularity)
        codes, scale = int8.quantize_codes_int8(x, spec, channel_dim)
        ref_codes, ref_scale = quantize_codes(x, spec, channel_dim)
        assert codes.dtype == torch.int8 and torch.equal(codes.float(), ref_codes)
        assert torch.equal(scale, ref_scale)
    spec = QuantSpec(4, "stochastic", granularity)
    torch.manual_seed(5)
    codes, _ = int8.quantize_codes_int8(x, spec, channel_dim)
    torch.manual_seed(5)
    assert torch.equal(codes.float(), quantize_codes(x, spec, channel_dim)[0])


def test_quantize_operand_folds_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, 3, generator=g)
    fold = torch.rand(5, 1, 1, 1, generator=g) + 0.5
    codes, scale = int8.quantize_operand(x, 1, fold)
    assert codes.dtype == torch.int8 and scale.shape == (1, 4, 1, 1)
    assert codes.abs().max() == 127 and int(codes.min()) >= -127
    assert (codes.float() * scale - x * fold).abs().max() <= scale.max() / 2 * 1.0001


def test_nan_error_stays_visible() -> None:
    x, weight, e, stride, padding, dilation = _conv_inputs(CONV_SHAPES[0])
    e[0, 0, 0, 0] = float("nan")
    config = _grad_config("tensor", "nearest", backend="int8")
    for fn in (int8.conv2d_backward, int8.conv2d_backward_simulated):
        grads = fn(e, x, weight, stride, padding, dilation, 1, config, (True, True, True))
        assert all(torch.isnan(t).all() for t in grads)


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_linear_backward_matches_simulate(shape, granularity: str, rounding: str) -> None:
    *lead, c_in, c_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, c_in, generator=g)
    weight = torch.randn(c_out, c_in, generator=g)
    e = torch.randn(*lead, c_out, generator=g)
    config = _grad_config(granularity, rounding, backend="int8")
    mask = (True, True, True)
    torch.manual_seed(1)
    ints = int8.linear_backward(e, x, weight, config, mask)
    torch.manual_seed(1)
    sims = int8.linear_backward_simulated(e, x, weight, config, mask)
    for got, sim in zip(ints, sims, strict=True):
        assert got.shape == sim.shape
        assert _rel_err(got, sim) < 2e-6
    # float64 reference from the same codes
    torch.manual_seed(1)
    codes, s_e = quantize_codes(e, config.grad, -1)
    w_fold = s_e.reshape(-1, 1) if granularity == "channel" else None
    x_fold = s_e if granularity == "sample" else None
    w_codes, s_w = int8.quantize_operand(weight, 1, w_fold)
    x_codes, s_x = int8.quantize_operand(x, -1, x_fold)
    dx = codes.double() @ w_codes.double() * s_w.double().reshape(-1)
    dw = codes.double().reshape(-1, c_out).t() @ x_codes.double().reshape(-1, c_in)
    dw = dw * s_x.double().reshape(1, -1)
    if granularity == "channel":
        dw = dw * s_e.double().reshape(-1, 1)
    elif granularity == "tensor":
        dx, dw = dx * s_e.double(), dw * s_e.double().reshape(-1)[0]
    else:
        dx = dx * s_e.double()
    _assert_rescale_close(ints[0], dx)
    _assert_rescale_close(ints[1], dw)


def _forward_config(backend: str, act: str = "tensor", bits: int = 8) -> QuantConfig:
    return QuantConfig(
        grad=QuantSpec(8),
        weight=QuantSpec(bits, granularity="channel"),
        activation=QuantSpec(bits, granularity=act),
        backend=backend,
        backward_operand_bits=8,
    )


def _run_conv(config: QuantConfig, shape, bias: bool = True):
    x, weight, e, stride, padding, dilation = _conv_inputs(shape)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    b = torch.linspace(-1, 1, weight.shape[0], requires_grad=True) if bias else None
    y = conv2d(x, weight, b, stride, padding, dilation, config=config)
    y.backward(e)
    return y.detach(), x.grad, weight.grad, (b.grad if bias else None)


@pytest.mark.parametrize("shape", CONV_SHAPES[:4])
@pytest.mark.parametrize(("act", "bits"), [("tensor", 8), ("sample", 4), ("channel", 8)])
def test_forward_int8_matches_simulate(shape, act: str, bits: int) -> None:
    ints = _run_conv(_forward_config("int8", act, bits), shape)
    sims = _run_conv(_forward_config("simulate", act, bits), shape)
    for got, sim in zip(ints, sims, strict=True):
        assert _rel_err(got, sim) < 2e-6
    # simulate's forward values are unchanged: fake-quantized operands through F.conv2d
    x, weight, _, stride, padding, dilation = _conv_inputs(shape)
    config = _forward_config("simulate", act, bits)
    xq = int8.Quantized(*int8.quantize_codes_int8(x, config.activation, 1)).dequantize()
    wq = int8.Quantized(*int8.quantize_codes_int8(weight, config.weight, 0)).dequantize()
    ref = F.conv2d(xq, wq, torch.linspace(-1, 1, weight.shape[0]), stride, padding, dilation)
    assert torch.equal(sims[0], ref)
    old = QuantConfig(grad=QuantSpec(8), weight=config.weight, activation=config.activation)
    assert torch.equal(_run_conv(old, shape)[0], ref)


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_forward_int8_matches_simulate(shape) -> None:
    *lead, c_in, c_out = shape
    outs = {}
    for backend in ("int8", "simulate"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*lead, c_in, generator=g, requires_grad=True)
        w = torch.randn(c_out, c_in, generator=g, requires_grad=True)
        b = torch.randn(c_out, generator=g, requires_grad=True)
        y = linear(x, w, b, config=_forward_config(backend, "sample"))
        y.backward(torch.randn(y.shape, generator=g))
        outs[backend] = (y.detach(), x.grad, w.grad, b.grad)
    for got, sim in zip(outs["int8"], outs["simulate"], strict=True):
        assert _rel_err(got, sim) < 2e-6


def test_grouped_conv_falls_back_and_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    quantize_(model, QuantConfig(backend="int8"))
    report = fallback_report(model)
    assert list(report) == ["1"] and "groups=8" in report["1"]
    assert get_backend("int8").fallback_reason(model[0]) is None
    quantize_(model, QuantConfig())  # simulate: nothing falls back
    assert fallback_report(model) == {}
    x, weight, e = torch.randn(2, 8, 5, 5), torch.randn(8, 2, 3, 3), torch.randn(2, 8, 5, 5)
    config = QuantConfig(grad=QuantSpec(8, granularity="channel"), backend="int8")
    args = (e, x, weight, (1, 1), (1, 1), (1, 1), 4, config, (True, True, True))
    got = int8.conv2d_backward(*args)
    sim = int8.conv2d_backward_simulated(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, sim, strict=True))


def test_forward_fallback_is_reported() -> None:
    layer = quantize(nn.Sequential(nn.Linear(4, 4)), _forward_config("int8", "channel"))[0]
    assert "per-channel activation" in get_backend("int8").fallback_reason(layer)
    assert (
        get_backend("int8").fallback_reason(
            quantize(nn.Sequential(nn.Linear(4, 4)), _forward_config("int8"))[0]
        )
        is None
    )


def test_training_step_int8_matches_simulate() -> None:
    grads = {}
    for backend in ("int8", "simulate"):
        torch.manual_seed(0)
        model = create_model("small_cnn", width=0.5).to(memory_format=torch.channels_last)
        quantize_(
            model, _grad_config("channel", "stochastic", backend=backend, backward_operand_bits=8)
        )
        x = torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
        torch.manual_seed(1)
        F.cross_entropy(model(x), torch.arange(4)).backward()
        grads[backend] = [p.grad for p in model.parameters()]
    for got, sim in zip(grads["int8"], grads["simulate"], strict=True):
        assert _rel_err(got, sim) < 1e-5


def test_expanded_error_and_1d_linear_input() -> None:
    config = _grad_config("tensor", "nearest", backend="int8")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    conv2d(x, w, None, 1, 1, config=config).sum().backward()  # stride-0 error
    w_op = int8.Quantized(*int8.quantize_operand(w.detach(), 1)).dequantize()
    ref = torch.nn.grad.conv2d_input(x.shape, w_op, torch.ones(2, 8, 6, 6), padding=1)
    assert _rel_err(x.grad, ref) < 1e-6  # an all-ones error quantizes exactly
    v = torch.randn(5, requires_grad=True)
    m = torch.randn(3, 5, requires_grad=True)
    linear(v, m, config=config).backward(torch.tensor([1.0, -2.0, 0.5]))
    assert v.grad.shape == (5,) and m.grad.shape == (3, 5)


def test_config_operand_bits() -> None:
    assert QuantConfig().backward_operand_bits == 32
    assert not QuantConfig().quantizes_operands
    assert QuantConfig(backend="int8").quantizes_operands
    config = QuantConfig(backward_operand_bits=8)
    assert config.quantizes_operands and "backward_operands=int8" in str(config)
    assert "backward_operands" not in str(QuantConfig())
    with pytest.raises(ValueError, match="backward_operand_bits"):
        QuantConfig(backward_operand_bits=4)
    assert not QuantConfig(grad=QuantSpec(32), backward_operand_bits=8).quantizes_operands


# Imports metagrad.backward.int8 under a bare stand-in for the metagrad package: the real
# metagrad/__init__.py imports metagrad.nn.functional for its public names, which would hide
# whether the backend itself does.
def test_quant_config_has_what_the_backend_reads() -> None:
    members = [name for name, v in vars(BackwardSettings).items() if isinstance(v, property)]
    assert set(members) == {"grad", "weight", "activation"}
    config = QuantConfig(backend="int8")
    for name in members:
        assert getattr(config, name) is not None


def test_int8_public_names() -> None:
    for name in int8.__all__:
        assert getattr(int8, name) is not None
    for name in ("FLOAT_ROUTES", "float_route", "conv2d_backward_for", "linear_backward_for"):
        assert getattr(int8.backend, name) is not None


@pytest.mark.parametrize("backend", ["int8", "simulate"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_grouped_conv_with_forward_quantization_backpropagates(backend, granularity):
    """Per-tensor activation scales of a grouped convolution factor out of every group."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    config = QuantConfig(
        backend=backend,
        grad=QuantSpec(8, "nearest", granularity),
        weight=QuantSpec(8, granularity="channel"),
        activation=QuantSpec(8),
    )
    conv2d(x, w, None, 1, 1, 1, 2, config=config).sum().backward()
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.conv2d(x_ref, w_ref, None, 1, 1, 1, 2).sum().backward()
    for got, ref in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
        assert (got - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize(
    ("granularity", "rounding", "dtype"),
    [
        ("tensor", "stochastic", torch.bfloat16),
        ("sample", "nearest", torch.float32),
        ("channel", "stochastic", torch.float32),
    ],
)
def test_compiled_kernels_give_the_eager_bits(granularity: str, rounding: str, dtype) -> None:
    """Compiled, the backend's quantizers (error, operands, forward codes) and rescales
    (products, flipped taps, bias) compute the eager code's bits: convolutions on both backward
    paths (one patch matrix for both products, and two), channels-last, and linear layers."""
    config = QuantConfig(
        grad=QuantSpec(8, rounding, granularity),
        weight=QuantSpec(8, granularity="channel"),
        activation=QuantSpec(8, granularity="sample"),
        backend="int8",
        backward_operand_bits=8,
    )
    plain = QuantConfig(grad=QuantSpec(8, rounding, granularity), backend="int8")

    def run(cfg, shape, layout):
        x, weight, e, stride, padding, dilation = _conv_inputs(shape)
        x, e = (t.contiguous(memory_format=layout) for t in (x, e))
        x.requires_grad_(True)
        weight.requires_grad_(True)
        b = torch.linspace(-1, 1, weight.shape[0], requires_grad=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = conv2d(x, weight, b, stride, padding, dilation, config=cfg)
            lin_w = torch.randn(7, y[0].numel(), generator=torch.Generator().manual_seed(2))
            lin_w.requires_grad_(True)
            z = linear(y.flatten(1), lin_w, b[:1], config=cfg)
        (z.float().sum() + (y.float() * e).sum()).backward()
        return y, z, x.grad, weight.grad, b.grad, lin_w.grad

    for cfg in (config, plain):
        for shape in (CONV_SHAPES[0], CONV_SHAPES[1]):
            for layout in (torch.contiguous_format, torch.channels_last):
                with kernels.compiled(False):
                    eager = run(cfg, shape, layout)
                with kernels.compiled(True):
                    compiled = run(cfg, shape, layout)
                for got, want in zip(compiled, eager, strict=True):
                    assert got.dtype == want.dtype and torch.equal(got, want)
