"""Compiled kernels (metagrad.kernels) against their eager reference."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MetaGrad, QuantConfig, QuantSpec, kernels, quantize
from metagrad.backward import simulate
from metagrad.backward.products import bias_grad, folded
from metagrad.meta.hyper import HYPERNET_FORMS, FusedMLP, create_hypernet
from metagrad.quant import transformed
from metagrad.quant.formats import get_format
from metagrad.quant.quantize import quantize_along, quantize_codes
from metagrad.quant.rounding import keyed_dither
from metagrad.quant.transformed import _guarded_rows
from metagrad.quant.transforms import get_transform

GRANULARITIES = ["tensor", "channel", "sample"]


@pytest.fixture
def compiled():
    if not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    with kernels.compiled():
        yield


def _error(dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(6, 10, 5, 7, generator=gen) * torch.rand(6, 10, 1, 1, generator=gen)
    e[2, 3, 1, 1] = 0.5 * e.abs().max()  # a tie for some scales
    e = e.to(dtype)
    return e.contiguous(memory_format=torch.channels_last) if channels_last else e


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_quantizer_gives_the_reference_codes_bit_for_bit(
    compiled, granularity, rounding, dtype, channels_last
):
    e = _error(dtype, channels_last)
    spec = QuantSpec(4, rounding, granularity)
    torch.manual_seed(3)
    codes, scale = quantize_codes(e, spec)
    with kernels.compiled(False):
        torch.manual_seed(3)
        ref_codes, ref_scale = quantize_codes(e, spec)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert codes.dtype == dtype and codes.stride() == e.stride()


ALONG_SPECS = [
    "fp4_e2m1:block32:e8m0-floor:stochastic",  # MXFP4, OCP scales
    "fp4_e2m1:block16:e4m3-nearest:nearest",  # NVFP4 scales, nearest
    "fp4_e2m1:tile16:e4m3:stochastic",  # 2-D weight tiles
    "int4:channel:stochastic",
    "log4:stochastic:dither16",
    "fp4_e2m1:block32:e8m0-floor:stochastic:rht32",  # the transform fused with its blocks
    "fp4_e2m1:block16:e4m3-nearest:stochastic:rht16",
    "fp4_e2m1:block32:e8m0-floor:stochastic:pre0.75:rht64",  # two blocks per transform block
    "fp4_e2m1:block32:e8m0:stochastic:rht16",  # blocks across transform blocks: not fused
    "int4:sample:stochastic:bhq8",  # a data-dependent transform along the samples
]


@pytest.mark.parametrize("text", ALONG_SPECS)
@pytest.mark.parametrize(
    ("dtype", "channels_last"),
    # bf16 in channels-last memory alone: its contiguous rows (along dim 1) and strided ones
    # (along the others) are the two paths a contiguous bf16 tensor takes too
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
)
def test_compiled_quantize_along_equals_eager_in_every_layout(compiled, text, dtype, channels_last):
    """One fused kernel per layout: contraction over the last, the first or several axes, row
    lengths that are not whole blocks, channels-last memory; the same draws give the same bits."""
    spec = QuantSpec.parse(text)
    e = _error(dtype, channels_last)
    # channels-last: its contiguous rows (along the channels) and strided ones suffice
    inners = [(1,), (0, 2, 3)] if channels_last else [(3,), (0,), (0, 2, 3), (1,)]
    for inner in inners:
        out = []
        for on in (False, True):
            with kernels.compiled(on):
                gen = torch.Generator().manual_seed(3)
                out.append(quantize_along(e, spec, inner, 1, generator=gen, dtype=dtype))
        assert torch.equal(out[0], out[1]), (text, inner)
        assert out[1].shape == e.shape and out[1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_along_leading_axes_are_copied_by_a_kernel_and_keep_eager_bits(
    compiled, dtype, monkeypatch
):
    """Rows along a contiguous error's leading axes (a linear layer's tokens) are a transposed
    view; the fused path copies them with a compiled kernel (faster than aten's transposed
    copy), and the codes are eager's bit for bit."""
    e = torch.randn(8, 16, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    spec = QuantSpec.parse("fp4_e2m1:block32:e8m0-floor:stochastic:rht32")
    copied = []
    copy = transformed._contiguous
    monkeypatch.setattr(transformed, "_contiguous", lambda x: copied.append(x.stride()) or copy(x))
    out = []
    for on in (False, True):
        with kernels.compiled(on):
            gen = torch.Generator().manual_seed(3)
            out.append(quantize_along(e, spec, (0, 1), -1, generator=gen, dtype=dtype))
    assert torch.equal(out[0], out[1])
    assert copied == [(1, 40), (1, 40)]  # (40 rows, 128 tokens) of memory laid out by token


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_sample_transform_gets_its_rows_in_the_layout_its_forward_reads(compiled, channels_last):
    """Rows along the samples come as the transposed view of sample-major memory (one copy of a
    channels-last tensor, none of a contiguous one), which the forward reads without a copy."""
    x = _error(torch.bfloat16, channels_last)
    bhq = get_transform("bhq", 8)
    rows, down = _guarded_rows(x, bhq, (0,), torch.float32)
    assert rows.shape == (10 * 5 * 7, 6) and rows.t().is_contiguous() and down.item() == 1
    expected = x.float().permute(1, 2, 3, 0).reshape(-1, 6)
    assert torch.equal(rows, expected)
    huge = _guarded_rows(x.float() * 2.0**126, bhq, (0,), torch.float32)
    assert huge[1].item() < 1 and torch.equal(huge[0], expected * 2.0**126 * huge[1])


@pytest.mark.parametrize("name", ["fp4_e2m1", "log4", "fp8_e4m3", "fp8_e5m2"])
def test_a_compiled_float_format_rounds_every_binade_edge_as_eager_code(compiled, name):
    """The grid step read from a value's bits, compiled as eager: the same rounding at the
    bounds of every float32 binade, just off them, in the subnormals and past the largest
    value."""
    fmt = get_format(name)
    edges = torch.tensor([2.0**k for k in range(-149, 128)])
    off = torch.cat([torch.nextafter(edges, edges * 0), torch.nextafter(edges, edges * 2)])
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-9, 9, (4096,), generator=gen)
    values = torch.cat([edges, off, spread, torch.tensor([0.0, float("inf")])])
    values = torch.cat([values, -values])
    dither = torch.randint(0, 256, values.shape, dtype=torch.uint8, generator=gen)
    rounded = torch.compile(fmt.round, dynamic=True)
    for d in (None, dither):
        assert torch.equal(rounded(values, d), fmt.round(values, d))


def _two_layers(kind: str, channels_last: bool, config: QuantConfig):
    """Two quantized layers and an input for them (seeded)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        x = torch.randn(4, 3, 12, generator=gen)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, groups=2)
        )
        x = torch.randn(4, 3, 9, 9, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            model = model.to(memory_format=torch.channels_last)
    return quantize(model, config), x.requires_grad_(True)


def _gradients_and_calls(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The gradients of one bf16-autocast step, and the calls of compiled code its backward
    made."""
    torch.manual_seed(5)
    with torch.autocast("cpu", torch.bfloat16):
        y = model(x)
    with torch.profiler.profile() as prof:
        y.float().square().sum().backward()
    calls = sum(e.name.startswith("Torch-Compiled Region") for e in prof.events())
    return [x.grad, *(p.grad for p in model.parameters())], calls


@pytest.mark.parametrize("kind,channels_last", [("linear", False), ("conv", False), ("conv", True)])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_layer_backward_on_integer_codes_makes_fewer_compiled_calls_with_eager_bits(
    compiled, kind, channels_last, granularity, monkeypatch
):
    """On the integer path a linear layer's whole backward (dither, codes, both products, bias
    sum) is one call of compiled code; a convolution's dither, codes and bias sum are one (two
    calls fewer than as kernels of their own), its products outside. Eager bits either way."""
    config = QuantConfig(grad=QuantSpec(4, "stochastic", granularity))
    model, x = _two_layers(kind, channels_last, config)
    grads, calls = _gradients_and_calls(model, x)
    with kernels.compiled(False):
        model, x = _two_layers(kind, channels_last, config)
        ref, eager_calls = _gradients_and_calls(model, x)
    for got, want in zip(grads, ref, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert eager_calls == 0
    if kind == "linear":
        assert calls == 2  # one per quantized layer
    else:
        monkeypatch.setattr(simulate, "_conv_codes", simulate._conv_codes.eager)
        model, x = _two_layers(kind, channels_last, config)
        split, split_calls = _gradients_and_calls(model, x)
        assert calls == split_calls - 2 * 2  # both layers, with their bias sums
        assert all(torch.equal(a, b) for a, b in zip(grads, split, strict=True))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_folded_operand_is_one_rounding_of_its_float32_product_compiled_or_not(
    compiled, channels_last
):
    """A per-sample error scale folded into a layer input: ``x * scale`` in float32, rounded to
    bf16 once, in the input's layout, compiled as eager code computes it."""
    x = _error(torch.bfloat16, channels_last)
    gen = torch.Generator().manual_seed(1)
    fold = torch.randint(8, 24, (x.shape[0], 1, 1, 1), generator=gen) / 16  # short mantissas
    got = folded(x, fold, torch.bfloat16)
    with kernels.compiled(False):
        ref = folded(x, fold, torch.bfloat16)
    exact = (x.double() * fold.double()).to(torch.bfloat16)  # exact in float32 too
    assert torch.equal(got, ref) and torch.equal(got, exact)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("n", [1, 7, 1001])
def test_a_sixteen_bit_dither_compiled_by_shifts_is_the_int16_view_of_its_words(compiled, n):
    """Compiled, 16-bit dithers come from their words by shifts (inductor's CPU code does not
    vectorize int16 loads): the very values eager code takes from an int16 view."""
    key = torch.tensor([123456, -98765], dtype=torch.int32)
    like = torch.empty(n)
    eager = keyed_dither(n, key, 16, like)
    traced = torch.compile(lambda k, t: keyed_dither(t.numel(), k, 16, t), dynamic=True)
    assert eager.dtype == torch.int32 and torch.equal(traced(key, like), eager)
    config = QuantConfig(grad=QuantSpec(4, "stochastic", dither_bits=16))
    model, x = _two_layers("linear", False, config)
    grads, _ = _gradients_and_calls(model, x)
    with kernels.compiled(False):
        model, x = _two_layers("linear", False, config)
        ref, _ = _gradients_and_calls(model, x)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref, strict=True))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bias_gradient_of_bf16_codes_is_their_exact_float32_sum_compiled_or_not(
    compiled, granularity, channels_last
):
    """The bias gradient's sums read bf16 codes in place (compiled: no float32 copy); integer
    codes sum exactly in float32, so eager and compiled agree with a float64 reference."""
    e = _error(torch.bfloat16, channels_last)
    codes, scale = quantize_codes(e, QuantSpec(4, "stochastic", granularity))
    got = bias_grad(codes, scale, 1)
    with kernels.compiled(False):
        ref = bias_grad(codes, scale, 1)
    exact = (codes.double() * scale.double()).sum((0, 2, 3))
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nearest_codes_equal_a_float64_reference(compiled, granularity):
    e = _error(torch.float32, False)
    codes, _ = quantize_codes(e, QuantSpec(8, "nearest", granularity))
    dims = {"tensor": (0, 1, 2, 3), "channel": (0, 2, 3), "sample": (1, 2, 3)}[granularity]
    scale = e.abs().amax(dims, keepdim=True).double() / 127
    # float64 division can differ from float32's in the last bit only at exact ties
    expected = torch.round(e.double() / scale.float().double())
    assert (codes.double() - expected).abs().max() <= 1
    assert (codes.double() != expected).float().mean() < 1e-3


def test_compiled_stochastic_rounding_is_unbiased_and_follows_the_seed(compiled):
    x = torch.linspace(-1, 1, 1001).reshape(7, 143) * 0.9 + 0.05
    spec = QuantSpec(3, "stochastic")
    torch.manual_seed(0)
    draws = torch.stack([torch.mul(*quantize_codes(x, spec)) for _ in range(2000)])
    step = x.abs().max() / spec.qmax
    # unbiased up to the dither resolution (step/512), beyond which 2000 draws leave noise
    assert (draws.mean(0) - x).abs().max() < step / 512 + 4 * step / (2 * 2000**0.5)
    torch.manual_seed(1)
    a = quantize_codes(x, spec)[0]
    torch.manual_seed(1)
    assert torch.equal(a, quantize_codes(x, spec)[0])


@pytest.mark.parametrize("kind", ["grad", "grad+weight"])
@pytest.mark.parametrize("form", HYPERNET_FORMS)
def test_fused_hypernet_equals_the_generic_one_in_float64(kind, form):
    torch.manual_seed(0)
    net = create_hypernet(kind, form=form).double()
    nn.init.normal_(net.head.weight, std=0.5)
    nn.init.normal_(net.head.bias, std=0.1)
    g = torch.randn(16, 3, 3, 3, dtype=torch.float64)
    w, upstream = torch.randn_like(g), torch.randn_like(g)
    generic, _ = net(g, w)
    torch.autograd.backward(generic, upstream)
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    fused = net.fused(g, w)
    torch.autograd.backward(fused, upstream)
    torch.testing.assert_close(fused, generic, rtol=1e-12, atol=1e-12)
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", HYPERNET_FORMS)
def test_fused_hypernet_gradient_passes_gradcheck(form):
    torch.manual_seed(0)
    net = create_hypernet("grad+weight", form=form).double()
    nn.init.normal_(net.head.weight, std=0.5)
    g, w = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())

    def fn(*ps):
        return FusedMLP.apply(g, w, *ps, True, form, 1e-12)

    assert torch.autograd.gradcheck(fn, params)


def test_compiled_fused_hypernet_matches_eager(compiled):
    torch.manual_seed(0)
    net = create_hypernet("grad+weight")
    nn.init.normal_(net.head.weight, std=0.5)
    g, w = torch.randn(64, 32, 3, 3), torch.randn(64, 32, 3, 3)
    upstream = torch.randn_like(g)
    out, _ = net(g, w)  # compiled kernels on: the fused path
    torch.autograd.backward(out, upstream)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with kernels.compiled(False):
        ref, _ = net(g, w)
        torch.autograd.backward(ref, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, p in zip(got, net.parameters(), strict=True):  # sums of 18k float32 terms
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())


@pytest.mark.parametrize("use_weight", [True, False])
def test_compiled_fused_hypernet_evaluates_the_network_once_forward_and_twice_backward(
    compiled, use_weight
):
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from metagrad.meta import fused

    torch.manual_seed(0)
    params = [torch.randn(8, 2), torch.randn(8), torch.randn(1, 8), torch.randn(1)]
    g, w, dout = torch.randn(3, 4096).unbind()
    feature = HYPERNET_FORMS.lookup("residual").feature
    options = kernels._inductor_options({**kernels.THREADS_AT_RUN_TIME, **kernels.RECOMPUTE})

    def loops(fn, *args):
        fresh = torch.compile(fn.eager, dynamic=True, options=options)
        with config.patch(force_disable_caches=True):
            result, codes = run_and_get_code(fresh, *args)
        return result, "\n".join(codes).count("#pragma omp parallel")

    flags = (use_weight, feature, False, 1e-12)
    (_, *scales), forward_loops = loops(fused._mlp_forward, g, w, *params, *flags)
    assert forward_loops == 2 + use_weight  # rms(g), rms(w) and one loop through the network
    sums, backward_loops = loops(fused._mlp_backward, dout, g, w, *params, *scales, *flags)
    assert backward_loops == 2  # the rescaling's gradient, then all parameter sums in one loop
    assert len(sums) == 1 + 8 * (3 + use_weight)


def test_metagrad_with_compiled_kernels_follows_the_eager_trajectory(compiled):
    config = QuantConfig(grad=QuantSpec(4, "stochastic", "sample"))
    runs = []
    for compile_on in (True, False):
        torch.manual_seed(0)
        model = quantize(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), config)
        opt = MetaGrad(model, lr=0.1, momentum=0.9, nesterov=True, hyper_lr=1e-2)
        with kernels.compiled(compile_on):
            for step in range(5):
                gen = torch.Generator().manual_seed(step)
                x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)

                def closure(model=model, opt=opt, x=x, y=y):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                torch.manual_seed(100 + step)
                opt.step(closure)
        runs.append((model.state_dict(), opt.hypernet.state_dict()))
    (model_a, hyper_a), (model_b, hyper_b) = runs
    torch.testing.assert_close(model_a, model_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hyper_a, hyper_b, rtol=1e-3, atol=1e-5)


def test_compiling_where_it_cannot_work_warns_and_stays_eager(monkeypatch):
    monkeypatch.setitem(kernels._availability, "cpu", (False, "RuntimeError: no compiler"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.set_compile(True) is False
    assert not kernels.compile_enabled()
    assert any("no compiler" in str(w.message) for w in caught)


def test_a_kernel_first_called_on_a_small_tensor_still_runs_large_ones_in_parallel(compiled):
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    @kernels.kernel
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1

    with config.patch(force_disable_caches=True):
        _, (code,) = run_and_get_code(scaled, torch.ones(4))  # compiled for every size
    assert "#pragma omp parallel" in code  # threads chosen when it runs, not when it compiled
    large = torch.randn(1 << 16)
    torch.testing.assert_close(scaled(large), large * 3 + 1)


def test_inductor_options_keep_known_settings_of_sub_configs_only():
    options = {"cpp.dynamic_threads": True, "cpp.no_such_setting": 1, "no_such_section.x": 2}
    assert kernels._inductor_options(options) == {"cpp.dynamic_threads": True}


def test_static_ints_are_constants_of_the_compiled_code_and_leave_dynamo_as_it_was(compiled):
    from torch._dynamo import config
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    @kernels.kernel(static_ints=True)
    def shifted(x: torch.Tensor, k: int) -> torch.Tensor:
        if k < 0:
            raise ValueError("k must not be negative")
        return x + k * 1000

    before = config.specialize_int
    with inductor_config.patch(force_disable_caches=True):
        for k in (3, 7):  # one compilation per value, with the value in the generated code
            out, (code,) = run_and_get_code(shifted, torch.zeros(4), k)
            torch.testing.assert_close(out, torch.full((4,), k * 1000.0))
            assert f"{k * 1000}" in code
    assert config.specialize_int == before
    with pytest.raises(ValueError, match="negative"):
        shifted(torch.zeros(4), -1)
    assert config.specialize_int == before


def _binade(x: torch.Tensor) -> torch.Tensor:
    """The power of two of each float32's binade, from its bits and back to a float."""
    return ((x.view(torch.int32) >> 23) << 23).view(torch.float32)


def test_metagrad_kernels_bit_cast_in_vectors_and_others_compile_as_before(compiled):
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 3e38]
    x = torch.cat([torch.randn(999, generator=torch.Generator().manual_seed(0)) * 100,
                   torch.tensor(special)])  # fmt: skip
    want = _binade(x).view(torch.int32)
    with config.patch(force_disable_caches=True):
        ours, (code,) = run_and_get_code(kernels.kernel(_binade), x)
        theirs, (their_code,) = run_and_get_code(torch.compile(_binade), x)
    assert torch.equal(ours.view(torch.int32), want) and torch.equal(theirs.view(torch.int32), want)
    assert "at::vec::cast<int32_t>" in code and "at::vec::cast<float>" in code
    assert "at::vec::cast<" not in their_code  # code compiled outside metagrad's kernels


def _rescaled(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An integer product's rescaling: int32 to float32, times a scale, written as bf16."""
    return (acc.to(torch.float32) * scale).to(torch.bfloat16)


def test_metagrad_kernels_convert_int32_vectors_one_at_a_time_with_the_same_rounding(compiled):
    """Two vectors of int32 at a time (a kernel writing bf16) convert to float32 per vector
    (ATen's vector conversion) instead of inductor's scalar loop; the values, large ones that
    float32 must round included, are eager's bits."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**31), 2**31 - 1, (64, 40), generator=g, dtype=torch.int32)
    acc[0, :6] = torch.tensor([0, 1, -1, 2**24 + 1, 2**24 + 3, -(2**31)], dtype=torch.int32)
    scale = torch.tensor(3.0e-7)
    with config.patch(force_disable_caches=True):
        ours, (code,) = run_and_get_code(kernels.kernel(_rescaled), acc, scale)
        theirs, (their_code,) = run_and_get_code(torch.compile(_rescaled), acc, scale)
    want = _rescaled(acc, scale)
    assert torch.equal(ours.view(torch.int16), want.view(torch.int16))
    assert torch.equal(theirs.view(torch.int16), want.view(torch.int16))
    assert "at::vec::convert<float>(" in code and "convert<float,2,int32_t,2>" not in code
    assert "convert<float,2,int32_t,2>" in their_code  # code compiled outside metagrad's kernels


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_finds_any_nan_or_infinity_compiled_or_not(on, dtype):
    """``kernels.finite``: one pass compiled, ``torch.isfinite(t).all()`` eager; the same
    answer for every shape the training checks meet (a loss, biases, weights, empty)."""
    shapes = [(), (7,), (5, 3), (4, 3, 3, 2)]
    with kernels.compiled(on):
        assert bool(kernels.finite(torch.empty(0, 3, dtype=dtype)))
        for shape in shapes:
            t = torch.randn(shape).to(dtype)
            assert bool(kernels.finite(t))
            for bad in (float("nan"), float("inf"), -float("inf")):
                u = t.clone()
                u.view(-1)[-1] = bad
                assert not bool(kernels.finite(u)), (shape, bad)


@pytest.mark.parametrize("on", [False, True])
def test_all_finite_finds_a_nan_or_infinity_in_any_tensor_of_a_list_compiled_or_not(on):
    """``kernels.all_finite``: one compiled call for a whole list (a step's loss and gradients,
    of mixed dtypes and with empty ones among them)."""
    torch.manual_seed(0)
    tensors = [torch.randn(()), torch.randn(7).bfloat16(), torch.empty(0), torch.randn(4, 3, 3)]
    with kernels.compiled(on):
        assert bool(kernels.all_finite([]))
        assert bool(kernels.all_finite([torch.empty(0, 2)]))
        assert bool(kernels.all_finite(tensors))
        for i, t in enumerate(tensors):
            for bad in (float("nan"), float("inf"), -float("inf")):
                if t.numel():
                    changed = t.clone()
                    changed.view(-1)[-1] = bad
                    assert not bool(kernels.all_finite([*tensors[:i], changed, *tensors[i + 1 :]]))
    assert kernels.all_finite(tensors, "meta").device.type == "meta"


def test_all_finite_checks_lists_longer_than_a_group_of_every_layout(compiled):
    """Groups of ``FINITE_GROUP`` flattened tensors: the last one padded, channels-last and
    transposed tensors read as they lie, integers skipped, complex tensors checked too."""
    torch.manual_seed(0)
    count = 2 * kernels.FINITE_GROUP + 3
    tensors = [torch.randn(2, 3 + i % 4, 2, 2) for i in range(count)]
    tensors[1] = tensors[1].to(memory_format=torch.channels_last)
    tensors[2] = tensors[2].transpose(0, 3)
    tensors += [torch.arange(4), torch.randn(3, dtype=torch.complex64), torch.randn(1)]
    assert bool(kernels.all_finite(tensors))
    for i in [0, 1, 2, kernels.FINITE_GROUP, count - 1, count + 1, count + 2]:
        changed = list(tensors)
        changed[i] = tensors[i].clone()
        changed[i][(0,) * tensors[i].dim()] = float("nan")
        assert not bool(kernels.all_finite(changed)), i
