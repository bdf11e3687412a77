"""Backends chosen by name through a registry (metagrad.backends)."""

import pytest
import torch

from metagrad import backends
from metagrad.backends import Backend, get_backend, list_backends, register_backend
from metagrad.functional import QuantConfig, conv2d, linear
from metagrad.quant import QuantSpec


def test_builtin_backends_are_registered():
    assert list_backends()[:2] == ["simulate", "int8"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'fpga'; available: simulate, int8"):
        QuantConfig(backend="fpga")


def test_a_new_backend_is_one_registration(monkeypatch):
    """A registered backend receives every backward of the layers configured with it."""
    monkeypatch.setattr(backends, "_BACKENDS", backends._BACKENDS.copy())
    calls = []
    simulate = get_backend("simulate")

    def linear_backward(*args):
        calls.append("linear")
        return simulate.linear_backward(*args)

    def conv2d_backward(*args):
        calls.append("conv2d")
        return simulate.conv2d_backward(*args)

    def check(config):
        return "needs 4-bit gradients" if config.grad.bits != 4 else None

    register_backend("counting", Backend(linear_backward, conv2d_backward, check))
    config = QuantConfig(grad=QuantSpec(4, "stochastic"), backend="counting")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    conv2d(x, torch.randn(4, 3, 3, 3), config=config).sum().backward()
    linear(torch.randn(5, 8, requires_grad=True), torch.randn(3, 8), config=config).sum().backward()
    assert calls == ["conv2d", "linear"]
    with pytest.raises(ValueError, match="needs 4-bit gradients"):
        QuantConfig(backend="counting")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("int8", get_backend("int8"))
