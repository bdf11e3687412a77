"""Backends chosen by name through a registry (metagrad.backward)."""

import pytest
import torch
import torch.nn.functional as F

from metagrad.backward import Backend, get_backend, list_backends, register_backend
from metagrad.nn.functional import conv2d, linear
from metagrad.quant import QuantConfig, QuantSpec, fake_quantize
from metagrad.quant.spec import BACKENDS


def test_builtin_backends_are_registered():
    assert list_backends()[:2] == ["simulate", "int8"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'fpga'; available: simulate, int8"):
        QuantConfig(backend="fpga")


class Float64(Backend):
    """A toy backend: both passes in float64, the error fake-quantized as the config says."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, config):
        return "needs 4-bit gradients" if config.grad.bits != 4 else None

    def linear_forward(self, x, weight, bias, config):
        self.calls.append("linear forward")
        b = None if bias is None else bias.double()
        return F.linear(x.double(), weight.double(), b).to(x.dtype), ()

    def conv2d_forward(self, x, weight, bias, conv, config):
        self.calls.append("conv2d forward")
        b = None if bias is None else bias.double()
        return F.conv2d(x.double(), weight.double(), b, *conv).to(x.dtype), ()

    def linear_backward(self, e, x, weight, config, mask, dtypes, saved):
        self.calls.append("linear backward")
        q = fake_quantize(e, config.grad, -1).double()
        grad_x = q @ weight.double() if mask[0] else None
        grad_w = q.t() @ x.double() if mask[1] else None
        return grad_x, grad_w, q.sum(0) if mask[2] else None

    def conv2d_backward(self, e, x, weight, conv, config, mask, dtypes, saved):
        self.calls.append("conv2d backward")
        q = fake_quantize(e, config.grad, 1).double()
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            q, x.double(), weight.double(), None, *conv[:3], False, [0, 0], conv[3], mask
        )
        return grad_x, grad_w, grad_b


@pytest.fixture
def float64_backend():
    yield register_backend("float64", Float64())
    del BACKENDS["float64"]


def test_a_new_backend_is_one_registration(float64_backend):
    """A registered backend computes the forward and backward of every layer configured with
    it, and its own check refuses the configs it cannot run."""
    backend = float64_backend
    config = QuantConfig(grad=QuantSpec(4, "nearest"), backend="float64")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, requires_grad=True)
    conv2d(x, w, config=config, padding=1).sum().backward()
    a = torch.randn(5, 8, generator=g, requires_grad=True)
    v = torch.randn(3, 8, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    out = linear(a, v, b, config=config)
    out.backward(torch.linspace(-1, 1, 15).view(5, 3))
    assert backend.calls == [
        "conv2d forward",
        "conv2d backward",
        "linear forward",
        "linear backward",
    ]
    # The backward used the 4-bit error: dL/db is the sum of its rows, on the 4-bit grid.
    e = torch.linspace(-1, 1, 15).view(5, 3)
    q = fake_quantize(e, QuantSpec(4, "nearest"), -1)
    torch.testing.assert_close(b.grad, q.sum(0))
    torch.testing.assert_close(v.grad, q.t() @ a.detach())
    torch.testing.assert_close(out, F.linear(a, v, b))
    with pytest.raises(ValueError, match="needs 4-bit gradients"):
        QuantConfig(backend="float64")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("int8", get_backend("int8"))
