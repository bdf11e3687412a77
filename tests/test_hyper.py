"""Tests for the coordinate-wise hypernetworks (metagrad.meta.hyper)."""

from __future__ import annotations

import pytest
import torch

from metagrad.meta.hyper import (
    HYPERNET_FORMS,
    HYPERNET_KINDS,
    Hypernet,
    LSTMHypernet,
    MLPHypernet,
    apply_chunked,
    create_hypernet,
)


def _randomize(net: Hypernet, seed: int = 0, std: float = 0.5) -> Hypernet:
    """Give every parameter (the zero-initialised head included) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return net


def _grad_weight(shape: tuple[int, ...], seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen, dtype=dtype) * 1e-3
    weight = torch.randn(shape, generator=gen, dtype=dtype) * 0.1
    return grad, weight


@pytest.mark.parametrize("form", HYPERNET_FORMS)
@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_fresh_hypernet_is_exactly_the_identity(kind: str, form: str) -> None:
    torch.manual_seed(0)
    net = create_hypernet(kind, form=form)
    grad, weight = _grad_weight((8, 4, 3, 3))
    corrected, state = net(grad, weight)
    assert torch.equal(corrected, grad)
    assert corrected.shape == grad.shape
    assert len(state) == (2 if kind == "lstm" else 0)


@pytest.mark.parametrize("form", HYPERNET_FORMS)
@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_all_zero_gradient_stays_zero_and_finite(kind: str, form: str) -> None:
    net = _randomize(create_hypernet(kind, hidden=4, form=form))
    grad = torch.zeros(5, 7)
    weight = torch.zeros(5, 7)
    corrected, state = net(grad, weight)
    assert torch.equal(corrected, grad)
    assert all(torch.isfinite(s).all() for s in state)


@pytest.mark.parametrize("form", HYPERNET_FORMS)
@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_an_all_zero_layer_gives_the_hypernetwork_a_zero_not_nan_gradient(
    kind: str, form: str
) -> None:
    net = _randomize(create_hypernet(kind, hidden=4, form=form))
    grad, weight = _grad_weight((5, 7))
    target = torch.randn(5, 7)
    zero_layer, _ = net(torch.zeros(5, 7), weight)
    other_layer, _ = net(grad, weight)
    ((zero_layer + other_layer) * target).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("form", HYPERNET_FORMS)
@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_correction_scales_with_the_gradient(kind: str, form: str) -> None:
    """Inputs are normalised per layer, so H(c g, W) = c H(g, W) and H(g, c W) = H(g, W)."""
    net = _randomize(create_hypernet(kind, hidden=4, form=form)).double()
    grad, weight = _grad_weight((6, 10), dtype=torch.float64)
    corrected, _ = net(grad, weight)
    assert not torch.allclose(corrected, grad)
    scaled_g, _ = net(grad * 1e4, weight)
    scaled_w, _ = net(grad, weight * 1e-3)
    torch.testing.assert_close(scaled_g, corrected * 1e4)
    torch.testing.assert_close(scaled_w, corrected)


@pytest.mark.parametrize("form", HYPERNET_FORMS)
@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_chunked_equals_unchunked_values_and_gradients(kind: str, form: str) -> None:
    net = _randomize(create_hypernet(kind, hidden=6, form=form)).double()
    grad, weight = _grad_weight((9, 13), dtype=torch.float64)
    state = None
    if net.stateful:
        gen = torch.Generator().manual_seed(1)
        state = tuple(torch.randn(6, grad.numel(), generator=gen, dtype=torch.float64)
                      for _ in range(2))  # fmt: skip
    target = torch.randn(grad.shape, generator=torch.Generator().manual_seed(2), dtype=grad.dtype)
    results = []
    for chunk_size in (None, 10, 117):  # 117 elements: one chunk, 10 does not divide 117
        net.zero_grad()
        corrected, new_state = net(grad, weight, state, chunk_size=chunk_size)
        (corrected * target).sum().backward()
        results.append((corrected.detach(), new_state, [p.grad.clone() for p in net.parameters()]))
    ref_out, ref_state, ref_grads = results[0]
    for out, new_state, grads in results[1:]:
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-15)
        for a, b in zip(new_state, ref_state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert all(g.abs().sum() > 0 for g in ref_grads)


@pytest.mark.parametrize("kind", HYPERNET_KINDS)
def test_gain_form_is_odd_in_the_gradient_and_keeps_zeros(kind: str) -> None:
    net = _randomize(create_hypernet(kind, hidden=4, form="gain")).double()
    grad, weight = _grad_weight((6, 10), dtype=torch.float64)
    grad[grad.abs() < 5e-4] = 0  # about a third of the elements
    corrected, _ = net(grad, weight)
    flipped, _ = net(-grad, weight)
    torch.testing.assert_close(flipped, -corrected)
    assert torch.equal(corrected[grad == 0], grad[grad == 0])
    assert not torch.allclose(corrected, grad)
    residual, _ = _randomize(create_hypernet(kind, hidden=4)).double()(grad, weight)
    assert (residual[grad == 0] != 0).all()  # the residual form may move where g is zero


@pytest.mark.parametrize("kind", ["grad", "grad+weight"])
def test_signed_gain_sees_whether_the_gradient_points_along_the_weight(kind: str) -> None:
    net = _randomize(create_hypernet(kind, hidden=4, form="signed-gain")).double()
    grad, weight = _grad_weight((6, 10), dtype=torch.float64)
    grad[grad.abs() < 5e-4] = 0
    corrected, _ = net(grad, weight)
    assert torch.equal(corrected[grad == 0], grad[grad == 0])  # zeros stay zero
    # The same |g|, once along the weight's sign and once against it: different gains.
    along, against = grad.abs() * weight.sign(), -grad.abs() * weight.sign()
    gain_along = net(along, weight)[0] / along
    gain_against = net(against, weight)[0] / against
    nonzero = grad != 0
    assert not torch.allclose(gain_along[nonzero], gain_against[nonzero])
    unsigned = _randomize(create_hypernet(kind, hidden=4, form="gain")).double()
    torch.testing.assert_close(  # the gain form cannot tell them apart
        (unsigned(along, weight)[0] / along)[nonzero],
        (unsigned(against, weight)[0] / against)[nonzero],
    )


def _saved_numel(net: Hypernet, grad: torch.Tensor, weight: torch.Tensor, chunk_size) -> int:
    """Elements autograd keeps for the backward pass of one hypernetwork application."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        corrected, _ = net(grad, weight, chunk_size=chunk_size)
    corrected.sum().backward()
    return total


def test_chunking_bounds_the_memory_held_for_backward() -> None:
    hidden = 32
    net = _randomize(create_hypernet("grad+weight", hidden=hidden))
    grad, weight = _grad_weight((64, 64, 3, 3))
    n = grad.numel()
    whole = _saved_numel(net, grad, weight, chunk_size=None)
    chunked = _saved_numel(net, grad, weight, chunk_size=1024)
    assert whole >= n * hidden  # hidden activations of every element
    assert chunked <= 5 * n  # only per-element inputs, outputs and the norm-keeping rescale


def test_chunks_without_grad_match() -> None:
    net = _randomize(create_hypernet("lstm", hidden=3))
    grad, weight = _grad_weight((50,))
    with torch.no_grad():
        whole, state_whole = net(grad, weight)
        chunked, state_chunked = net(grad, weight, chunk_size=7)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(state_chunked, state_whole)


def test_apply_chunked_runs_small_inputs_in_one_piece() -> None:
    calls = []

    def fn(x: torch.Tensor) -> tuple[torch.Tensor]:
        calls.append(x.shape[0])
        return (x * 2,)

    (out,) = apply_chunked(fn, (torch.arange(10.0),), chunk_size=4)
    assert calls == [4, 4, 2]
    torch.testing.assert_close(out, torch.arange(10.0) * 2)
    calls.clear()
    apply_chunked(fn, (torch.arange(10.0),), chunk_size=10)
    assert calls == [10]


def test_lstm_state_is_carried_and_shaped_per_element() -> None:
    net = _randomize(LSTMHypernet(hidden=5))
    grad, weight = _grad_weight((4, 6))
    first, state = net(grad, weight)
    assert [tuple(s.shape) for s in state] == [(5, 24), (5, 24)]
    second, state2 = net(grad, weight, state)
    assert not torch.allclose(first, second)
    fresh, _ = net(grad, weight, None)
    torch.testing.assert_close(fresh, first)
    assert not torch.equal(state2[1], state[1])


def test_variants_see_the_right_inputs() -> None:
    grad, weight = _grad_weight((3, 8))
    grad_only = _randomize(MLPHypernet(use_weight=False, hidden=4))
    with_weight = _randomize(MLPHypernet(use_weight=True, hidden=4))
    assert grad_only.in_features == 1
    assert with_weight.in_features == 2
    a, _ = grad_only(grad, weight)
    b, _ = grad_only(grad, torch.randn_like(weight))
    torch.testing.assert_close(a, b)
    c, _ = with_weight(grad, weight)
    d, _ = with_weight(grad, torch.randn_like(weight))
    assert not torch.allclose(c, d)


def test_mlp_depth_and_width_are_settings() -> None:
    net = create_hypernet("grad", hidden=7, layers=3)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 7), (7, 7), (7, 7), (7, 1)]


def test_create_hypernet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown hypernetwork kind 'fc'"):
        create_hypernet("fc")
    with pytest.raises(ValueError, match="single cell"):
        create_hypernet("lstm", layers=2)
    with pytest.raises(ValueError, match="hidden"):
        create_hypernet("grad", hidden=0)
    with pytest.raises(ValueError, match="eps"):
        create_hypernet("grad", eps=0.0)
    with pytest.raises(
        ValueError,
        match="unknown hypernetwork form 'additive'; available: residual, gain, signed-gain",
    ):
        create_hypernet("grad", form="additive")
    with pytest.raises(ValueError, match="differ"):
        create_hypernet()(torch.zeros(3), torch.zeros(4))


def test_lstm_core_matches_torch_lstm_cell() -> None:
    net = _randomize(LSTMHypernet(hidden=5)).double()
    gen = torch.Generator().manual_seed(3)
    features, h, c = (torch.randn(k, 11, generator=gen, dtype=torch.float64) for k in (2, 5, 5))
    delta, h_new, c_new = net.core(features, h, c)
    h_ref, c_ref = net.cell(features.t(), (h.t(), c.t()))
    torch.testing.assert_close(h_new, h_ref.t())
    torch.testing.assert_close(c_new, c_ref.t())
    torch.testing.assert_close(delta, net.head(h_ref).squeeze(1))
