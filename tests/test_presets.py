"""The published gradient quantizers (metagrad.quant.presets), each against a property of its
paper."""

import dataclasses
import math

import pytest
import torch

from metagrad.nn.functional import linear
from metagrad.quant import presets
from metagrad.quant.presets import list_presets, preset_config, register_preset
from metagrad.quant.quantize import quantize_along
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.quant.transforms import hadamard_matrix

PRESETS = ["plain", "psq", "bhq", "luq", "rht-mxfp4", "rht-nvfp4", "fp8-e5m2"]
STOCHASTIC = [p for p in PRESETS if p != "fp8-e5m2"]


def _gradient(seed: int = 0, rows: int = 64, cols: int = 96) -> torch.Tensor:
    """Heavy-tailed rows (samples) and a few outlier columns, like neural gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x *= torch.logspace(-3, 0, rows, dtype=torch.float64)[torch.randperm(rows, generator=g)][
        :, None
    ]
    x[:, 7] *= 20
    return x


def _draws(x: torch.Tensor, spec: QuantSpec, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([quantize_along(x, spec, (0,), 1) for _ in range(n)])


def test_every_preset_is_registered():
    assert list_presets()[: len(PRESETS)] == PRESETS


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_presets_are_unbiased(name):
    """Unbiasedness (every paper's premise): the mean of many draws converges to the input."""
    x = _gradient()
    spec = preset_config(name).grad
    draws = _draws(x, spec, 400)
    err = (draws.mean(0) - x).norm() / x.norm()
    single = (draws[0] - x).norm() / x.norm()
    assert err < 2.5 * single / math.sqrt(400) + 2e-3  # shrinks as 1/sqrt(n): no bias left


def test_psq_variance_is_within_its_bound_and_below_per_tensor():
    """PSQ (Chen et al. 2020): Var <= (D/4) sum_i s_i^2 with s_i the i-th sample's step."""
    x = _gradient()
    spec = preset_config("psq").grad
    var = _draws(x, spec, 300).var(0).sum()
    steps = x.abs().amax(1) / spec.qmax
    bound = x.shape[1] / 4 * (steps**2).sum()
    assert var <= bound
    per_tensor = _draws(x, QuantSpec(4, "stochastic"), 300).var(0).sum()
    assert var < 0.5 * per_tensor


def test_bhq_is_per_sample_quantization_in_an_orthogonal_basis():
    """BHQ (Chen et al. 2020): S^T Q(S x) with S block Householder: its variance is the PSQ
    variance of the transformed samples, within the same bound, and S preserves norms."""
    from metagrad.quant.transforms import BlockHouseholder

    x = _gradient() * 1e-3
    x[3] = torch.randn(x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bhq = BlockHouseholder(8)
    state = bhq.prepare(x.T.contiguous(), None)  # along the samples: rows of x.T
    sx = bhq.forward(x.T.contiguous(), state).T
    assert torch.allclose(sx.norm(), x.norm())
    assert sx.abs().max() < x.abs().max() / 2  # the dominant sample is shared by its group
    var = _draws(x, preset_config("bhq").grad, 300).var(0).sum()
    steps = sx.abs().amax(1) / 7
    assert var <= x.shape[1] / 4 * (steps**2).sum()


def test_luq_values_are_zero_or_powers_of_two_of_the_scale():
    """LUQ (Chmiel et al. 2023): radix-2 levels; below the smallest, stochastic underflow."""
    x = _gradient()
    q = quantize_along(x, preset_config("luq").grad, (0,), 1)
    top = x.abs().max() / 16  # the scale: the largest magnitude maps to 2**4
    levels = q[q != 0].abs() / top
    assert torch.allclose(levels, torch.exp2(torch.round(torch.log2(levels))))
    assert levels.min() >= 0.25 - 1e-12 and levels.max() <= 16 + 1e-12
    tiny = x.abs() < top * 0.25  # below the smallest level: zero or the smallest level
    assert torch.all((q[tiny] == 0) | torch.isclose(q[tiny].abs(), top * 0.25))


def _undo_rht(q: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the forward transform to ``q`` (rows along dim 1) to see the quantized values."""
    h = hadamard_matrix(block, q.dtype)
    rows = q.reshape(q.shape[0], -1, block)
    return ((rows * signs) @ h).reshape(q.shape)


@pytest.mark.parametrize(("name", "block"), [("rht-mxfp4", 32), ("rht-nvfp4", 16)])
def test_rht_presets_quantize_the_transformed_values_onto_the_fp4_grid(name, block):
    """In the transformed basis every value is an FP4 E2M1 value times its block's scale."""
    spec = preset_config(name).grad_for_weight_grad or preset_config(name).grad
    x = _gradient().T.contiguous()  # contraction (rows of the transform) along dim 1
    torch.manual_seed(0)
    from metagrad.quant.quantize import prepare_transform

    state = prepare_transform(x, spec, (1,))
    q = quantize_along(x, spec, (1,), 0, transform_state=state)
    values = _undo_rht(q, state.signs, block).reshape(x.shape[0], -1, spec.block_size)
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    scale = values.abs().amax(-1, keepdim=True) / 6  # each block's scale reaches 6 at most
    for row in range(4):
        for b in range(values.shape[1]):
            v = values[row, b]
            ok = False
            for s in _candidate_scales(v, name):
                units = (v.abs() / s).unsqueeze(-1)
                if torch.all((units - fp4).abs().min(-1).values < 1e-6):
                    ok = True
                    break
            assert ok, (row, b, scale[row, b])


def _candidate_scales(v: torch.Tensor, name: str) -> list[float]:
    """Scales a block may have had: powers of two (MX) or any (NVFP4, checked via the grid)."""
    amax = v.abs().max().item()
    if amax == 0:
        return [1.0]
    if name == "rht-mxfp4":
        e = math.floor(math.log2(amax / 6))
        return [2.0**k for k in range(e - 2, e + 3)]
    # NVFP4: the largest value is one of the FP4 levels times the scale
    return [amax / level for level in (6, 4, 3, 2, 1.5, 1, 0.5)]


def test_mxfp4_preset_scales_by_the_ocp_rule():
    """OCP MX v1.0: the block scale is 2^(floor(log2 amax) - 2), and every value is an FP4
    value times it (the block maximum saturates at 6 when its mantissa is above 1.5)."""
    spec = preset_config("rht-mxfp4").grad
    assert (spec.format, spec.block_size, spec.scale_format) == ("fp4_e2m1", 32, "e8m0")
    assert spec.scale_rounding == "floor"
    plain = QuantSpec(format="fp4_e2m1", granularity="block", scale_format="e8m0",
                      scale_rounding="floor")  # fmt: skip
    x = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = quantize_along(x, plain, (1,), 0).reshape(8, 2, 32)
    amax = x.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    assert torch.all(((q / scale).abs().unsqueeze(-1) - fp4).abs().min(-1).values == 0)
    assert torch.all((amax / scale >= 4) & (amax / scale < 8))  # so the top may clip
    assert torch.all(q.abs().amax(-1, keepdim=True) <= 6 * scale)


def test_round_up_mx_scales_are_powers_of_two_and_never_clip():
    """The round-up convention (scale_rounding "up"): each block's values are FP4 values times
    a power of two; none clips."""
    plain = QuantSpec(format="fp4_e2m1", granularity="block", block_size=32, scale_format="e8m0")
    x = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    qb = quantize_along(x, plain, (1,), 0).reshape(8, 2, 32)
    amax = x.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6)))
    assert torch.all(amax <= 6 * scale)  # the block's largest value fits: no clipping
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    units = (qb / scale).abs().unsqueeze(-1)
    assert torch.all((units - fp4).abs().min(-1).values == 0)


@pytest.mark.parametrize("rounding", ["up", "nearest"])
def test_nvfp4_block_scales_are_e4m3_values_under_the_tensor_scale(rounding):
    """Both roundings store E4M3 scales; the preset's is NVIDIA's nearest rule."""
    assert preset_config("rht-nvfp4").grad.scale_rounding == "nearest"
    spec = QuantSpec(format="fp4_e2m1", granularity="block", block_size=16, scale_format="e4m3",
                     scale_rounding=rounding)  # fmt: skip
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e-3
    from metagrad.quant.scaling import group_scales

    blocks = x.reshape(4, 4, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    scales = group_scales(amax, 6.0, "e4m3", amax.max(), rounding)
    outer = amax.max() / (6 * 448)
    ratio = scales / outer
    assert torch.allclose(ratio.to(torch.float8_e4m3fn).float(), ratio, rtol=1e-6)
    q = quantize_along(x, spec, (1,), 0)
    assert torch.all(q.reshape(4, 4, 16).abs() <= 6 * scales * (1 + 1e-6))


def test_fp8_e5m2_values_are_exactly_representable():
    """FP8 training's gradient format: every scaled value is a float8_e5m2 value."""
    x = _gradient().float()
    spec = preset_config("fp8-e5m2").grad
    q = quantize_along(x, spec, (0,), 1)
    scale = x.abs().max() / 57344
    assert torch.equal((q / scale).to(torch.float8_e5m2).float(), q / scale)
    assert torch.equal(q / scale, (x / scale).to(torch.float8_e5m2).float())


def test_nvfp4_recipe_transforms_only_the_weight_gradient_product():
    config = preset_config("rht-nvfp4")
    err_x, err_w, _, _ = config.backward_specs
    assert err_x.transform is None and err_w.transform == "rht" and err_w.transform_block == 16


def test_presets_keep_the_base_forward_settings_and_backend():
    base = QuantConfig(weight=QuantSpec(8, granularity="channel"), activation=QuantSpec(8))
    config = preset_config("luq", base)
    assert config.weight == base.weight and config.activation == base.activation
    assert config.grad.format == "log4"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown gradient preset 'int3'.*plain"):
        preset_config("int3")


def test_a_new_method_is_one_registration(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", presets._PRESETS.copy())

    @register_preset("int3-sample")
    def int3_sample() -> QuantConfig:
        return QuantConfig(grad=QuantSpec(3, "stochastic", "sample"))

    assert preset_config("int3-sample").grad.bits == 3
    with pytest.raises(ValueError, match="already registered"):
        register_preset("plain")(int3_sample)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains_a_linear_layer_close_to_full_precision(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g, requires_grad=True)
    w = torch.randn(32, 48, generator=g, requires_grad=True)
    e = torch.randn(64, 32, generator=g)
    torch.manual_seed(0)
    linear(x, w, config=preset_config(name)).backward(e)
    ref_x, ref_w = e @ w.detach(), e.T @ x.detach()
    for got, ref in ((x.grad, ref_x), (w.grad, ref_w)):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
        assert cos > 0.9


def test_bhq_scaling_is_its_reference_codes_and_stays_unbiased():
    """BHQ's per-group diagonal scaling (Chen et al. 2020, reference code): the large sample of a
    group times (lambda_1 / sqrt(g))**(-1/3), the small ones times
    (lambda_2 h_max / (g - 1))**(-1/3); T^-1 Q(T x) is still unbiased."""
    from metagrad.quant.transforms import BlockHouseholder, get_transform

    g = 4
    x = _gradient(rows=8) * 1e-2
    x[5] *= 300  # one dominant sample
    rows = x.T.contiguous()  # along the samples
    scaled = get_transform("bhqs", g)
    assert scaled == BlockHouseholder(g, scaled=True)
    state = scaled.prepare(rows, None)
    torch.testing.assert_close(scaled.inverse(scaled.forward(rows, state), state), rows)
    top = x.abs().amax(1)  # each sample's magnitude
    large, small = state.order[0::g], state.order.reshape(-1, g)[:, 1:]
    assert int(large[0]) == 5
    h_max = state.reflection.abs().max()
    expected_large = (top[large] / math.sqrt(g)) ** (-1 / 3)
    expected_small = (top[small].amax(1) * h_max / (g - 1)) ** (-1 / 3)
    torch.testing.assert_close(state.scale[0::g], expected_large)
    torch.testing.assert_close(
        state.scale.reshape(-1, g)[:, 1:], expected_small[:, None].expand(-1, g - 1)
    )
    spec = dataclasses.replace(preset_config("bhq").grad, transform="bhqs", transform_block=g)
    draws = _draws(x, spec, 2000)
    error = (draws.mean(0) - x).abs().max()
    assert error < 6 * draws.std(0).max() / math.sqrt(2000)
