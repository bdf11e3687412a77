"""Number formats, shared scales and transforms (metagrad.quant.formats, scaling, transforms)."""

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from metagrad import kernels
from metagrad.quant import formats
from metagrad.quant.formats import FloatFormat, IntFormat, get_format, register_format
from metagrad.quant.quantize import (
    fake_quantize,
    prepare_transform,
    quantize_along,
    quantize_codes,
    quantize_transformed,
)
from metagrad.quant.rounding import as_rows
from metagrad.quant.scaling import (
    E4M3,
    ceil_to_format,
    ceil_to_power_of_two,
    floor_power_of_two_scale,
    group_scales,
)
from metagrad.quant.spec import QuantSpec
from metagrad.quant.transforms import BlockHouseholder, RandomizedHadamard, hadamard_matrix


def _draws(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_fp8_nearest_rounding_equals_torch_casts(name, dtype):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    # every binade from below the subnormals to the largest value, plus exact grid points
    exponents = torch.randint(fmt.min_exponent - fmt.mantissa - 2, fmt.max_exponent + 1, (50000,))
    y = torch.ldexp(torch.rand(50000, generator=g) + 1, exponents) * torch.sign(
        torch.randn(50000, generator=g)
    )
    y = y.clamp(-fmt.max_value, fmt.max_value)
    y = torch.cat([y, y.to(dtype).float()])
    assert torch.equal(fmt.round(y, None), y.to(dtype).float())


def test_named_float_formats_have_their_standard_ranges():
    assert get_format("fp8_e4m3").max_value == 448
    assert get_format("fp8_e5m2").max_value == 57344
    assert get_format("fp4_e2m1").max_value == 6
    assert get_format("log4").max_value == 16


def test_fp4_e2m1_grid_is_the_standard_one():
    y = torch.linspace(-8, 8, 1601)
    values = get_format("fp4_e2m1").round(y, None).unique().tolist()
    grid = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert values == sorted({s * v for v in grid for s in (1, -1)})


def test_log4_holds_zero_and_seven_powers_of_two():
    y = torch.rand(20000) * 16
    values = get_format("log4").round(y, _draws(20000)).unique().tolist()
    assert values == [0, 0.25, 0.5, 1, 2, 4, 8, 16]


@pytest.mark.parametrize("name", ["int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "log4"])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(name):
    fmt = get_format(name)
    y = torch.tensor([0.013, 0.3, 0.74, 1.26, 2.2, 3.9, 5.1]) * (fmt.max_value / 6)
    n = 20000
    out = fmt.round(y.repeat(n, 1), _draws(7 * n).view(n, 7))
    down, up = fmt.round(y, torch.zeros(7, dtype=torch.uint8)), fmt.round(y, None)
    assert torch.all((out == out.amin(0)) | (out == out.amax(0)))  # two values per element
    lo = torch.minimum(down, up)
    assert torch.all(out >= lo - 1e-12)
    step = out.amax(0) - out.amin(0)
    # unbiased up to the 8-bit dither resolution and the sampling error
    tol = step * (1 / 512 + 4 * 0.5 / math.sqrt(n)) + 1e-12
    assert torch.all((out.mean(0) - y).abs() <= tol)


def test_stochastic_underflow_below_the_smallest_normal():
    fmt = get_format("log4")
    y = torch.full((40000,), fmt.min_normal * 0.1)
    out = fmt.round(y, _draws(40000))
    assert set(out.unique().tolist()) == {0.0, fmt.min_normal}
    assert out.mean().item() == pytest.approx(y[0].item(), rel=0.1)


def test_rounding_saturates_and_keeps_nan():
    fmt = get_format("fp4_e2m1")
    out = fmt.round(torch.tensor([7.5, -100.0, float("nan")]), None)
    assert out[:2].tolist() == [6, -6] and math.isnan(out[2])


def test_format_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown number format 'fp5'"):
        get_format("fp5")
    with pytest.raises(ValueError, match="IntFormat bits"):
        IntFormat(9)
    with pytest.raises(ValueError, match="exponent bits"):
        FloatFormat(0, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_format("fp8_e4m3", FloatFormat(4, 3))
    with pytest.raises(ValueError, match="unknown number format"):
        QuantSpec(format="nope")


def test_a_new_format_is_one_registration(monkeypatch):
    monkeypatch.setattr(formats, "_FORMATS", formats._FORMATS.copy())
    register_format("fp6_e3m2", FloatFormat(3, 2))
    spec = QuantSpec(format="fp6_e3m2", granularity="block", block_size=8)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    q = fake_quantize(x, spec, channel_dim=1)
    assert q.shape == x.shape and 0 < (q - x).norm() < 0.1 * x.norm()


def test_an_integer_format_by_name_is_the_integer_spec():
    assert QuantSpec(format="int4", rounding="stochastic") == QuantSpec(4, "stochastic")


def test_integer_specs_quantize_alike_on_both_paths():
    """The general quantizer, given an integer spec, reproduces the integer codes path."""
    x = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    for granularity in ("tensor", "channel", "sample"):
        spec = QuantSpec(4, "stochastic", granularity)
        fast = fake_quantize(x, spec, 1, generator=torch.Generator().manual_seed(1))
        general = quantize_along(x, spec, (0,), 1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(fast, general)


def test_power_of_two_scales_round_up():
    s = torch.tensor([0.3, 0.5, 1.0, 3.0, 1e-30])
    assert ceil_to_power_of_two(s).tolist() == [0.5, 0.5, 1.0, 4.0, 2.0**-99]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_power_of_two_scales_read_from_bits_match_frexp(dtype):
    """The scales built from the exponent bits equal their ``frexp``/``ldexp`` definition on
    every binade of float32, either side of each power of two and on subnormals, and clamp to
    E8M0's range."""
    g = torch.Generator().manual_seed(0)
    powers = torch.pow(2.0, torch.arange(-149, 128, dtype=torch.float64)).to(dtype)
    below = torch.nextafter(powers, torch.zeros_like(powers))
    above = torch.nextafter(powers, torch.full_like(powers, float("inf")))
    spread = torch.rand(20000, generator=g, dtype=torch.float64)
    spread = (spread * 10.0 ** torch.randint(-45, 39, (20000,), generator=g)).to(dtype)
    x = torch.cat([powers, below, above, spread])
    x = x[(x > 0) & torch.isfinite(x)]
    mantissa, exponent = torch.frexp(x)
    up = torch.where(mantissa == 0.5, exponent - 1, exponent).clamp(-127, 127)
    assert torch.equal(ceil_to_power_of_two(x), torch.ldexp(torch.ones_like(x), up))
    for emax in (0, 2, 8, 15):
        floor = (exponent - 1 - emax).clamp(-127, 127)
        expected = torch.ldexp(torch.ones_like(x), floor)
        assert torch.equal(floor_power_of_two_scale(x, emax), expected)


def test_e4m3_ceiling_is_the_next_value_of_the_grid():
    codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].sort().values  # every non-negative E4M3 value
    r = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 448
    r = torch.cat([r, grid[:50], torch.tensor([1e-4])])
    expected = grid[torch.searchsorted(grid, r)]  # the first grid value >= r
    assert torch.equal(ceil_to_format(r, E4M3), expected)


@pytest.mark.parametrize("scale_format", ["float32", "e8m0", "e4m3"])
def test_group_scales_never_clip_and_keep_zero_and_nan_groups_visible(scale_format):
    amax = torch.tensor([0.0, 1e-3, 2.5, 77.0, float("inf")])
    scale = group_scales(amax, 6.0, scale_format, tensor_amax=torch.tensor(77.0))
    assert scale[0] == 1 and math.isnan(scale[4])
    assert torch.all(amax[1:4] / scale[1:4] <= 6.0 * (1 + 1e-6))


def test_hadamard_matrix_is_orthonormal():
    for n in (1, 2, 16, 128):
        h = hadamard_matrix(n, torch.float64)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


@pytest.mark.parametrize("transform", [RandomizedHadamard(32), BlockHouseholder(8)])
def test_transforms_are_orthogonal(transform):
    t = torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t[:, 5] *= 100  # an outlier position
    state = transform.prepare(t, torch.Generator().manual_seed(1))
    forward = transform.forward(t, state)
    assert torch.allclose(forward.norm(dim=1), t.norm(dim=1))
    assert torch.allclose(transform.inverse(forward, state), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rht_gain_equals_rescaling_its_input_bit_for_bit(dtype):
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    rht = RandomizedHadamard(32)
    state = rht.prepare(t, torch.Generator().manual_seed(1))
    for gain in (2.0**-32, 1.0, 4.0):
        scaled = rht.forward(t * gain, state)
        assert torch.equal(rht.forward(t, state, gain=torch.tensor(gain)), scaled)


def test_hadamard_spreads_an_outlier_over_its_block():
    t = torch.zeros(1, 32, dtype=torch.float64)
    t[0, 3] = 1.0
    rht = RandomizedHadamard(32)
    out = rht.forward(t, rht.prepare(t, torch.Generator().manual_seed(0)))
    assert torch.allclose(out.abs(), torch.full_like(out, 1 / math.sqrt(32)))


def test_block_householder_spreads_the_largest_position_over_its_group():
    t = torch.ones(3, 16, dtype=torch.float64) * 0.01
    t[:, 7] = 10.0
    bhq = BlockHouseholder(4)
    state = bhq.prepare(t, None)
    out = bhq.forward(t, state)
    group = state.order[:4]
    assert group[0] == 7
    assert out.abs().max() < 10.0 / 2 + 0.1  # shared by the group's four positions


def test_transform_validation():
    with pytest.raises(ValueError, match="power of two"):
        RandomizedHadamard(24)
    with pytest.raises(ValueError, match="unknown transform"):
        QuantSpec(bits=4, transform="fft")


def test_rht_pads_rows_whose_length_is_not_a_multiple_of_the_block():
    spec = QuantSpec(format="fp8_e4m3", transform="rht", transform_block=16)
    x = torch.randn(5, 75, generator=torch.Generator().manual_seed(0))
    q = quantize_along(x, spec, (1,), 0, generator=torch.Generator().manual_seed(0))
    assert q.shape == x.shape and (q - x).norm() < 0.05 * x.norm()


MXFP4_RHT = QuantSpec(
    format="fp4_e2m1",
    rounding="stochastic",
    granularity="block",
    block_size=32,
    scale_format="e8m0",
    transform="rht",
    transform_block=64,
)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    ("spec", "shape", "inner", "channels_last"),
    [
        (MXFP4_RHT, (8, 16, 96), (2,), False),  # rows, fused
        (MXFP4_RHT, (8, 16, 96), (0, 1), False),  # across memory, fused
        (MXFP4_RHT, (4, 40, 8, 8), (0, 2, 3), True),  # a channels-last error's columns
        (MXFP4_RHT, (6, 70), (1,), False),  # padded to whole transform blocks
        (dataclasses.replace(MXFP4_RHT, block_size=16, transform_block=16), (6, 24), (1,), False),
        (QuantSpec(bits=4, rounding="stochastic", transform="rht"), (12, 40), (0,), False),
    ],
)
def test_transformed_rows_are_the_quantized_values_before_the_inverse(
    spec, shape, inner, channels_last, compiled
):
    """quantize_transformed returns Q(T x), rows padded to the transform's length: transformed
    back (float64) they are quantize_along's values from the same draws, and each block of
    them lies on the FP4 grid times one power-of-two scale (nothing rounded after the grid)."""
    if compiled and not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    state = prepare_transform(x, spec, inner, torch.Generator().manual_seed(1))
    with kernels.compiled(compiled):
        laid_back, rows = (
            fn(x, spec, inner, generator=torch.Generator().manual_seed(2), transform_state=state)
            for fn in (quantize_along, quantize_transformed)
        )
    reference, _ = as_rows(laid_back.double(), inner)
    length = reference.shape[1]
    assert rows.shape == (
        reference.shape[0],
        RandomizedHadamard(spec.transform_block).padded_length(length),
    )
    signs = state.signs.double()
    back = RandomizedHadamard(spec.transform_block).inverse(
        rows.double(), type(state)(signs, state.block)
    )
    assert torch.allclose(back[:, :length], reference, atol=1e-5 * reference.abs().max())
    if spec.granularity == "block":
        blocks = rows.reshape(-1, spec.block_size).double()
        top = blocks.abs().amax(1, keepdim=True)
        scale = torch.exp2(torch.ceil(torch.log2(top / 6))).clamp_min(2.0**-126)
        grid = blocks / scale
        assert torch.equal(FloatFormat(2, 1).round(grid.float(), None).double(), grid)


def test_quantize_transformed_needs_a_transform_along_the_contraction():
    with pytest.raises(ValueError, match="inner transform"):
        quantize_transformed(torch.randn(4, 8), QuantSpec(bits=4), (1,))


def test_compiled_dequantize_kernel_equals_the_eager_one():
    if not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    specs = [
        QuantSpec(
            format="fp4_e2m1",
            rounding="stochastic",
            granularity="block",
            block_size=32,
            scale_format="e8m0",
        ),
        QuantSpec(format="log4", rounding="stochastic"),
    ]
    for spec in specs:
        eager = quantize_along(x, spec, (1,), 0, generator=torch.Generator().manual_seed(1))
        with kernels.compiled():
            fused = quantize_along(x, spec, (1,), 0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(eager, fused)


def test_registry_refuses_a_name_twice_and_names_the_choices():
    from metagrad.registry import Registry

    reg: Registry[int] = Registry("widget")
    assert reg.add("a", 1) == 1 and reg.lookup("a") == 1
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="unknown widget 'b'; available: a"):
        reg.lookup("b")
    copy = reg.copy()
    copy.add("b", 2)
    assert isinstance(copy, Registry) and copy.kind == "widget" and "b" not in reg


@dataclasses.dataclass(frozen=True)
class Reverse:
    """A test transform: a reversal of each block of a row (an orthogonal permutation)."""

    axis: ClassVar[str] = "inner"
    data_dependent: ClassVar[bool] = False
    low_precision: ClassVar[bool] = True
    block: int = 4

    def padded_length(self, length: int) -> int:
        return -(-length // self.block) * self.block

    def prepare(self, t, generator):
        return None

    def forward(self, t, state):
        return t.reshape(t.shape[0], -1, self.block).flip(-1).reshape(t.shape)

    def inverse(self, t, state):
        return self.forward(t, state)


def test_a_new_transform_is_one_registration(monkeypatch):
    """A registered transform (here: a reversal of each block, an orthogonal permutation) is
    used by QuantSpec and undone after quantization."""
    from metagrad.quant import transforms

    monkeypatch.setattr(transforms, "_TRANSFORMS", transforms._TRANSFORMS.copy())
    transforms.register_transform("reverse", Reverse)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(
        format="fp8_e4m3", granularity="block", block_size=4, transform="reverse", transform_block=4
    )
    plain = QuantSpec(format="fp8_e4m3", granularity="block", block_size=4)
    # reversing whole blocks leaves each block's scale and values as they are
    assert torch.equal(quantize_along(x, spec, (1,), 0), quantize_along(x, plain, (1,), 0))
    with pytest.raises(ValueError, match="already registered"):
        transforms.register_transform("rht", RandomizedHadamard)


def test_a_blockwise_transform_without_columns_still_takes_a_channels_last_error(monkeypatch):
    """A registered blockwise transform that does not say ``acts_on_columns`` gets rows (a
    transposed copy) where a channels-last error's rows run down its memory."""
    from metagrad.quant import transforms

    class BlockReverse(Reverse):
        def blockwise(self, state) -> int:
            return self.block

        def forward(self, t, state, gain=None):
            out = super().forward(t, state)
            return out if gain is None else out * gain.to(t.dtype)

    monkeypatch.setattr(transforms, "_TRANSFORMS", transforms._TRANSFORMS.copy())
    transforms.register_transform("block-reverse", BlockReverse)
    spec = QuantSpec(
        format="fp8_e4m3",
        rounding="stochastic",
        granularity="block",
        block_size=4,
        transform="block-reverse",
        transform_block=4,
    )
    x = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    error = x.contiguous(memory_format=torch.channels_last)
    got = quantize_along(error, spec, (0, 2, 3), 1, generator=torch.Generator().manual_seed(1))
    want = quantize_along(x, spec, (0, 2, 3), 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)


# ------------------------------------------------------------ no finite input gives inf/NaN

FP32_MAX = torch.finfo(torch.float32).max
EDGES = [
    FP32_MAX,
    -FP32_MAX,
    math.nextafter(FP32_MAX, 0),
    3.3e38,
    2.98e38,
    2.58e38,
    1.7e38,
    1e-45,  # the smallest subnormal
    -3e-42,
    1.1754942e-38,  # just below the smallest normal
    0.0,
    -0.0,
    1.0,
]


def _edge_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows of 4 (blocks, tiles of 4) from pairs of edge values: all-equal blocks, blocks of
    zeros, the largest float next to subnormals; rows that are not finite in ``dtype`` (the
    float32 maximum in bf16) are left out."""
    rows = []
    for a in EDGES:
        for b in EDGES:
            rows += [[a, a, a, a], [a, b, 0.0, -0.0], [b, a, b, b]]
    x = torch.tensor(rows).to(dtype)
    return x[torch.isfinite(x).all(1)]


def _every_spec():
    from metagrad.quant.scaling import list_scale_roundings

    for name in ["int2", "int4", "int8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "log4"]:
        for scale_format in ["float32", "e8m0", "e4m3"]:
            for scale_rounding in list_scale_roundings(scale_format):
                for granularity in ["tensor", "channel", "block", "tile"]:
                    for transform in [None, "rht"]:
                        yield QuantSpec(
                            format=name,
                            rounding="stochastic",
                            granularity=granularity,
                            block_size=4,
                            scale_format=scale_format,
                            scale_rounding=scale_rounding,
                            prescale=0.75 if scale_rounding == "floor" else 1.0,
                            transform=transform,
                            transform_block=4,
                        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_finite_input_gives_a_non_finite_output(dtype):
    """Every format, scale format, scale rounding, granularity and transform, at the edges of
    float32: the largest finite values (whose scaled values once rounded past it), subnormals,
    signed zeros, all-equal blocks and blocks of zeros."""
    x = _edge_rows(dtype)
    for spec in _every_spec():
        for rounding in ("nearest", "stochastic"):
            s = dataclasses.replace(spec, rounding=rounding)
            q = fake_quantize(x, s, 0, inner=(1,))
            assert q.dtype == dtype and torch.isfinite(q).all(), s
            zero = x == 0
            if s.transform is None:  # zeros stay zeros, of the same sign to nearest
                assert (q[zero] == 0).all(), s
                if rounding == "nearest":
                    assert torch.equal(q[zero].signbit(), x[zero].signbit()), s


def test_the_issue_overflow_cases_saturate():
    """FP4 with E8M0 scales from ~2.98e38, and FP8 from ~3e38, rounded to 2^128 before."""
    for name in ("fp4_e2m1", "fp8_e4m3", "fp8_e5m2"):
        spec = QuantSpec(format=name, granularity="block", block_size=32, scale_format="e8m0")
        for value in (2.98e38, 3.3e38, FP32_MAX):
            q = quantize_along(torch.tensor([[value] + [0.0] * 31]), spec, inner=(1,))
            assert torch.isfinite(q).all() and 0.75 * value <= q[0, 0] <= FP32_MAX
        top = quantize_along(torch.tensor([[FP32_MAX] + [0.0] * 31]), spec, inner=(1,))
        assert top[0, 0] == FP32_MAX  # 4 * 2^126 (FP4) or 256 * 2^120 (FP8): saturated


def test_integer_codes_of_subnormal_and_huge_groups_stay_finite():
    x = torch.tensor([[1e-45, -1e-45, 0.0], [FP32_MAX, -FP32_MAX, 1.0], [3e-40, 1e-41, 0.0]])
    for spec in (QuantSpec(4, "stochastic", "sample"), QuantSpec(8, "nearest", "sample")):
        assert torch.isfinite(fake_quantize(x, spec)).all()
        _, scale = quantize_codes(x, spec)
        assert (scale >= torch.finfo(torch.float32).tiny).all()


# --------------------------------------------------------------------------- the dither


def _neighbours(a: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values below and above ``a`` >= 0 (not within 2^-17 of a step of either)."""
    lo = fmt.round(a, torch.full_like(a, -(2**15), dtype=torch.int16))  # + 2^-17: lo
    hi = fmt.round(a, torch.full_like(a, 2**15 - 1, dtype=torch.int16))  # + 1 - 2^-17: hi
    return lo, hi


def _exact_expectation(y: torch.Tensor, fmt, bits: int) -> torch.Tensor:
    """E[round(y)] over the 2^bits dither values, from the definition: the grid neighbours lo
    and hi of |y|, and hi with probability #{k : (k + 0.5) / 2^bits >= 1 - f}, f the fraction
    (|y| - lo) / (hi - lo)."""
    a = y.abs()
    lo, hi = _neighbours(a, fmt)
    step = hi - lo
    frac = torch.where(step > 0, (a - lo) / step, torch.zeros_like(a))
    levels = 2**bits
    ups = (levels - torch.ceil(levels * (1 - frac) - 0.5)).clamp(0, levels)
    return (lo + step * ups / levels).copysign(y)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", ["int8", "fp4_e2m1", "log4"])
def test_stochastic_rounding_is_exact_to_its_dither_resolution(name, bits):
    """Over every dither value, the mean of the rounded values is the exact expectation at that
    resolution, within 2^-(bits+1) of a step of the input."""
    fmt = get_format(name)
    y = torch.tensor([0.013, 0.3, 0.74, 1.26, 2.2, 3.9, 5.1], dtype=torch.float64)
    y = torch.cat([y * fmt.max_value / 6, torch.tensor([1e-3, 3e-5]) * fmt.max_value / 16])
    levels = 2**bits
    dither = torch.arange(levels).sub(0 if bits == 8 else 2**15).to(formats.dither_dtype(bits))
    out = fmt.round(y.repeat(levels, 1), dither[:, None].expand(levels, len(y)))
    mean = out.mean(0)
    exact = _exact_expectation(y, fmt, bits)
    assert torch.allclose(mean, exact, rtol=0, atol=1e-12)
    lo, hi = _neighbours(y, fmt)
    assert torch.all((mean - y).abs() <= (hi - lo) * 2.0 ** -(bits + 1) + 1e-12)


def test_a_16_bit_dither_is_unbiased_in_quantize_along():
    """Many draws of the whole quantizer (dither16): the mean is the exact expectation at 16
    bits, within 5 standard errors."""
    x = torch.tensor([[6.0, 0.0123, 1.2345, -2.71, 0.5001, 4.9]], dtype=torch.float64)
    spec = QuantSpec(format="fp4_e2m1", rounding="stochastic", dither_bits=16)
    n = 40000
    g = torch.Generator().manual_seed(0)
    q = quantize_along(x.expand(n, 6), spec, (1,), 0, generator=g)  # one scale per row
    exact = _exact_expectation(x[0], get_format("fp4_e2m1"), 16)
    spread = q.std(0) / math.sqrt(n) * 5 + 1e-9
    assert torch.all((q.mean(0) - exact).abs() <= spread)


def test_luq_stochastic_underflow_keeps_small_values_at_their_probability():
    """LUQ's preset draws 16 dither bits: x at 1e-3 of the underflow threshold alpha comes out
    alpha with probability ~1e-3 (the exact 16-bit probability is 66 / 65536); an 8-bit dither
    flushes it to zero every time."""
    from metagrad.quant.presets import preset_config

    spec = preset_config("luq").grad
    assert spec.dither_bits == 16
    top, n = 64.0, 1_000_000
    alpha = top / 16 * 0.25  # the smallest level: amax maps to 2^4, the smallest is 2^-2
    x = torch.full((n + 1,), alpha * 1e-3, dtype=torch.float64)
    x[0] = top
    q = quantize_along(x, spec, (0,), 0, generator=torch.Generator().manual_seed(0))[1:]
    assert set(q.unique().tolist()) <= {0.0, alpha}
    p = 66 / 65536
    count = int((q != 0).sum())
    assert abs(count - n * p) <= 6 * math.sqrt(n * p)
    eight = dataclasses.replace(spec, dither_bits=8)
    q8 = quantize_along(x, eight, (0,), 0, generator=torch.Generator().manual_seed(0))[1:]
    assert (q8 == 0).all()


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [16, 12])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_rows_shorter_than_a_scale_block_take_the_fused_kernel_with_the_same_values(
    monkeypatch, rounding, length, dtype, compile_kernels
):
    """Rows shorter than MXFP4's block of 32 (a 16-channel convolution's error along its
    channels) are one Hadamard block each, zero-padded to a scale block: the fused kernel gives
    what the step-by-step path gives from the same draws."""
    from metagrad.quant import transformed as transformed_module
    from metagrad.quant.presets import preset_config

    if compile_kernels and not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    spec = dataclasses.replace(preset_config("rht-mxfp4").grad, rounding=rounding)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, length, 5, 5, generator=gen) * torch.rand(6, 1, 5, 5, generator=gen) ** 3
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    stepwise = transformed_module._quantize_transformed

    def not_called(*args, **kwargs):
        raise AssertionError("the step-by-step path was taken")

    with kernels.compiled(compile_kernels):
        monkeypatch.setattr(transformed_module, "_quantize_transformed", not_called)
        fused = quantize_along(x, spec, (1,), 0, generator=torch.Generator().manual_seed(1))
        monkeypatch.setattr(transformed_module, "_quantize_transformed", stepwise)
        monkeypatch.setattr(transformed_module, "_fused_block", lambda *args: 0)
        want = quantize_along(x, spec, (1,), 0, generator=torch.Generator().manual_seed(1))
    assert fused.dtype == want.dtype and torch.equal(fused, want)
    assert (fused - x.float()).norm() < 0.3 * x.float().norm()
