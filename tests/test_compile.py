"""``torch.compile`` of converted models: no graph break, training, numerics against eager.

Fast tests trace with dynamo (``explain``) or compile with the ``aot_eager`` backend (dynamo and
AOT autograd, which traces the backward pass, without code generation); the slow ones compile
with inductor, the default backend.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad import QuantConfig, QuantSpec, kernels
from metagrad.backward.int8.codes import quantize_operand
from metagrad.quant import list_presets, list_recipes, preset_config, recipe_config
from metagrad.quant.transforms import _sign_hadamard

CONFIGS = ["default", "int8", *list_presets(), *[f"recipe:{name}" for name in list_recipes()]]
"""The default config, the ``int8`` backend, every gradient preset and every paper's recipe."""


def config_for(name: str) -> QuantConfig:
    if name == "default":
        return QuantConfig()
    if name == "int8":
        return QuantConfig(grad=QuantSpec(8, "stochastic"), backend="int8")
    if name.startswith("recipe:"):
        return recipe_config(name.removeprefix("recipe:"))
    return preset_config(name)


def nearest(config: QuantConfig) -> QuantConfig:
    """``config`` with every backward spec rounded to nearest (no dither)."""
    changes = {
        name: dataclasses.replace(getattr(config, name), rounding="nearest")
        for name in (
            "grad",
            "grad_for_weight_grad",
            "weight_for_input_grad",
            "input_for_weight_grad",
        )
        if getattr(config, name) is not None
    }
    return dataclasses.replace(config, **changes)


class ConvNet(nn.Module):
    """A convolution and a linear layer: both kinds of converted layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def conv_net(config: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    return metagrad.quantize(ConvNet(), config)


def conv_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def gpt(config: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    model = metagrad.create_model("gpt_char", width=0.25, num_classes=64, in_channels=64)
    return metagrad.quantize(model, config)


def gpt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 2, 16), generator=gen)
    return x, y


def vit(config: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    return metagrad.quantize(metagrad.create_model("vit_tiny", width=0.25, num_classes=10), config)


def vit_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def graph_breaks(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()

    def step(x: torch.Tensor) -> torch.Tensor:
        return model(x).float().sum()

    return torch._dynamo.explain(step)(x).graph_break_count


def train(model: nn.Module, batch, steps: int, backend: str) -> list[float]:
    """Losses of ``steps`` SGD steps of ``torch.compile(model, fullgraph=True)`` on one batch."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def grads(model: nn.Module, batch, forward=None) -> dict[str, torch.Tensor]:
    x, y = batch
    model.zero_grad(set_to_none=True)
    loss_of((model if forward is None else forward)(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_trains(losses: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------ graph breaks


@pytest.mark.parametrize("name", CONFIGS)
def test_no_graph_break_in_a_converted_conv_and_linear(name):
    model = conv_net(config_for(name))
    assert graph_breaks(model, conv_batch()[0]) == 0


@pytest.mark.parametrize("name", ["default"])
def test_no_graph_break_in_gpt_char(name):
    assert graph_breaks(gpt(config_for(name)), gpt_batch()[0]) == 0


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("model", ["gpt_char", "vit_tiny"])
def test_no_graph_break_in_the_transformers(name, model):
    build, batch = (gpt, gpt_batch) if model == "gpt_char" else (vit, vit_batch)
    assert graph_breaks(build(config_for(name)), batch()[0]) == 0


def test_no_graph_break_with_compiled_kernels_on():
    """A ``@kernel`` called inside a compiled region is traced inline, not compiled again."""
    if not kernels.available("cpu")[0]:
        pytest.skip(f"torch.compile does not work here: {kernels.available('cpu')[1]}")
    with kernels.compiled():
        assert graph_breaks(conv_net(config_for("rht-nvfp4")), conv_batch()[0]) == 0
        assert_trains(train(conv_net(config_for("default")), conv_batch(), 4, "aot_eager"))


def test_hadamard_matrix_built_in_the_graph_is_the_cached_one():
    @torch.compile(backend="eager", fullgraph=True, dynamic=False)
    def traced(n: int) -> torch.Tensor:
        return _sign_hadamard(n, torch.float32, None)

    for n in (1, 2, 8, 32, 128):
        assert torch.equal(traced(n), _sign_hadamard(n, torch.float32, None))


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", CONFIGS)
def test_fullgraph_training_with_the_backward_traced(name):
    """dynamo and AOT autograd trace forward and backward in one graph each (no codegen)."""
    assert_trains(train(conv_net(config_for(name)), conv_batch(), 5, "aot_eager"))


FAST_SYMBOLIC = {(None, "int8"), (True, "default"), (True, "luq"), (True, "rht-nvfp4")}
SYMBOLIC = [
    pytest.param(
        dynamic,
        name,
        id=f"{'dynamic' if dynamic else 'automatic'}-{name}",
        marks=() if (dynamic, name) in FAST_SYMBOLIC else pytest.mark.exhaustive,
    )
    for dynamic in (None, True)
    for name in CONFIGS
]


@pytest.mark.parametrize(("dynamic", "name"), SYMBOLIC)
def test_batch_size_changes_trace_with_symbolic_sizes(dynamic, name):
    """A new batch size recompiles with symbolic sizes (``dynamic=None``: after the first
    compilation; ``True``: from the start): the dither, the transforms and the formats trace."""
    model = conv_net(config_for(name))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x, y = conv_batch()
    for n in (8, 5, 3):
        model.zero_grad(set_to_none=True)
        loss_of(compiled(x[:n]), y[:n]).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["default", "rht-nvfp4"])
def test_fullgraph_training_compiled_by_inductor(name):
    assert_trains(train(conv_net(config_for(name)), conv_batch(), 4, "inductor"))


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", CONFIGS)
def test_fullgraph_training_compiled_by_inductor_every_config(name):
    assert_trains(train(conv_net(config_for(name)), conv_batch(), 4, "inductor"))


@pytest.mark.exhaustive
@pytest.mark.parametrize(
    ("model", "name"),
    [
        *[("gpt_char", name) for name in ("default", "int8", "bhq", "rht-nvfp4")],
        *[("vit_tiny", name) for name in ("default", "rht-nvfp4")],
    ],
)
def test_fullgraph_training_of_the_transformers_under_bf16(model, name):
    build, batch = (gpt, gpt_batch) if model == "gpt_char" else (vit, vit_batch)
    net = build(config_for(name))
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = batch()
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        loss = loss_of(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert_trains(losses)


# ------------------------------------------------------------------------------ numerics


def _assert_close(got: dict, want: dict) -> None:
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def _assert_eager_gradients_under_aot_eager(model: nn.Module, batch) -> None:
    """``model``'s gradients on ``batch()`` traced by ``aot_eager`` equal eager's, both drawing
    from PyTorch's generator after the same seed."""
    torch.manual_seed(5)
    want = grads(model, batch())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    _assert_close(grads(model, batch(), compiled), want)


@pytest.mark.parametrize("name", CONFIGS)
def test_nearest_rounding_gives_eager_gradients_under_aot_eager(name):
    """Without dither (and with eager's RNG for ``rht`` signs) the traced backward computes the
    eager gradients."""
    _assert_eager_gradients_under_aot_eager(conv_net(nearest(config_for(name))), conv_batch)


def mlp_net(config: QuantConfig) -> nn.Module:
    """Three linear layers: each saved activation is quantized for the weight gradient, where the
    partitioner may move that work into the forward graph."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)]
    return metagrad.quantize(nn.Sequential(*layers), config)


def mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=gen), torch.randint(0, 5, (64,), generator=gen)


@pytest.mark.parametrize("name", [f"recipe:{name}" for name in ("rht-mxfp4", "rht-nvfp4")])
def test_a_transform_draw_shared_with_a_saved_activation_stays_one_draw_when_traced(name):
    """The recipes share one ``rht`` draw between the error and the saved activation of a
    weight-gradient product. AOT autograd's partitioner (``aot_eager``, as inductor's) may
    quantize the activation in the forward graph; the draw must still be one draw, made where
    eager makes it (``metagrad.quant.draws``), or the gradients differ from eager's."""
    _assert_eager_gradients_under_aot_eager(mlp_net(nearest(config_for(name))), mlp_batch)


INDUCTOR_NEAREST = ("default", "int8", "bhq", "fp8-e5m2")


@pytest.mark.parametrize("name", INDUCTOR_NEAREST)
def test_nearest_rounding_gives_eager_gradients_under_inductor(name):
    model = conv_net(nearest(config_for(name)))
    want = grads(model, conv_batch())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _assert_close(grads(model, conv_batch(), compiled), want)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in INDUCTOR_NEAREST])
def test_nearest_rounding_gives_eager_gradients_under_inductor_every_config(name):
    """``rht``'s random signs come from eager's generator here (``fallback_random``)."""
    model = conv_net(nearest(config_for(name)))
    torch.manual_seed(5)
    want = grads(model, conv_batch())
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        torch.manual_seed(5)
        _assert_close(grads(model, conv_batch(), compiled), want)


def _mean_weight_grad(name: str, draws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One quantized linear layer's ``dL/dW``, compiled: one draw, the mean of ``draws``, and
    the full-precision gradient."""
    torch.manual_seed(0)
    net = metagrad.quantize(nn.Sequential(nn.Linear(32, 16)), config_for(name))
    layer = net[0]
    x = torch.randn(64, 32)
    g = torch.randn(64, 16) * torch.rand(64, 1)  # dL/dy, rows of different scales
    if name == "int8":  # the layer input is an 8-bit operand too (nearest, per feature)
        codes, scale = quantize_operand(x, -1)
        exact = g.t() @ (codes.float() * scale)
    else:
        exact = g.t() @ x
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    total = torch.zeros_like(exact)
    first = None
    for _ in range(draws):
        layer.zero_grad(set_to_none=True)
        (compiled(x) * g).sum().backward()
        first = layer.weight.grad.clone() if first is None else first
        total += layer.weight.grad
    return first, total / draws, exact


def _assert_unbiased(name: str, draws: int) -> None:
    first, mean, exact = _mean_weight_grad(name, draws)
    single = (first - exact).norm() / exact.norm()
    averaged = (mean - exact).norm() / exact.norm()
    assert single > 0, "the compiled layer did not quantize"
    # independent draws: the error of the mean falls as 1/sqrt(draws) (here 1/16), a bias not
    assert averaged < 3 * single / draws**0.5, (single.item(), averaged.item())


@pytest.mark.parametrize("name", ["plain", "rht-nvfp4"])
def test_stochastic_rounding_compiled_is_unbiased(name):
    """Inductor draws its own random numbers (not eager's): the same distribution, unbiased."""
    _assert_unbiased(name, 256)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", ["default", "int8", "psq", "bhq", "luq", "rht-mxfp4"])
def test_stochastic_rounding_compiled_is_unbiased_every_config(name):
    _assert_unbiased(name, 256)
