"""Per-product backward specs, emulated (metagrad.backward.emulated), against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from metagrad.backward import emulated
from metagrad.nn.functional import conv2d, linear
from metagrad.quant.presets import preset_config
from metagrad.quant.quantize import prepare_transform, quantize_along, quantize_transformed
from metagrad.quant.recipes import get_recipe
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.training.config import ConfigError, build_config

FP = QuantSpec()
E4M3 = QuantSpec(format="fp8_e4m3")


def _linear_case(seed: int = 0, lead=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(*lead, 16, generator=g, dtype=torch.float64)
    return x, w, b, e


def _grads(fn, *tensors, e):
    for t in tensors:
        t.grad = None
    fn(*tensors).backward(e)
    return [t.grad.clone() for t in tensors]


def test_full_precision_products_match_autograd_exactly():
    """An emulated config whose every spec is off computes the exact float64 gradients."""
    x, w, b, e = _linear_case()
    # a per-product spec that is "off" still takes the emulated path
    config = QuantConfig(grad=QuantSpec(4, "stochastic"), grad_for_weight_grad=FP)
    assert not config.uses_integer_path
    got = _grads(lambda *t: linear(*t, config=config), x, w, b, e=e)
    ref = _grads(F.linear, x, w, b, e=e)
    assert torch.allclose(got[1], ref[1]) and torch.allclose(got[2], ref[2])  # dW, db exact
    assert not torch.allclose(got[0], ref[0])  # dx used the 4-bit error


def test_each_product_uses_its_own_error_spec():
    x, w, b, e = _linear_case()
    config = QuantConfig(grad=FP, grad_for_weight_grad=E4M3)
    gx, gw, gb = _grads(lambda *t: linear(*t, config=config), x, w, b, e=e)
    eq = quantize_along(e, E4M3, (0, 1), -1)
    assert torch.allclose(gx, e @ w.detach())  # dL/dx: full-precision error
    assert torch.allclose(gw, eq.reshape(-1, 16).T @ x.detach().reshape(-1, 32))
    assert torch.allclose(gb, eq.sum((0, 1)))


def test_operand_specs_quantize_the_weight_and_the_input():
    x, w, b, e = _linear_case()
    config = QuantConfig(grad=FP, weight_for_input_grad=E4M3, input_for_weight_grad=E4M3)
    gx, gw, _ = _grads(lambda *t: linear(*t, config=config), x, w, b, e=e)
    wq = quantize_along(w.detach(), E4M3, (0,), 0)
    xq = quantize_along(x.detach(), E4M3, (0, 1), -1)
    assert torch.allclose(gx, e @ wq)
    assert torch.allclose(gw, e.reshape(-1, 16).T @ xq.reshape(-1, 32))


def test_a_shared_transform_cancels_in_the_product():
    """With the same RHT draw on both operands, dL/dW = Q(T e)^T Q(T x) exactly."""
    x, w, b, e = _linear_case(lead=(64,))
    spec = QuantSpec(format="fp8_e4m3", transform="rht", transform_block=16)
    config = QuantConfig(grad=FP, grad_for_weight_grad=spec, input_for_weight_grad=spec)
    torch.manual_seed(3)
    _, gw, _ = _grads(lambda *t: linear(*t, config=config), x, w, b, e=e)
    torch.manual_seed(3)
    state = prepare_transform(e, spec, (0,))
    eq = quantize_along(e, spec, (0,), -1, transform_state=state)
    xq = quantize_along(x.detach(), spec, (0,), -1, transform_state=state)
    assert torch.allclose(gw, eq.T @ xq)
    # in the transformed basis both operands hold FP8 values times their scale: what an FP8
    # product on transformed operands computes
    from metagrad.quant.transforms import hadamard_matrix

    t = torch.block_diag(*[hadamard_matrix(16, torch.float64)] * 4) * state.signs.repeat(4)
    for q, source in ((eq, e), (xq, x.detach())):
        scale = (t @ source).abs().max() / 448
        on_grid = (t @ q) / scale
        assert torch.allclose(on_grid.float().to(torch.float8_e4m3fn).double(), on_grid)


def _recipe_grads(recipe: str, layer: str, seed: int = 3):
    """Float64 gradients of a linear layer or a strided convolution (with bias) under a
    recipe whose backward operands share their transforms; contraction lengths of whole
    transform blocks (a padded one adds the products of what the rounding leaves in the
    padding, as a product on padded hardware operands does)."""
    g = torch.Generator().manual_seed(0)
    if layer == "linear":
        shapes, fn = ((4, 16, 40), (32, 40), (32,), (4, 16, 32)), linear
    else:
        shapes = ((4, 8, 8, 8), (32, 8, 3, 3), (32,), (4, 32, 4, 4))

        def fn(*t, config):
            return conv2d(*t, stride=2, padding=1, config=config)

    x, w, b, e = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    config = get_recipe(recipe).config
    torch.manual_seed(seed)
    return _grads(lambda *t: fn(*t, config=config), x, w, b, e=e)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("recipe", ["rht-mxfp4", "rht-nvfp4"])
def test_operands_sharing_a_transform_multiply_as_transformed_rows(recipe, layer, monkeypatch):
    """Where both operands of a product share one transform draw, the product runs on Q(T e)
    and Q(T o) as they are (no inverse transform): in float64 it equals the product of the
    operands transformed back, bias included, from the same draws."""
    got = _recipe_grads(recipe, layer)
    calls = []

    def laid_back(*args, **kwargs):
        calls.append(args)
        return None

    monkeypatch.setattr(emulated, "_transformed_pair", laid_back)
    ref = _recipe_grads(recipe, layer)
    assert calls  # the recipe has products with a shared transform
    for a, r in zip(got, ref, strict=True):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "channels_last"),
    [
        (3, 1, 1, 1, False),
        (3, 2, 1, 1, True),
        (3, 1, 2, 2, True),
        (1, 3, 0, 1, False),
        (5, 2, 2, 1, True),
    ],
)
def test_unfolded_rows_are_im2col_along_the_error_positions(
    kernel, stride, padding, dilation, channels_last
):
    """The weight-gradient operand of a recipe's convolution: F.unfold's columns as rows over
    (sample, output row, output column), from one strided copy whatever the input's layout."""
    x = torch.randn(3, 5, 11, 10, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    ho, wo = ((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for size in (11, 10))
    conv = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, 1)
    rows = emulated._unfolded_rows(x, (kernel, kernel), conv, torch.Size((ho, wo)))
    assert torch.equal(rows, cols.permute(1, 0, 2).reshape(cols.shape[1], -1))


@pytest.mark.parametrize("recipe", ["rht-mxfp4", "rht-nvfp4"])
def test_a_shared_transform_takes_an_empty_batch(recipe):
    x = torch.randn(0, 5, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y = linear(x, w, b, config=get_recipe(recipe).config)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gx.shape == x.shape and not gw.any() and not gb.any()


def test_under_bf16_a_shared_transform_adds_no_rounding_between_grid_and_product():
    """The MXFP4 recipe under bf16 autocast: each product equals the float64 product of the
    transformed, quantized operands to the rounding of its bf16 result (the operands
    transformed back in bf16 would add their own rounding first)."""
    config = get_recipe("rht-mxfp4").config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    e = torch.randn(256, 48, generator=g).bfloat16()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x, w, None, config=config).backward(e)
    torch.manual_seed(5)  # the same draws, in the backward's order: dL/dx's pair, then dL/dW's
    spec, operands = config.grad, (x.detach().bfloat16(), w.detach().bfloat16())
    products = []
    for inner, other, other_inner in (((1,), operands[1], (0,)), ((0,), operands[0], (0,))):
        state = prepare_transform(e, spec, inner)
        er, orows = (
            quantize_transformed(t, spec, i, transform_state=state, dtype=torch.bfloat16)
            for t, i in ((e, inner), (other, other_inner))
        )
        products.append(er.double() @ orows.double().T)
    for grad, exact in ((x.grad, products[0]), (w.grad, products[1])):
        assert (grad.double() - exact).norm() < 2**-8 * exact.norm()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("quantize_input", [False, True])
def test_conv_products_against_float64_references(groups, quantize_input):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    conv = dict(stride=2, padding=1, dilation=1, groups=groups)
    e = torch.randn(3, 6, 5, 5, generator=g, dtype=torch.float64)
    x_spec = E4M3 if quantize_input else None
    config = QuantConfig(grad=FP, grad_for_weight_grad=E4M3, input_for_weight_grad=x_spec)
    got = _grads(lambda *t: conv2d(*t, **conv, config=config), x, w, b, e=e)
    eq = quantize_along(e, E4M3, (0, 2, 3), 1)
    cols = F.unfold(x.detach(), 3, padding=1, stride=2).transpose(1, 2)
    if quantize_input:
        cols = quantize_along(cols, E4M3, (0, 1), -1)
    ref_x = _grads(lambda *t: F.conv2d(*t, **conv), x, w, b, e=e)[0]
    # dL/dW = e^T im2col(x) per group
    e2, c2 = eq.permute(0, 2, 3, 1).reshape(-1, 6), cols.reshape(-1, cols.shape[-1])
    per_in = 4 // groups * 9
    ref_w = torch.cat(
        [
            e2[:, k * 6 // groups : (k + 1) * 6 // groups].T @ c2[:, k * per_in : (k + 1) * per_in]
            for k in range(groups)
        ]
    ).reshape(w.shape)
    assert torch.allclose(got[0], ref_x)
    assert torch.allclose(got[1], ref_w)
    assert torch.allclose(got[2], eq.sum((0, 2, 3)))


def test_autocast_computes_in_bf16_and_returns_the_inputs_dtypes():
    x, w, b, e = _linear_case()
    x, w, b = (t.detach().float().requires_grad_() for t in (x, w, b))
    config = QuantConfig(grad=QuantSpec(format="fp4_e2m1", granularity="block", block_size=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b, config=config)
    assert y.dtype == torch.bfloat16
    y.backward(e.to(torch.bfloat16))
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32,) * 3
    ref = e.reshape(-1, 16).T.float() @ x.detach().reshape(-1, 32)
    assert F.cosine_similarity(w.grad.flatten(), ref.flatten(), dim=0) > 0.95


def test_config_validation_names_the_problem():
    block = QuantSpec(format="fp4_e2m1", granularity="block")
    with pytest.raises(ValueError, match="backend 'int8' takes integer"):
        QuantConfig(grad=block, backend="int8")
    with pytest.raises(ValueError, match="either backward_operand_bits or per-product"):
        QuantConfig(backward_operand_bits=8, weight_for_input_grad=E4M3)
    assert QuantConfig(weight=block).weight == block  # any forward spec under simulate
    with pytest.raises(ValueError, match=r"forward quantization.*8-bit backward operands"):
        QuantConfig(weight=block, backward_operand_bits=8)
    with pytest.raises(ValueError, match=r"forward quantization.*backend 'int8'"):
        QuantConfig(grad=QuantSpec(4), activation=block, backend="int8")
    with pytest.raises(TypeError, match="grad_for_weight_grad must be a QuantSpec"):
        QuantConfig(grad_for_weight_grad=4)


def test_default_config_rounds_stochastically():
    assert QuantConfig().grad == QuantSpec(8, "stochastic")


def test_to_dict_records_every_resolved_spec():
    d = QuantConfig(grad=QuantSpec(4, "stochastic"), grad_for_weight_grad=E4M3).to_dict()
    assert d["grad_for_input_grad"]["bits"] == 4
    assert d["grad_for_weight_grad"]["format"] == "fp8_e4m3"
    assert d["weight_for_input_grad"]["bits"] == 32 and d["path"] == "emulated"


def test_cli_selects_presets_by_name_and_refuses_conflicts():
    cfg = build_config({"grad_quant": "rht-nvfp4", "model": "small_cnn"})
    config = cfg.quant_config()
    assert config.grad.format == "fp4_e2m1" and config.backward_specs[1].transform == "rht"
    with pytest.raises(ConfigError, match="grad_quant 'luq' fixes the gradient quantizer"):
        build_config({"grad_quant": "luq", "grad_bits": 4})
    with pytest.raises(ConfigError, match="grad_quant"):
        build_config({"grad_quant": "int3"})
    with pytest.raises(ConfigError, match="backend 'int8' takes integer"):
        build_config({"grad_quant": "rht-mxfp4", "backend": "int8"})


def test_sample_axis_transforms_quantize_the_error_once_for_both_products():
    """BHQ, like PSQ and the per-tensor quantizer, quantizes the error once (Chen et al. 2020):
    dL/dx and dL/dW are products of the same quantized error."""
    x, w, b, e = _linear_case(lead=(32,))
    config = preset_config("bhq")
    gx, gw, gb = _grads(lambda *t: linear(*t, config=config), x, w, b, e=e)
    # recover the quantized error from dL/dW = eq^T x (x has full column rank: 32 x 32)
    eq = torch.linalg.solve(x.detach().T, gw.T)
    assert torch.allclose(gx, eq @ w.detach(), atol=1e-8)
    assert torch.allclose(gb, eq.sum(0), atol=1e-8)
    assert not torch.allclose(eq, e)  # it was quantized


def test_rht_runs_in_bf16_and_adds_no_error_to_the_quantizer():
    """The +-1 Hadamard products are exact in bf16: a bf16 input is transformed in bf16 (as
    hardware does), and its quantization error matches that of the float32 transform."""
    specs = [
        QuantSpec(format="fp8_e4m3", transform="rht", transform_block=16),
        preset_config("rht-nvfp4").grad_for_weight_grad,
    ]
    for seed, spec in enumerate(specs):
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(64, 48, generator=g).to(torch.bfloat16)
        state = prepare_transform(e, spec, (1,), generator=g)
        low, high = (
            quantize_along(
                t, spec, (1,), -1, transform_state=state, generator=torch.Generator().manual_seed(1)
            )
            for t in (e, e.float())
        )
        exact = e.double()
        ratio = (low.double() - exact).norm() / (high.double() - exact).norm()
        assert abs(ratio - 1) < 0.03
        assert (low - high).norm() / high.norm() < 0.1  # a few values cross a rounding boundary
