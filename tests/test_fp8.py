"""The ``fp8`` backend (metagrad.backward.fp8): FP8 GEMMs through ``torch._scaled_mm``.

PyTorch runs ``_scaled_mm`` on the CPU, so every product is checked here against the
``simulate`` backend's emulated products of the same specs (FP8 E4M3 operand specs given
explicitly): the same FP8 codes and scales, bit for bit. The products are bit for bit equal too
where this CPU's ``_scaled_mm`` dequantizes the codes and multiplies in float32 as the emulation
does (PyTorch's fallback kernel: mixed E5M2 x E4M3 codes, row-wise scales, or no AMX); where it
runs oneDNN's FP8 GEMM instead (E4M3 x E4M3 per tensor on a CPU with AMX-INT8) the float32 sums
are taken in another order and the scales applied after them, so the products agree within
float32 summation error, asserted with its bound.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from metagrad.backward import fallback_report, fp8, get_backend, list_backends
from metagrad.nn.layers import QuantLinear
from metagrad.quant import QuantConfig, QuantSpec, quantize_along
from metagrad.quant.quantize import quantize_float_codes
from metagrad.training.config import build_config

E5M2, E4M3 = QuantSpec(format="fp8_e5m2"), QuantSpec(format="fp8_e4m3")
MASK = (True, True, True)
F32 = (torch.float32,) * 3
SCALED_MM = torch._scaled_mm  # tests below replace it with a spy


def _spec(text: str) -> QuantSpec:
    return QuantSpec.parse(text)


def _configs(grad: QuantSpec, w: QuantSpec | None = None, x: QuantSpec | None = None):
    """The fp8 backend's config and the simulate config with the same operand specs."""
    ops = {"weight_for_input_grad": w, "input_for_weight_grad": x}
    emulated = {k: v or E4M3 for k, v in ops.items()}
    return QuantConfig(grad=grad, backend="fp8", **ops), QuantConfig(grad=grad, **emulated)


def _case(shape=(4, 24, 64), c_in=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], c_in, generator=g)
    w = torch.randn(shape[-1], c_in, generator=g) * 0.1
    e = torch.randn(*shape, generator=g) * 1e-3
    e[..., 0] *= 40  # uneven magnitudes across channels
    return e, x, w


def _grads(backend: str, config, e, x, w, seed=5, dtypes=F32):
    torch.manual_seed(seed)  # the same random draws for stochastic rounding
    return get_backend(backend).linear_backward(e, x, w, config, MASK, dtypes, ())


@functools.cache
def _dequantizes(a: torch.dtype, b: torch.dtype, rowwise: bool) -> bool:
    """Whether this CPU's ``_scaled_mm`` equals the float32 product of the dequantized codes."""
    g = torch.Generator().manual_seed(0)
    ca = torch.randn(64, 96, generator=g).to(a)
    cb = torch.randn(96, 80, generator=g).to(b)
    sa = torch.rand(64, 1, generator=g) + 0.5 if rowwise else torch.tensor(0.37)
    sb = torch.rand(1, 80, generator=g) + 0.5 if rowwise else torch.tensor(1.7)
    out = SCALED_MM(ca, cb, sa, sb, out_dtype=torch.float32)
    return torch.equal(out, (ca.float() * sa) @ (cb.float() * sb))


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 summation error bound of ``a @ b``, each way: ``(K + 4) u |a| |b|``."""
    k = a.shape[-1]
    return (k + 4) * 2.0**-24 * 1.01 * (a.double().abs() @ b.double().abs())


def _within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (got.double() - ref.double()).abs() - bound.reshape(got.shape)
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} past the bound"


def test_fp8_is_a_registered_backend_the_cli_selects():
    assert list_backends() == ["simulate", "int8", "fp8"]
    cfg = build_config({"backend": "fp8", "grad_quant": "fp8-e5m2", "out": "unused"})
    config = cfg.quant_config()
    assert config.backend == "fp8" and config.grad == E5M2


@pytest.mark.parametrize(
    "text",
    [
        "fp8_e5m2",
        "fp8_e4m3",
        "fp8_e5m2:stochastic",
        "fp8_e4m3:channel:stochastic",
        "fp8_e5m2:sample",
        "fp8_e4m3:e8m0",
        "fp4_e2m1:channel",
    ],
)
def test_float_codes_are_the_emulated_quantizer_bit_for_bit(text):
    spec = _spec(text)
    e = _case()[0]
    torch.manual_seed(3)
    codes, scale = quantize_float_codes(e, spec, -1)
    torch.manual_seed(3)
    ref = quantize_along(e, spec, (2,), -1)
    assert torch.equal(codes * scale, ref)
    if spec.format in fp8.FP8_DTYPES:  # on the grid: exact in the hardware dtype
        assert torch.equal(codes.to(fp8.FP8_DTYPES[spec.format]).float(), codes)


@pytest.mark.parametrize(
    ("grad", "w", "x", "calls"),
    [
        ("fp8_e5m2", None, None, 2),  # the recipe: E5M2 error, E4M3 operands, per tensor
        ("fp8_e4m3", None, None, 2),
        ("fp8_e5m2:stochastic", None, None, 2),
        ("fp8_e5m2:channel", None, None, 1),  # dL/dW row-wise; dL/dx: scale on the sum
        ("fp8_e5m2:sample", None, None, 1),  # dL/dx row-wise; dL/dW: scale on the sum
        ("fp8_e5m2", None, "fp8_e4m3:channel", 2),  # dL/dW column-wise
        ("fp8_e5m2", "fp8_e4m3:channel", None, 1),  # the weight's scale is on dL/dx's sum
        ("fp8_e4m3", "fp8_e5m2", "fp8_e5m2", 2),
    ],
)
def test_fp8_products_equal_the_emulated_products(grad, w, x, calls, monkeypatch):
    specs = [None if s is None else _spec(s) for s in (grad, w, x)]
    config, emulated = _configs(*specs)
    e, xin, weight = _case()
    seen = []

    def spy(a, b, sa, sb, **kwargs):
        seen.append((a.dtype, b.dtype, sa.numel() > 1 or sb.numel() > 1))
        return SCALED_MM(a, b, sa, sb, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = _grads("fp8", config, e, xin, weight)
    ref = _grads("simulate", emulated, e, xin, weight)
    assert len(seen) == calls and not fp8.REFUSED
    assert torch.equal(got[2], ref[2])  # dL/db: the sum of the same quantized error
    if all(_dequantizes(*call) for call in seen):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # in any case within float32 summation error of each other
    eq, wq, xq = (
        torch.mul(*quantize_float_codes(t, spec or E4M3, dim)).reshape(-1, t.shape[-1])
        for t, spec, dim in ((e, specs[0], -1), (weight, specs[1], 0), (xin, specs[2], -1))
    )
    _within(got[0], ref[0], 2 * _bound(eq, wq))
    _within(got[1], ref[1], 2 * _bound(eq.t(), xq))


def test_fp8_products_against_a_float64_reference_of_the_codes():
    """dL/dx, dL/dW and dL/db against float64 products of the dequantized FP8 codes."""
    config, _ = _configs(E5M2)
    e, x, w = _case(shape=(3, 40, 96), c_in=72, seed=1)
    got = _grads("fp8", config, e, x, w)
    ce, se = quantize_float_codes(e, E5M2, -1)
    cw, sw = quantize_float_codes(w, E4M3, 0)
    cx, sx = quantize_float_codes(x, E4M3, -1)
    eq = (ce.double() * se.double()).reshape(-1, 96)
    wq, xq = cw.double() * sw.double(), (cx.double() * sx.double()).reshape(-1, 72)
    _within(got[0], (eq @ wq).reshape(got[0].shape), _bound(eq, wq))
    _within(got[1], eq.t() @ xq, _bound(eq.t(), xq))
    _within(got[2], eq.sum(0), _bound(eq.t(), torch.ones(eq.shape[0], 1, dtype=eq.dtype)))


def test_fp8_layers_in_a_model_match_simulate_and_run_under_autocast():
    torch.manual_seed(0)
    config, emulated = _configs(E5M2)
    model = nn.Sequential(QuantLinear(32, 64, config=config), nn.GELU())
    model.append(QuantLinear(64, 10, config=config))
    twin = nn.Sequential(QuantLinear(32, 64, config=emulated), nn.GELU())
    twin.append(QuantLinear(64, 10, config=emulated))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 32)
    for net in (model, twin):
        torch.manual_seed(1)
        nn.functional.cross_entropy(net(x), torch.arange(16) % 10).backward()
    exact = _dequantizes(torch.float8_e5m2, torch.float8_e4m3fn, False)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad) if exact else torch.allclose(a.grad, b.grad, 1e-5)
    assert fallback_report(model) == {}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.arange(16) % 10)
    loss.backward()
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and p.grad.isfinite().all()


def test_fp8_falls_back_to_the_bf16_route_with_a_reason(monkeypatch):
    int4 = QuantSpec(bits=4, rounding="nearest")
    e, x, w = _case()
    config = QuantConfig(grad=int4, backend="fp8")
    got = _grads("fp8", config, e, x, w)
    ref = _grads("simulate", QuantConfig(grad=int4), e, x, w)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    block = QuantConfig.from_specs(grad="fp8_e4m3:block32", backend="fp8")
    layers = nn.ModuleDict(
        {
            "int4": QuantLinear(8, 4, config=config),
            "block": QuantLinear(8, 4, config=block),
            "conv": nn.Conv2d(3, 4, 3),
            "channel": QuantLinear(8, 4, config=_configs(_spec("fp8_e5m2:channel"))[0]),
            "fp8": QuantLinear(8, 4, config=_configs(E5M2)[0]),
        }
    )
    layers["conv"].config = _configs(E5M2)[0]
    report = fallback_report(layers)
    assert "int4 is not an FP8 format" in report["int4"]
    assert "block scales" in report["block"]
    assert report["conv"].startswith("convolution: bf16 route")
    assert report["channel"].startswith("dL/dx: the error's per-channel scales")
    assert "fp8" not in report
    assert "no FP8 GEMMs on mps" in fp8.device_reason(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "needs 8.9+" in fp8.device_reason(torch.device("cuda"))


def test_a_recipe_scaled_mm_refuses_runs_on_the_dequantized_codes(monkeypatch):
    monkeypatch.setattr(fp8, "REFUSED", {})

    def refuse(*args, **kwargs):
        raise RuntimeError("no such FP8 GEMM here\nsecond line")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    config, emulated = _configs(E5M2)
    e, x, w = _case()
    got = _grads("fp8", config, e, x, w)
    ref = _grads("simulate", emulated, e, x, w)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    key = ("cpu", torch.float8_e5m2, torch.float8_e4m3fn, False, torch.float32)
    assert {key: "no such FP8 GEMM here"} == fp8.REFUSED
    reason = fallback_report(nn.Sequential(QuantLinear(8, 4, config=config)))["0"]
    assert "_scaled_mm refused" in reason and "no such FP8 GEMM here" in reason


@pytest.mark.parametrize("grad", ["fp8_e5m2", "fp8_e4m3:channel"])
def test_the_cuda_layout_padded_to_16_on_the_cpu(grad, monkeypatch):
    """CUDA's rules (dims padded to multiples of 16, a column-major second operand) give the
    same products: zero codes add nothing to the sums."""
    monkeypatch.setitem(fp8.LAYOUTS, "cpu", (16, True))
    config, emulated = _configs(_spec(grad))
    e, x, w = _case(shape=(37, 19), c_in=5)
    got = _grads("fp8", config, e, x, w)
    ref = _grads("simulate", emulated, e, x, w)
    assert not fp8.REFUSED
    cw, sw = quantize_float_codes(w, E4M3, 0)
    ce, se = quantize_float_codes(e, _spec(grad), -1)
    cx, sx = quantize_float_codes(x, E4M3, -1)
    eq, wq, xq = ce * se, cw * sw, cx * sx
    _within(got[0], ref[0], 2 * _bound(eq, wq))
    _within(got[1], ref[1], 2 * _bound(eq.t(), xq))


def test_the_fp8_backend_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match=r"^backend 'fp8' needs quantized gradients"):
        QuantConfig(grad=QuantSpec(), backend="fp8")
    with pytest.raises(ValueError, match=r"^backend 'fp8' quantizes the backward operands"):
        QuantConfig(grad=E5M2, backend="fp8", backward_operand_bits=8)
    with pytest.raises(ValueError, match=r"got weight_for_input_grad=int8 \(use backend"):
        QuantConfig.from_specs(grad="fp8_e5m2", weight_for_input_grad="int8", backend="fp8")
    with pytest.raises(ValueError, match=r"input_for_weight_grad=fp8_e4m3:block32"):
        QuantConfig.from_specs(
            grad="fp8_e5m2", input_for_weight_grad="fp8_e4m3:block32", backend="fp8"
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grad", ["fp8_e5m2", "fp8_e4m3", "fp8_e4m3:channel"])
def test_fp8_gemms_on_cuda_equal_the_emulated_products(grad):
    """On a GPU with FP8 tensor cores: the same codes as the CPU's emulation, multiplied on
    the tensor cores. Their partial sums keep fewer bits than float32 (about 14 on Hopper, as
    the DeepSeek-V3 report measured), so the bound is ``2**-12`` of the sum of magnitudes: a
    wrong scale, layout or code would be off by far more."""
    cuda = torch.device("cuda")
    reason = fp8.device_reason(cuda)
    if reason is not None:
        pytest.skip(reason)
    config, emulated = _configs(_spec(grad))
    e, x, w = _case(shape=(8, 128, 256), c_in=320)
    got = _grads("fp8", config, *(t.to(cuda) for t in (e, x, w)))
    ref = _grads("simulate", emulated, e, x, w)
    assert not {k: v for k, v in fp8.REFUSED.items() if k[0] == "cuda" and not k[3]}
    ce, se = quantize_float_codes(e, _spec(grad), -1)
    cw, sw = quantize_float_codes(w, E4M3, 0)
    cx, sx = quantize_float_codes(x, E4M3, -1)
    eq, wq, xq = (ce * se).reshape(-1, 256), cw * sw, (cx * sx).reshape(-1, 320)
    _within(got[0].cpu(), ref[0], 2.0**-12 * (eq.double().abs() @ wq.double().abs()))
    _within(got[1].cpu(), ref[1], 2.0**-12 * (eq.double().abs().t() @ xq.double().abs()))
    ones = torch.ones(eq.shape[0], 1, dtype=eq.dtype)
    _within(got[2].cpu(), ref[2], 2 * _bound(eq.t(), ones))
