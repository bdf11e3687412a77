import math

import pytest
import torch

from metagrad.quant.quantize import absmax, fake_quantize, fake_quantize_ste, quantize_codes
from metagrad.quant.spec import QuantSpec

BITS = [2, 3, 4, 8]
GRANULARITIES = ["tensor", "channel", "sample"]


def _x(seed: int = 0, shape=(6, 5, 4, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[1]).view(1, -1, 1, 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nearest_error_is_at_most_half_a_step(bits, granularity):
    x = _x()
    spec = QuantSpec(bits, "nearest", granularity)
    codes, scale = quantize_codes(x, spec)
    assert torch.equal(codes, codes.round())
    assert codes.abs().max() <= spec.qmax
    err = (codes * scale - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-6))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_stochastic_error_is_below_one_step(bits, granularity):
    torch.manual_seed(0)
    x = _x()
    codes, scale = quantize_codes(x, QuantSpec(bits, "stochastic", granularity))
    assert torch.equal(codes, codes.round())
    assert torch.all((codes * scale - x).abs() < scale * (1 + 1e-6))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_largest_magnitude_saturates_exactly_to_qmax(granularity):
    x = _x()
    spec = QuantSpec(4, "nearest", granularity)
    codes, scale = quantize_codes(x, spec)
    amax = absmax(x, granularity, channel_dim=1)
    assert scale.shape == amax.shape
    torch.testing.assert_close(scale, amax / spec.qmax)
    # In every group the largest element lands on +-qmax.
    assert torch.all(absmax(codes, granularity, channel_dim=1) == spec.qmax)


@pytest.mark.parametrize(
    ("granularity", "scale_shape"),
    [("tensor", (1, 1, 1, 1)), ("channel", (1, 5, 1, 1)), ("sample", (6, 1, 1, 1))],
)
def test_each_granularity_has_one_scale_per_group(granularity, scale_shape):
    _, scale = quantize_codes(_x(), QuantSpec(8, granularity=granularity))
    assert tuple(scale.shape) == scale_shape


def test_channel_granularity_follows_channel_dim_for_linear_errors():
    x = torch.randn(7, 3, 10)
    _, scale = quantize_codes(x, QuantSpec(8, granularity="channel"), channel_dim=-1)
    assert tuple(scale.shape) == (1, 1, 10)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_stochastic_rounding_is_unbiased(bits, granularity):
    torch.manual_seed(1)
    x = _x(shape=(4, 3, 5, 5))
    spec = QuantSpec(bits, "stochastic", granularity)
    draws = 4000
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += fake_quantize(x, spec)
    mean = total / draws
    _, scale = quantize_codes(x, QuantSpec(bits, "nearest", granularity))
    # Each draw is off by at most one step (std at most scale/2); the 8-bit dither adds at
    # most scale/512 of bias.
    bound = 5 * (scale / 2) / math.sqrt(draws) + scale / 512
    assert torch.all((mean - x).abs() <= bound)
    # Nearest rounding is biased on the same data: the test is able to see bias.
    nearest_bias = (fake_quantize(x, QuantSpec(bits, "nearest", granularity)) - x).abs()
    assert nearest_bias.max() > 10 * bound.max()


def test_nearest_is_deterministic_and_stochastic_follows_the_seed():
    x = _x()
    nearest = QuantSpec(4)
    assert torch.equal(fake_quantize(x, nearest), fake_quantize(x, nearest))
    stochastic = QuantSpec(4, "stochastic")
    torch.manual_seed(3)
    a = fake_quantize(x, stochastic)
    torch.manual_seed(3)
    b = fake_quantize(x, stochastic)
    c = fake_quantize(x, stochastic)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_zero_input_quantizes_to_zero(rounding, granularity):
    x = torch.zeros(3, 4, 2, 2)
    out = fake_quantize(x, QuantSpec(4, rounding, granularity))
    assert torch.equal(out, x)


def test_an_all_zero_group_stays_zero_and_others_are_unaffected():
    x = _x()
    x[:, 2] = 0
    spec = QuantSpec(4, granularity="channel")
    out = fake_quantize(x, spec)
    assert torch.all(out[:, 2] == 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :2], fake_quantize(x[:, :2], spec))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_turn_their_whole_group_into_nan(bad):
    x = _x()
    x[1, 3, 0, 0] = bad
    out = fake_quantize(x, QuantSpec(4, granularity="channel"))
    assert torch.isnan(out[:, 3]).all()
    others = torch.cat([out[:, :3], out[:, 4:]], dim=1)
    assert torch.isfinite(others).all()
    assert torch.isnan(fake_quantize(x, QuantSpec(4))).all()


def test_full_precision_spec_is_the_identity():
    x = _x()
    spec = QuantSpec()
    assert not spec.enabled
    assert fake_quantize(x, spec) is x
    with pytest.raises(ValueError, match="bits < 32"):
        quantize_codes(x, spec)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_and_memory_format_are_preserved(dtype):
    x = _x().to(dtype).contiguous(memory_format=torch.channels_last)
    out = fake_quantize(x, QuantSpec(4, "stochastic", "channel"))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_quantized_values_lie_on_the_grid():
    x = _x()
    out = fake_quantize(x, QuantSpec(3, "nearest", "tensor"))
    assert out.unique().numel() <= 2**3 - 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0}, "bits must be 2..8"),
        ({"bits": 1}, "bits must be 2..8"),
        ({"bits": 9}, "bits must be 2..8"),
        ({"bits": 33}, "bits must be 2..8"),
        ({"bits": 4.0}, "bits must be an integer"),
        ({"bits": True}, "bits must be an integer"),
        ({"bits": 4, "rounding": "floor"}, "rounding must be one of"),
        ({"bits": 4, "granularity": "row"}, "granularity must be one of"),
    ],
)
def test_nonsense_specs_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_spec_names_itself():
    assert str(QuantSpec(4, "stochastic", "sample")) == "int4:sample:stochastic"
    assert str(QuantSpec()) == "fp32"


def test_straight_through_estimator_passes_the_gradient_unchanged():
    x = _x().requires_grad_()
    y = fake_quantize_ste(x, QuantSpec(4))
    torch.testing.assert_close(y.detach(), fake_quantize(x.detach(), QuantSpec(4)))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.999])
def test_stochastic_rounding_bias_is_within_the_dither_resolution(fraction):
    torch.manual_seed(0)
    spec = QuantSpec(8, "stochastic")
    x = torch.full((1_000_000,), 10 + fraction)
    x[0] = 127  # scale = 1: codes are floor(x + u)
    codes, scale = quantize_codes(x, spec)
    assert scale.item() == 1
    mean = codes[1:].mean().item()
    assert abs(mean - (10 + fraction)) <= 1 / 512 + 5 * 0.5 / 1000


def test_a_16_bit_dither_is_two_bytes_of_each_draw_held_in_int32():
    """Held in ``int32`` (compiled CPU kernels vectorise its loads, not ``int16``'s), it holds the
    same numbers as the ``int16`` halves of the 32-bit hashed words."""
    from metagrad.quant.rounding import _dither, _hashed_words

    like = torch.empty(5, 7)
    torch.manual_seed(3)
    dither = _dither(like, None, 16)
    torch.manual_seed(3)
    key = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32)
    words = _hashed_words.eager(torch.empty(18, dtype=torch.int32), key)
    assert dither.dtype == torch.int32 and dither.shape == like.shape
    assert torch.equal(dither.flatten(), words.view(torch.int16)[:35].to(torch.int32))
    assert int(dither.min()) >= -(2**15) and int(dither.max()) < 2**15


@pytest.mark.parametrize("compiled", [False, True])
def test_hashed_dither_bytes_are_uniform_and_independent(compiled):
    """The dither's words hash each index with a key drawn from the generator: every byte value
    equally often (chi-square), neighbours uncorrelated, another key another stream, and the
    compiled kernel the same words as the eager one."""
    from metagrad.quant.rounding import _hashed_words

    n = 1 << 18
    like = torch.empty(n, dtype=torch.int32)
    key = torch.tensor([12345, -678], dtype=torch.int32)
    words = (_hashed_words if compiled else _hashed_words.eager)(like, key)
    if compiled:
        assert torch.equal(words, _hashed_words.eager(like, key))
    data = words.view(torch.uint8).long()
    counts = torch.bincount(data, minlength=256).double()
    expected = data.numel() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5  # 255 degrees of freedom, 5 sigma
    centred = data.double() - 127.5
    for lag in (1, 4):  # the next byte of a word, the same byte of the next word
        r = float((centred[:-lag] * centred[lag:]).mean() / centred.var())
        assert abs(r) < 5 / data.numel() ** 0.5
    other = _hashed_words.eager(like, key + torch.tensor([0, 1], dtype=torch.int32))
    assert float((other == words).double().mean()) < 1e-3


@pytest.mark.parametrize(
    "like",
    [torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last), torch.ones(()),
     torch.full((2, 3), float("nan")), torch.empty(0, 7)],
    ids=["channels-last", "0-d", "nan", "empty"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("low", "high", "dtype"), [(0, 2, torch.int64), (-(2**31), 2**31 - 1, torch.int32)]
)
def test_draw_integers_draws_what_randint_draws_from_either_generator(like, low, high, dtype):
    """The draw takes the numbers ``torch.randint`` takes, from a given generator and from the
    default one, so eager results did not change with it; traced (tied to ``like``, NaN or not)
    it takes them too."""
    from metagrad.quant.draws import draw_integers

    got = draw_integers(like, low, high, 37, torch.Generator().manual_seed(4), dtype)
    want = torch.randint(low, high, (37,), generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert got.dtype == dtype and got.shape == (37,) and torch.equal(got, want)
    torch.manual_seed(9)
    want = torch.randint(low, high, (37,), dtype=dtype)
    torch.manual_seed(9)
    assert torch.equal(draw_integers(like, low, high, 37, dtype=dtype), want)
    torch._dynamo.reset()
    traced = torch.compile(
        lambda t: draw_integers(t, low, high, 37, dtype=dtype), backend="aot_eager", fullgraph=True
    )
    torch.manual_seed(9)
    assert torch.equal(traced(like), want)
