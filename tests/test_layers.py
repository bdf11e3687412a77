import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import QuantConfig, QuantConv2d, QuantLinear, QuantSpec, quantize, quantize_
from metagrad.nn import functional as QF
from metagrad.quant.quantize import fake_quantize

GRANULARITIES = ["tensor", "channel", "sample"]
ROUNDINGS = ["nearest", "stochastic"]
CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, spatial)
    (3, 8, 3, 1, 1, 1, 1, 9),
    (5, 7, 3, 2, 1, 1, 1, 11),
    (4, 6, 1, 2, 0, 1, 1, 8),
    (6, 6, 3, 1, 2, 2, 1, 7),
    (6, 9, 3, 1, 1, 1, 3, 6),
]


def _config(bits=4, rounding="nearest", granularity="tensor") -> QuantConfig:
    return QuantConfig(grad=QuantSpec(bits, rounding, granularity))


def _conv_pair(case, config, bias=True):
    cin, cout, k, stride, padding, dilation, groups, _ = case
    ref = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
    q = QuantConv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias, config=config)
    q.load_state_dict(ref.state_dict())
    return ref, q


def _grads(module, x, e):
    x = x.clone().requires_grad_()
    module.zero_grad()
    module(x).backward(e)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return grads


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_at_32_bits_is_bit_identical_to_pytorch(case, channels_last):
    torch.manual_seed(0)
    ref, q = _conv_pair(case, _config(bits=32))
    x = torch.randn(3, case[0], case[-1], case[-1])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    e = torch.randn_like(ref(x))
    assert torch.equal(ref(x), q(x))
    for a, b in zip(_grads(ref, x, e), _grads(q, x, e), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 10)])
def test_linear_at_32_bits_is_bit_identical_to_pytorch(shape):
    torch.manual_seed(0)
    ref = nn.Linear(10, 6)
    q = QuantLinear(10, 6, config=_config(bits=32))
    q.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    e = torch.randn(*shape[:-1], 6)
    for a, b in zip(_grads(ref, x, e), _grads(q, x, e), strict=True):
        assert torch.equal(a, b)


def _reference_conv_grads(case, ref, x, q_error):
    """dL/dx, dL/dW, dL/db in float64 for a given (already quantized) error."""
    stride, padding, dilation, groups = case[3:7]
    x64 = x.double().requires_grad_()
    w64 = ref.weight.detach().double().requires_grad_()
    b64 = ref.bias.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    return torch.autograd.grad(y, (x64, w64, b64), q_error.double())


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_conv_backward_uses_one_quantized_error_for_every_product(case, granularity, rounding):
    torch.manual_seed(0)
    config = _config(4, rounding, granularity)
    ref, q = _conv_pair(case, config)
    x = torch.randn(4, case[0], case[-1], case[-1])
    e = torch.randn_like(ref(x))
    torch.manual_seed(7)
    got = _grads(q, x, e)
    torch.manual_seed(7)  # the same noise as the layer drew
    q_error = fake_quantize(e, config.grad, channel_dim=1)
    assert not torch.equal(q_error, e)
    expected = _reference_conv_grads(case, ref, x, q_error)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    # The full-precision gradient is measurably different: quantization really happened.
    fp = _reference_conv_grads(case, ref, x, e)
    assert not torch.allclose(got[1].double(), fp[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape", [(5, 12), (3, 4, 12)])
def test_linear_backward_matches_float64_reference(granularity, rounding, shape):
    torch.manual_seed(0)
    config = _config(4, rounding, granularity)
    layer = QuantLinear(12, 7, config=config)
    x = torch.randn(shape)
    e = torch.randn(*shape[:-1], 7)
    torch.manual_seed(7)
    got = _grads(layer, x, e)
    torch.manual_seed(7)
    q_error = fake_quantize(e, config.grad, channel_dim=-1).double()
    x64 = x.double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    expected = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), q_error)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_forward_is_unchanged_when_only_gradients_are_quantized():
    torch.manual_seed(0)
    ref, q = _conv_pair(CONV_CASES[0], _config(2, "stochastic"))
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(ref(x), q(x))


def test_forward_quantization_uses_straight_through_gradients():
    torch.manual_seed(0)
    fwd = QuantSpec(4)
    config = QuantConfig(
        grad=QuantSpec(), weight=QuantSpec(4, granularity="channel"), activation=fwd
    )
    layer = QuantConv2d(3, 5, 3, padding=1, config=config)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = layer(x)
    wq = fake_quantize(layer.weight.detach(), config.weight, channel_dim=0)
    xq = fake_quantize(x.detach(), fwd)
    torch.testing.assert_close(y, F.conv2d(xq, wq, layer.bias, padding=1))
    e = torch.randn_like(y)
    y.backward(e)
    wq_leaf = wq.clone().requires_grad_()
    xq_leaf = xq.clone().requires_grad_()
    F.conv2d(xq_leaf, wq_leaf, layer.bias.detach(), padding=1).backward(e)
    torch.testing.assert_close(layer.weight.grad, wq_leaf.grad)
    torch.testing.assert_close(x.grad, xq_leaf.grad)


def test_padding_modes_and_string_padding():
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")
    q = QuantConv2d(3, 4, 3, padding="same", padding_mode="reflect", config=_config(bits=32))
    q.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(ref(x), q(x))
    assert QF.resolve_padding("valid", (3, 3), (1, 1)) == (0, 0)
    with pytest.raises(ValueError, match="symmetric padding"):
        QF.resolve_padding("same", (2, 2), (1, 1))


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_quantize_in_place_keeps_parameters_so_existing_optimizers_work():
    torch.manual_seed(0)
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = quantize_(model, _config(4))
    assert report.converted == {"0": "Conv2d", "3.0": "Conv2d", "6": "Linear"}
    assert report.unconverted == {}
    assert isinstance(model[0], QuantConv2d)
    assert isinstance(model[3][0], QuantConv2d)
    assert isinstance(model[6], QuantLinear)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    before = model[0].weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_quantize_filter_skips_first_and_last_layers():
    model = _model()
    report = quantize_(model, _config(4), filter_fn=lambda m, name: name not in {"0", "6"})
    assert report.unconverted == {"0": "excluded by filter", "6": "excluded by filter"}
    assert type(model[0]) is nn.Conv2d
    assert isinstance(model[3][0], QuantConv2d)
    assert type(model[6]) is nn.Linear


def test_quantize_returns_a_copy_and_leaves_the_original():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    converted = quantize(model, _config(4))
    assert type(model[0]) is nn.Conv2d
    assert isinstance(converted[0], QuantConv2d)
    assert converted[0].weight is not model[0].weight
    for k, v in converted.state_dict().items():
        assert torch.equal(v, state[k])


def test_quantize_rejects_a_bare_layer_and_reconfigures_quantized_ones():
    with pytest.raises(ValueError, match="inside a model"):
        quantize_(nn.Linear(3, 3))
    model = quantize(_model(), _config(4))
    report = quantize_(model, _config(8))
    assert list(report.already_converted) == ["0", "3.0", "6"] and not report.converted
    assert model[0].config.grad.bits == 8


def test_quant_config_validates():
    with pytest.raises(ValueError, match="unknown backend"):
        QuantConfig(backend="fp7")
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantConfig(grad=4)
    assert "grad=int4," in str(_config(4))


def test_paired_gradients_are_fp32_and_quantized_weight_gradients_of_one_batch():
    from metagrad.meta.diagnostics import paired_gradients
    from metagrad.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1)
    spec = QuantSpec(bits=4, rounding="stochastic")
    quantize_(model, QuantConfig(grad=spec))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    pairs = paired_gradients(model, x, y)

    reference = copy.deepcopy(model)
    quantize_(reference, QuantConfig(grad=QuantSpec()))  # 32-bit: PyTorch's own backward
    F.cross_entropy(reference(x), y).backward()
    layers = dict(reference.named_modules())
    quantized_names = [
        n for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
    ]
    assert list(pairs) == quantized_names
    for name, (full, quantized) in pairs.items():
        torch.testing.assert_close(full, layers[name].weight.grad)
        assert quantized.shape == full.shape and not torch.equal(quantized, full)
        assert F.cosine_similarity(quantized.flatten(), full.flatten(), dim=0) > 0.3
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
