"""Tests for the MetaGrad optimizer (metagrad.meta.optim)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import QuantConfig, QuantSpec, quantize
from metagrad.meta.hyper import create_hypernet
from metagrad.meta.optim import MetaGrad, meta_parameters
from metagrad.models import create_model

FP32_GRADS = QuantConfig(grad=QuantSpec(bits=32))
INT4_GRADS = QuantConfig(grad=QuantSpec(bits=4, rounding="stochastic"))


def _small_cnn(config: QuantConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return quantize(create_model("small_cnn", width=0.5), config)


def _mlp(config: QuantConfig, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return quantize(model, config).to(dtype)


def _batch(step: int, image: bool = True, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    shape = (16, 3, 8, 8) if image else (8, 4)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    return x, y


def _closure(model: nn.Module, opt: torch.optim.Optimizer, batch) -> Callable[[], torch.Tensor]:
    x, y = batch

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _split(model: nn.Module) -> tuple[dict, dict]:
    """Meta weights and everything else (other parameters and buffers), by name."""
    meta = {id(p) for p in meta_parameters(model)}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in meta}
    rest = {n: t.detach().clone() for n, t in model.state_dict().items() if n not in weights}
    return weights, rest


BASE_CASES = {
    "sgd": ("sgd", dict(lr=0.1), torch.optim.SGD),
    "sgd-momentum": ("sgd", dict(lr=0.1, momentum=0.9), torch.optim.SGD),
    "sgd-nesterov-wd": (
        "sgd",
        dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-2),
        torch.optim.SGD,
    ),
    "adam": ("adam", dict(lr=1e-2, betas=(0.8, 0.99)), torch.optim.Adam),
    "adam-wd": ("adam", dict(lr=1e-2, weight_decay=1e-2, eps=1e-6), torch.optim.Adam),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_identity_hypernet_follows_torch_trajectory_with_one_step_lag(case: str) -> None:
    base, kwargs, torch_cls = BASE_CASES[case]
    steps = 5
    model = _small_cnn(FP32_GRADS)
    reference = copy.deepcopy(model)
    opt = MetaGrad(model, base=base, hyper_lr=0.0, **kwargs)
    ref_opt = torch_cls(reference.parameters(), **kwargs)
    snapshots = [_split(reference)]
    for step in range(steps):
        batch = _batch(step)
        loss = opt.step(_closure(model, opt, batch))
        ref_loss = ref_opt.step(_closure(reference, ref_opt, batch))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        snapshots.append(_split(reference))
        weights, rest = _split(model)
        # meta weights lag one update; everything else (biases, BN, stats) is in step
        torch.testing.assert_close(weights, snapshots[step][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rest, snapshots[step + 1][1], rtol=1e-6, atol=1e-6)


def test_a_model_without_quantized_layers_is_refused() -> None:
    model = create_model("small_cnn", width=0.5)
    with pytest.raises(ValueError, match=r"call metagrad\.quantize_\(model, config\) first"):
        MetaGrad(model, 0.1, momentum=0.9)
    frozen = _small_cnn(INT4_GRADS)
    for p in meta_parameters(frozen):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        MetaGrad(frozen, 0.1)


@pytest.mark.parametrize(
    ("base", "kwargs", "ignored"),
    [
        ("adam", dict(momentum=0.9), "momentum=0.9"),
        ("adam", dict(momentum=0.9, nesterov=True), "momentum=0.9, nesterov=True"),
        ("sgd", dict(betas=(0.8, 0.9)), r"betas=\(0\.8, 0\.9\)"),
        ("sgd", dict(eps=1e-6, momentum=0.9), "eps=1e-06"),
    ],
)
def test_settings_the_base_rule_ignores_are_refused(base, kwargs, ignored) -> None:
    other = "sgd" if base == "adam" else "adam"
    with pytest.raises(ValueError, match=f"{ignored} would be ignored: .*base={other!r}") as info:
        MetaGrad(_small_cnn(INT4_GRADS), 0.1, base=base, **kwargs)
    takes = "weight_decay, betas, eps" if base == "adam" else "momentum, nesterov, weight_decay"
    assert str(info.value).startswith(f"MetaGrad(base={base!r}) takes {takes}; ")


def test_settings_not_given_take_torch_defaults_in_every_group() -> None:
    opt = MetaGrad(_small_cnn(INT4_GRADS), 0.1, base="adam", weight_decay=1e-2)
    for group in opt.param_groups:
        assert group["momentum"] == 0.0 and group["nesterov"] is False
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        assert group["weight_decay"] == 1e-2


def test_first_step_only_records_the_gradient() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1)
    before, _ = _split(model)
    opt.step(_closure(model, opt, _batch(0)))
    after, _ = _split(model)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    pending = opt.pending_gradients()
    assert len(pending) == len(opt.meta_params) == 4
    for p in opt.meta_params:
        assert torch.equal(pending[p], p.grad)
    opt.step(_closure(model, opt, _batch(1)))
    moved, _ = _split(model)
    assert all(not torch.equal(moved[n], before[n]) for n in before)


def test_param_groups_split_meta_weights_from_the_rest() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1)
    meta, rest = opt.param_groups
    assert meta["meta"] and not rest["meta"]
    assert {id(p) for p in meta["params"]} == {id(p) for p in meta_parameters(model)}
    assert len(meta["params"]) + len(rest["params"]) == len(list(model.parameters()))


def _hypernet_grads_by_finite_differences(
    base: str, kind: str, kwargs: dict, n_checks: int = 3
) -> None:
    model = _mlp(FP32_GRADS)
    torch.manual_seed(1)
    hypernet = create_hypernet(kind, hidden=3).double()
    with torch.no_grad():
        for p in hypernet.parameters():
            p.normal_(0.0, 0.5)  # leave the identity so every parameter matters
    opt = MetaGrad(model, base=base, hypernet=hypernet, hyper_lr=0.0, **kwargs)
    for step in range(2):  # non-trivial base state (momentum, moments, LSTM state)
        opt.step(_closure(model, opt, _batch(step, image=False, dtype=torch.float64)))
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))
    batch = _batch(2, image=False, dtype=torch.float64)

    def loss_at(param_index: int | None = None, element: int = 0, delta: float = 0.0) -> float:
        model_state, opt_state = copy.deepcopy(snapshot)
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        if param_index is not None:
            with torch.no_grad():
                list(hypernet.parameters())[param_index].view(-1)[element] += delta
        return opt.step(_closure(model, opt, batch)).item()

    loss_at()
    analytic = [p.grad.clone() for p in hypernet.parameters()]
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for i, grad in enumerate(analytic):
        assert grad.abs().sum() > 0
        for element in torch.randint(0, grad.numel(), (n_checks,), generator=gen).tolist():
            numeric = (loss_at(i, element, eps) - loss_at(i, element, -eps)) / (2 * eps)
            assert grad.view(-1)[element].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    ("base", "kind", "kwargs"),
    [
        ("sgd", "grad+weight", dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        ("adam", "grad+weight", dict(lr=0.05, weight_decay=1e-2)),
        ("sgd", "lstm", dict(lr=0.5, momentum=0.5)),
        ("adam", "grad", dict(lr=0.05)),
    ],
)
def test_hypernet_gradient_matches_finite_differences(base: str, kind: str, kwargs) -> None:
    _hypernet_grads_by_finite_differences(base, kind, kwargs)


def test_chunked_and_unchunked_steps_agree() -> None:
    results = []
    for chunk_size in (None, 100):
        model = _small_cnn(INT4_GRADS)
        torch.manual_seed(1)
        opt = MetaGrad(model, 0.1, momentum=0.9, hyper_lr=1e-2, chunk_size=chunk_size)
        for step in range(4):
            opt.step(_closure(model, opt, _batch(step)))
        results.append((model.state_dict(), opt.hypernet.state_dict()))
    (model_a, hyper_a), (model_b, hyper_b) = results
    torch.testing.assert_close(model_a, model_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hyper_a, hyper_b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, hyper_a[k]) for k, v in create_hypernet().state_dict().items())


@pytest.mark.parametrize(
    ("base", "kind", "kwargs"),
    [
        ("sgd", "grad+weight", dict(lr=0.1, momentum=0.9)),
        ("adam", "lstm", dict(lr=1e-2)),
    ],
)
def test_resuming_from_state_dict_continues_exactly(base: str, kind: str, kwargs) -> None:
    def make() -> tuple[nn.Module, MetaGrad]:
        model = _small_cnn(INT4_GRADS)
        hypernet = create_hypernet(kind, hidden=4)
        return model, MetaGrad(model, base=base, hypernet=hypernet, hyper_lr=1e-2, **kwargs)

    steps, stop = 6, 3
    model, opt = make()
    for step in range(steps):
        if step == stop:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), torch.get_rng_state()))
        opt.step(_closure(model, opt, _batch(step)))
    model2, opt2 = make()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for step in range(stop, steps):
        opt2.step(_closure(model2, opt2, _batch(step)))
    torch.testing.assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(opt2.hypernet.state_dict(), opt.hypernet.state_dict())
    if kind == "lstm":
        assert all(len(opt.state[p]["hyper_state"]) == 2 for p in opt.meta_params)


def test_hypernet_learns_with_int4_gradients() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, momentum=0.9, hyper_lr=1e-2)
    initial = copy.deepcopy(opt.hypernet.state_dict())
    losses = [opt.step(_closure(model, opt, _batch(step))).item() for step in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in opt.hypernet.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed
    pending = opt.pending_gradients()
    corrected = opt.corrected_gradients()
    assert corrected.keys() == pending.keys()
    for p, g in pending.items():
        assert not torch.equal(corrected[p], g)
        assert torch.isfinite(corrected[p]).all()
    assert opt.hyper_time > 0


def test_corrected_gradients_changes_no_state_and_passes_other_params_through() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, hypernet=create_hypernet("lstm", hidden=4))
    for step in range(2):
        opt.step(_closure(model, opt, _batch(step)))
    before = copy.deepcopy(opt.state_dict())
    bias = model.classifier.bias
    out = opt.corrected_gradients({bias: torch.ones_like(bias), **opt.pending_gradients()})
    assert torch.equal(out[bias], torch.ones_like(bias))
    torch.testing.assert_close(opt.state_dict()["state"], before["state"], rtol=0, atol=0)


def test_scheduled_learning_rate_is_used() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, hyper_lr=0.0)  # identity hypernet: update = -lr * g_{t-1}
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for step in range(5):
        pending = {p: g.clone() for p, g in opt.pending_gradients().items()}
        before = [p.detach().clone() for p in opt.meta_params]
        lr = opt.param_groups[0]["lr"]
        opt.step(_closure(model, opt, _batch(step)))
        scheduler.step()
        for p, old in zip(opt.meta_params, before, strict=True):
            expected = old - lr * pending[p] if pending else old
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_zero_gradient_elements_give_finite_hypernet_gradients_with_adam() -> None:
    model = _small_cnn(FP32_GRADS)
    opt = MetaGrad(model, 1e-2, base="adam", hyper_lr=1e-2)
    x, y = _batch(0)
    x[:, 0] = 0.0  # the first conv's weights on channel 0 get exactly zero gradient
    opt.step(_closure(model, opt, (x, y)))
    assert (opt.pending_gradients()[model.stem[0].weight][:, 0] == 0).all()
    for _ in range(3):
        opt.step(_closure(model, opt, (x, y)))
        assert all(torch.isfinite(p.grad).all() for p in opt.hypernet.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_grad_clears_model_and_hypernet_grads() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1)
    for step in range(2):
        opt.step(_closure(model, opt, _batch(step)))
    assert all(p.grad is not None for p in opt.hypernet.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in opt.hypernet.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_raise_clear_errors() -> None:
    model = _small_cnn(INT4_GRADS)
    with pytest.raises(ValueError, match="unknown base rule 'rmsprop'"):
        MetaGrad(model, 0.1, base="rmsprop")
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        MetaGrad(model, -0.1)
    with pytest.raises(ValueError, match="nesterov"):
        MetaGrad(model, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        MetaGrad(model, 0.1, base="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        MetaGrad(model, 0.1, chunk_size=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MetaGrad(list(model.parameters()), 0.1)
    opt = MetaGrad(model, 0.1)
    with pytest.raises(TypeError, match="requires a closure"):
        opt.step()
    adam = MetaGrad(model, 0.1, base="adam")
    with pytest.raises(ValueError, match="'sgd' MetaGrad"):
        adam.load_state_dict(opt.state_dict())


def test_auto_chunk_size_follows_the_free_memory(monkeypatch) -> None:
    from metagrad.meta import chunking

    model = _small_cnn(INT4_GRADS)
    assert MetaGrad(model, lr=0.1).chunk_size == chunking.CPU_CHUNK_SIZE  # CPU: cache-sized chunks

    class OnCuda:  # stands in for a CUDA meta weight: the rule needs only device and size
        device = torch.device("cuda", 0)

        def __init__(self, numel: int) -> None:
            self.size = numel

        def numel(self) -> int:
            return self.size

    net = create_hypernet(hidden=8)  # 8 hidden units: 4 * 4 * 8 = 128 bytes per element
    free = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2 * free))
    budget = free * chunking.ACTIVATION_MEMORY_SHARE
    fits = int(budget // 128)
    assert chunking.auto_chunk_size([OnCuda(fits)], net) is None  # unchunked when it fits
    assert chunking.auto_chunk_size([OnCuda(fits + 1), OnCuda(10)], net) == fits


# -- torch.optim behaviours ---------------------------------------------------------------------


def _params_snapshot(opt: MetaGrad) -> list[torch.Tensor]:
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def test_a_weight_frozen_after_construction_is_left_alone() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, momentum=0.9, hyper_lr=1e-2)
    frozen = model.features[0][0].weight
    for step in range(2):
        opt.step(_closure(model, opt, _batch(step)))
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    for step in range(2, 5):
        opt.step(_closure(model, opt, _batch(step)))
    assert torch.equal(frozen, before)
    assert frozen not in opt.pending_gradients()
    frozen.requires_grad_(True)  # unfrozen: it records a gradient, then moves again
    for step in range(5, 7):
        opt.step(_closure(model, opt, _batch(step)))
    assert not torch.equal(frozen, before)


def test_add_param_group_sorts_meta_weights_and_honours_group_settings() -> None:
    model = _small_cnn(INT4_GRADS)
    late = model.classifier.weight
    late.requires_grad_(False)  # not trained when the optimizer is built
    opt = MetaGrad(model, 0.1, hyper_lr=1e-2)
    assert all(p is not late for p in opt.meta_params)
    late.requires_grad_(True)
    opt.add_param_group({"params": [late], "lr": 0.5})
    assert opt.param_groups[-1]["meta"] is True and opt.param_groups[-1]["lr"] == 0.5
    assert any(p is late for p in opt.meta_params)
    before = late.detach().clone()
    for step in range(3):
        opt.step(_closure(model, opt, _batch(step)))
    assert not torch.equal(late, before)
    state = opt.state_dict()  # a group added later round-trips too
    late.requires_grad_(False)
    clone = MetaGrad(model, 0.1, hyper_lr=1e-2)
    late.requires_grad_(True)
    clone.add_param_group({"params": [late], "lr": 0.5})
    clone.load_state_dict(state)
    with pytest.raises(ValueError, match="parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "meta": True})


def test_clip_grad_norm_inside_the_closure_reaches_the_quantized_weights() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, hyper_lr=1e-2)
    max_norm = 1e-3
    x, y = _batch(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert norm > 10 * max_norm  # there was something to clip
        return loss

    for _ in range(3):
        opt.step(closure)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(list(model.parameters()))  # meta weights included
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert total <= max_norm * (1 + 1e-5)
        pending = opt.pending_gradients()
        assert all(pending[p] is p.grad for p in opt.meta_params)


def test_a_step_with_non_finite_gradients_is_skipped_and_reported() -> None:
    model = _small_cnn(INT4_GRADS)
    opt = MetaGrad(model, 0.1, momentum=0.9, hyper_lr=1e-2)
    for step in range(3):
        opt.step(_closure(model, opt, _batch(step)))
    params, state = _params_snapshot(opt), copy.deepcopy(opt.state_dict())
    pending = {p: g.clone() for p, g in opt.pending_gradients().items()}
    x, y = _batch(3)
    x[0, 0, 0, 0] = float("inf")
    opt.step(_closure(model, opt, (x, y)))
    assert opt.last_step_skipped and opt.skipped_steps == 1
    for a, b in zip(params, _params_snapshot(opt), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(opt.state_dict()["hypernet"], state["hypernet"], rtol=0, atol=0)
    for p, g in pending.items():
        assert torch.equal(opt.pending_gradients()[p], g) and p.grad is opt.pending_gradients()[p]
    opt.step(_closure(model, opt, _batch(4)))  # training goes on
    assert not opt.last_step_skipped
    assert all(torch.isfinite(q).all() for q in opt.hypernet.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    strict = MetaGrad(_small_cnn(INT4_GRADS), 0.1, skip_nonfinite=False)
    assert strict.skip_nonfinite is False


# -- the longer horizon -------------------------------------------------------------------------


def _random_hypernet(seed: int = 0, dtype=torch.float64) -> nn.Module:
    net = create_hypernet("grad+weight", hidden=4).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return net


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_a_frozen_hypernet_gives_the_same_trajectory_for_every_horizon(base: str) -> None:
    """Recomputing W_t from the anchor with an unchanged hypernetwork is exact (bitwise)."""
    kwargs = {"momentum": 0.9, "weight_decay": 1e-2} if base == "sgd" else {"weight_decay": 1e-2}
    finals = []
    for horizon in (1, 2, 4):
        model = _mlp(INT4_GRADS)
        opt = MetaGrad(
            model,
            0.05,
            base=base,
            hypernet=_random_hypernet(),
            hyper_lr=0.0,
            horizon=horizon,
            **kwargs,
        )
        for step in range(7):
            opt.step(_closure(model, opt, _batch(step, image=False, dtype=torch.float64)))
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        for a, b in zip(finals[0], other, strict=True):
            assert torch.equal(a, b)


def test_horizon_meta_gradient_equals_finite_differences_in_float64() -> None:
    """dL_t/dphi through K = 3 updates, against central differences of the same objective.

    The objective: L_t at W_t = U(U(U(anchor; g_1); g_2); g_3), each U a base-rule step on the
    hypernetwork's output, the gradients g_i and the weights the hypernetwork reads held fixed.
    """
    from torch.func import functional_call

    from metagrad.meta.updates import sgd_update

    torch.manual_seed(0)
    model = _mlp(FP32_GRADS)  # deterministic gradients: finite differences need them
    hypernet = _random_hypernet()
    opt = MetaGrad(
        model, 0.1, momentum=0.9, weight_decay=1e-2, hypernet=hypernet, hyper_lr=0.0, horizon=3
    )
    for step in range(5):
        opt.step(_closure(model, opt, _batch(step, image=False, dtype=torch.float64)))
    x, y = _batch(5, image=False, dtype=torch.float64)
    group = opt.param_groups[0]
    states = {  # before the step, which slides the windows
        p: {k: copy.copy(opt.state[p][k]) for k in ("anchor", "anchor_base", "window")}
        for p in opt.meta_params
    }
    assert all(len(s["window"]) == 3 for s in states.values())
    # The weights the hypernetwork reads at each update, from the unperturbed chain.
    read = {}
    for p, s in states.items():
        w, base, read[p] = s["anchor"], s["anchor_base"], []
        for g in s["window"]:
            read[p].append(w)
            w, base = sgd_update(w, hypernet(g, w)[0], base, group)
    names = {p: n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # biases, pre-step

    def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = dict(before)
        for p, s in states.items():
            w, base = s["anchor"], s["anchor_base"]
            for g, w_read in zip(s["window"], read[p], strict=True):
                corrected = functional_call(hypernet, params, (g, w_read))[0]
                w, base = sgd_update(w, corrected, base, group)
            weights[names[p]] = w
        return F.cross_entropy(functional_call(model, weights, (x,)), y)

    phi = {n: p.detach().clone() for n, p in hypernet.named_parameters()}
    loss = opt.step(_closure(model, opt, (x, y)))  # hyper lr 0: phi unchanged, its grad kept
    torch.testing.assert_close(objective(phi), loss, rtol=1e-12, atol=0)
    analytic = {n: p.grad.clone() for n, p in hypernet.named_parameters()}
    eps = 1e-6
    for name, value in phi.items():
        for i in range(value.numel()):
            plus, minus = dict(phi), dict(phi)
            step = torch.zeros(value.numel(), dtype=value.dtype)
            step[i] = eps
            plus[name], minus[name] = value + step.view_as(value), value - step.view_as(value)
            numeric = (objective(plus) - objective(minus)) / (2 * eps)
            torch.testing.assert_close(analytic[name].flatten()[i], numeric, rtol=1e-6, atol=1e-9)
    assert all(g.abs().sum() > 0 for g in analytic.values())


def test_horizon_state_round_trips_and_resumes_exactly() -> None:
    def make():
        model = _mlp(INT4_GRADS)
        opt = MetaGrad(
            model, 0.05, momentum=0.9, hypernet=_random_hypernet(), hyper_lr=1e-2, horizon=3
        )
        return model, opt

    model, opt = make()
    for step in range(8):
        opt.step(_closure(model, opt, _batch(step, image=False, dtype=torch.float64)))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for step in range(8, 12):
        torch.manual_seed(step)
        opt.step(_closure(model, opt, _batch(step, image=False, dtype=torch.float64)))
    other_model, other_opt = make()
    other_model.load_state_dict(saved_model)
    other_opt.load_state_dict(saved_opt)
    for step in range(8, 12):
        torch.manual_seed(step)
        other_opt.step(
            _closure(other_model, other_opt, _batch(step, image=False, dtype=torch.float64))
        )
    for a, b in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="horizon"):
        MetaGrad(model, 0.1, horizon=0)


class _AttentionClassifier(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 3)
        self.kdim = kdim or 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = x if self.kdim == 8 else x.repeat(1, 1, 2)[..., : self.kdim]
        return self.head(self.attn(x, memory, memory, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_input_projections_are_meta_weights(kdim) -> None:
    """The q/k/v weights of a converted nn.MultiheadAttention are updated by the hypernetwork,
    packed (in_proj_weight) or not (q/k/v_proj_weight)."""
    torch.manual_seed(0)
    model = quantize(_AttentionClassifier(kdim), INT4_GRADS)
    names = {n for n, p in model.named_parameters() if id(p) in map(id, meta_parameters(model))}
    projections = (
        {"attn.in_proj_weight"} if kdim is None else {f"attn.{k}_proj_weight" for k in "qkv"}
    )
    assert names == projections | {"attn.out_proj.weight", "head.weight"}
    opt = MetaGrad(model, 0.1, hyper_lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 5, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    initial = copy.deepcopy(opt.hypernet.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        opt.step(closure)
    pending = {id(p) for p in opt.pending_gradients()}
    assert all(id(dict(model.named_parameters())[n]) in pending for n in projections)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(v, initial[k]) for k, v in opt.hypernet.state_dict().items())
