"""The ``int8`` backend's routes: fixed or measured, the route cache, and what a run records.

No test depends on a timing: a fake timer decides which plan is fastest.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from metagrad.backward import int8
from metagrad.backward.int8 import routes
from metagrad.backward.int8.backend import conv2d_backward_for, linear_backward_for
from metagrad.backward.int8.routes import (
    ROUTES,
    ProductKey,
    RouteCache,
    plans,
    route_record,
    set_routes,
)
from metagrad.nn.functional import conv2d, linear
from metagrad.quant.spec import QuantConfig, QuantSpec
from metagrad.training.config import ConfigError, build_config
from metagrad.training.setup import resolve_routes
from metagrad.training.trainer import train

CONV = ((1, 1), (1, 1), (1, 1))


def fake_timer(winner: str, calls: list[str] | None = None):
    """A timer under which plan ``winner`` is the fastest; it runs each plan once."""

    def timer(candidates, device):
        for name, fn in candidates.items():
            fn()
            if calls is not None:
                calls.append(name)
        return {name: 0.5 if name == winner else 1.0 for name in candidates}

    return timer


@pytest.fixture
def measured(monkeypatch, tmp_path) -> Iterator[Path]:
    """The measured mode with an empty route cache in ``tmp_path``; the fixed mode afterwards."""
    monkeypatch.setenv(routes.CACHE_DIR_ENV, str(tmp_path))
    ROUTES.clear()
    set_routes("measured")
    yield tmp_path / routes.CACHE_FILE
    set_routes(None)
    ROUTES.clear()


def _case(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.1
    lw = torch.randn(10, 16 * 36, generator=g) * 0.05
    return x.to(dtype), w.to(dtype), lw.to(dtype)


def _grads(x, w, lw, config, amp: bool = False):
    """Gradients of a conv and a linear layer, and a draw after them (the generator's state)."""
    torch.manual_seed(5)
    xs, ws, lws = (t.clone().requires_grad_() for t in (x, w, lw))
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        h = conv2d(xs, ws, None, 1, 1, 1, 1, config=config)
        y = linear(h.flatten(1), lws, None, config=config)
    y.float().square().sum().backward()
    return xs.grad, ws.grad, lws.grad, torch.rand(3)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("winner", list(plans(("dx", "dw"))))
def test_every_plan_gives_the_fixed_numbers_in_float32(measured, monkeypatch, winner, rounding):
    """Integer sums below 2**24 are exact in float32: every plan is bit-identical to the fixed
    routes, stochastic rounding draws the same noise, and the measurement draws nothing."""
    config = QuantConfig(grad=QuantSpec(8, rounding), backend="int8")
    x, w, lw = _case()
    set_routes("fixed")
    expected = _grads(x, w, lw, config)
    set_routes("measured")
    monkeypatch.setattr(routes, "time_routes", fake_timer(winner))
    got = _grads(x, w, lw, config)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    chosen = [c.routes for c in ROUTES.used.values()]
    assert plans(("dx", "dw"))[winner] in chosen


@pytest.mark.parametrize("winner", ["float", "dx float + dw integer", "dx integer + dw float"])
def test_bf16_routes_agree_to_bf16_rounding(measured, monkeypatch, winner):
    """The float route rounds its bf16 product before the scale, the integer route once after:
    the same codes, results within bf16 rounding, and the same random draws."""
    config = QuantConfig(grad=QuantSpec(8, "stochastic"), backend="int8")
    x, w, lw = _case(1, torch.bfloat16)
    e = torch.randn(4, 16, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    xl, el = torch.randn(4, 16 * 36).bfloat16(), torch.randn(4, 10).bfloat16()
    mask = (True, True, True)

    def both():
        torch.manual_seed(3)
        conv = conv2d_backward_for(e, x, w, *CONV, 1, config, mask)
        lin = linear_backward_for(el, xl, lw, config, mask)
        return (*conv, *lin, torch.rand(3))

    set_routes("fixed")
    expected = both()
    set_routes("measured")
    monkeypatch.setattr(routes, "time_routes", fake_timer(winner))
    got = both()
    for a, b in zip(expected[:-1], got[:-1], strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-6, atol=2**-6 * a.abs().max())
    assert torch.equal(expected[-1], got[-1])
    assert all(c.routes == plans(("dx", "dw"))[winner] for c in ROUTES.used.values())


@pytest.mark.parametrize("winner", ["float", "dx float + dw integer", "dx integer + dw float"])
def test_bf16_routes_are_bit_identical_where_the_sums_are_exact(measured, monkeypatch, winner):
    """2-bit error codes (-1, 0, 1) over a contraction of 2: every sum is an integer of at most
    254, exact in bf16, so the float route's bf16 products equal the integer ones bit for bit."""
    config = QuantConfig(grad=QuantSpec(2, "nearest"), backend="int8")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, generator=g).bfloat16()
    w = torch.randn(2, 16, generator=g).bfloat16()
    e = torch.randn(2, 2, generator=g).bfloat16()
    xc = torch.randn(1, 16, 1, 2, generator=g).bfloat16()
    wc = torch.randn(2, 16, 1, 1, generator=g).bfloat16()
    ec = torch.randn(1, 2, 1, 2, generator=g).bfloat16()
    mask = (True, True, True)
    one = ((1, 1), (0, 0), (1, 1))
    set_routes("fixed")
    expected = [
        linear_backward_for(e, x, w, config, mask),
        conv2d_backward_for(ec, xc, wc, *one, 1, config, mask),
    ]
    set_routes("measured")
    monkeypatch.setattr(routes, "time_routes", fake_timer(winner))
    got = [
        linear_backward_for(e, x, w, config, mask),
        conv2d_backward_for(ec, xc, wc, *one, 1, config, mask),
    ]
    for a, b in zip(expected, got, strict=True):
        for ga, gb in zip(a, b, strict=True):
            assert torch.equal(ga, gb)
    assert len(ROUTES.used) == 2


def test_a_miss_measures_and_saves_a_hit_does_not(tmp_path):
    path = tmp_path / "routes.json"
    calls: list[str] = []
    cache = RouteCache(path, fake_timer("float", calls))
    x, w, _ = _case()
    key = ProductKey.of("conv2d", ("dx", "dw"), x, w, CONV, "tensor")
    assert cache.choose(key, lambda plan: None, x.device) == {"dx": "float", "dw": "float"}
    assert sorted(calls) == sorted(plans(("dx", "dw")))
    data = json.loads(path.read_text())
    (entries,) = data["machines"].values()
    assert entries[str(key)]["routes"] == {"dx": "float", "dw": "float"}
    assert set(entries[str(key)]["seconds"]) == set(plans(("dx", "dw")))
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]  # no temporary file left
    calls.clear()
    assert cache.choose(key, lambda plan: None, x.device)["dx"] == "float"  # memory
    fresh = RouteCache(path, fake_timer("integer", calls))
    assert fresh.choose(key, lambda plan: None, x.device)["dw"] == "float"  # the file
    assert calls == [] and fresh.used[str(key)].source == "cache"
    other = ProductKey.of("conv2d", ("dw",), x, w, CONV, "tensor")
    assert fresh.choose(other, lambda plan: None, x.device) == {"dw": "integer"}
    assert calls == ["integer", "float"]
    machines = json.loads(path.read_text())["machines"]
    assert set(next(iter(machines.values()))) == {str(key), str(other)}


def test_a_tie_or_a_near_tie_keeps_the_integer_route(tmp_path):
    x, w, _ = _case()
    key = ProductKey.of("conv2d", ("dx", "dw"), x, w, CONV, "tensor")
    integer = {"dx": "integer", "dw": "integer"}
    cache = RouteCache(tmp_path / "r.json", lambda c, d: dict.fromkeys(c, 1.0))
    assert cache.choose(key, lambda plan: None, x.device) == integer
    inside = 1 - routes.MARGIN / 2  # faster, but by less than the margin
    near = RouteCache(
        tmp_path / "near.json", lambda c, d: {**dict.fromkeys(c, 1.0), "float": inside}
    )
    assert near.choose(key, lambda plan: None, x.device) == integer
    beyond = 1 - 2 * routes.MARGIN
    clear = RouteCache(
        tmp_path / "clear.json", lambda c, d: {**dict.fromkeys(c, 1.0), "float": beyond}
    )
    assert clear.choose(key, lambda plan: None, x.device) == {"dx": "float", "dw": "float"}


def test_another_machine_measures_again(tmp_path, monkeypatch):
    path = tmp_path / "routes.json"
    x, w, _ = _case()
    key = ProductKey.of("linear", ("dx",), x.flatten(1), w.flatten(1), None, "tensor")
    RouteCache(path, fake_timer("float")).choose(key, lambda plan: None, x.device)
    calls: list[str] = []
    monkeypatch.setattr(routes, "fingerprint", lambda device: "another CPU | torch 0 | 1 threads")
    cache = RouteCache(path, fake_timer("integer", calls))
    assert cache.choose(key, lambda plan: None, x.device) == {"dx": "integer"}
    assert calls == ["integer", "float"]
    machines = json.loads(path.read_text())["machines"]
    assert len(machines) == 2
    assert machines["another CPU | torch 0 | 1 threads"][str(key)]["routes"] == {"dx": "integer"}


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": 1, "machines": []}',
        '{"format": 99, "machines": {}}',
        '{"format": 1, "machines": {"m": 3}}',
    ],
)
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, text):
    path = tmp_path / "routes.json"
    path.write_text(text)
    x, w, _ = _case()
    key = ProductKey.of("conv2d", ("dx",), x, w, CONV, "tensor")
    cache = RouteCache(path, fake_timer("float"))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert cache.choose(key, lambda plan: None, x.device) == {"dx": "float"}
    data = json.loads(path.read_text())
    assert data["format"] == routes.CACHE_FORMAT
    assert next(iter(data["machines"].values()))[str(key)]["routes"] == {"dx": "float"}


def test_an_invalid_entry_is_measured_again(tmp_path):
    path = tmp_path / "routes.json"
    x, w, _ = _case()
    key = ProductKey.of("conv2d", ("dx", "dw"), x, w, CONV, "tensor")
    bad = {"routes": {"dx": "fast"}, "seconds": {}}
    machine = routes.fingerprint(x.device)
    path.write_text(json.dumps({"format": 1, "machines": {machine: {str(key): bad}}}))
    calls: list[str] = []
    RouteCache(path, fake_timer("float", calls)).choose(key, lambda plan: None, x.device)
    assert len(calls) == 4


def test_an_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = RouteCache(blocker / "routes.json", fake_timer("float"))
    x, w, _ = _case()
    key = ProductKey.of("conv2d", ("dx",), x, w, CONV, "tensor")
    with pytest.warns(RuntimeWarning, match="memory only"):
        assert cache.choose(key, lambda plan: None, x.device) == {"dx": "float"}
    assert cache.choose(key, lambda plan: None, x.device) == {"dx": "float"}


def test_the_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(routes.CACHE_DIR_ENV, str(tmp_path / "a"))
    assert routes.cache_path() == tmp_path / "a" / routes.CACHE_FILE
    monkeypatch.delenv(routes.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert routes.cache_path() == tmp_path / "xdg" / "metagrad" / routes.CACHE_FILE
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert routes.cache_path() == Path.home() / ".cache" / "metagrad" / routes.CACHE_FILE


def test_the_mode_comes_from_set_routes_else_the_environment(monkeypatch):
    monkeypatch.setenv(routes.ROUTES_ENV, "measured")
    assert int8.routes_mode() == "measured"
    set_routes("fixed")
    try:
        assert int8.routes_mode() == "fixed"
    finally:
        set_routes(None)
    monkeypatch.delenv(routes.ROUTES_ENV)
    assert int8.routes_mode() == "fixed"
    monkeypatch.setenv(routes.ROUTES_ENV, "fast")
    with pytest.raises(ValueError, match="METAGRAD_INT8_ROUTES"):
        int8.routes_mode()
    with pytest.raises(ValueError, match="fixed, measured"):
        set_routes("fast")


def test_time_routes_runs_each_plan_in_turn():
    order: list[str] = []
    candidates = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    seconds = routes.time_routes(candidates, torch.device("cpu"))
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert order == ["a", "b"] * (1 + routes.REPETITIONS)


def test_grouped_convolutions_and_traced_code_keep_the_fixed_routes(measured, monkeypatch):
    monkeypatch.setattr(routes, "time_routes", fake_timer("float"))
    config = QuantConfig(grad=QuantSpec(8, "nearest"), backend="int8")
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 2, 3, 3)
    e = torch.randn(2, 6, 5, 5)
    conv2d_backward_for(e, x, w, *CONV, 2, config, (True, True, False))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    linear_backward_for(e.flatten(1)[:, :8], x.flatten(1)[:, :4], w.flatten(1)[:8, :4], config,
                        (True, True, False))  # fmt: skip
    assert ROUTES.used == {}


def _summary(tmp_path, name: str, **settings) -> dict:
    cfg = build_config(
        {
            "model": "small_cnn",
            "data": "digits",
            "batch_size": 16,
            "max_steps": 2,
            "progress": False,
            "compile": "off",
            "grad_bits": 8,
            "out": str(tmp_path / name),
            **settings,
        }
    )
    train(cfg)
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_a_run_records_its_routes_in_the_summary(measured, monkeypatch, tmp_path):
    monkeypatch.setattr(routes, "time_routes", fake_timer("dx float + dw integer"))
    summary = _summary(tmp_path, "measured", backend="int8", routes="measured")
    record = summary["int8_routes"]
    assert record["mode"] == "measured" and record["cache"] == str(measured)
    products = record["products"]
    convs = [k for k in products if k.startswith("conv2d dL/dx and dL/dW")]
    assert convs and all(products[k]["routes"] == {"dx": "float", "dw": "integer"} for k in convs)
    assert all(p["source"] == "measured" for p in products.values())
    assert summary["config"]["routes"] == "measured"
    # a second run on this machine reads the cache file instead of measuring
    monkeypatch.setattr(routes, "time_routes", fake_timer("integer"))
    ROUTES.clear()
    again = _summary(tmp_path, "again", backend="int8", routes="measured")["int8_routes"]
    assert {k: p["routes"] for k, p in again["products"].items()} == {
        k: p["routes"] for k, p in products.items()
    }
    assert all(p["source"] == "cache" for p in again["products"].values())


def test_fixed_routes_and_other_backends_record_no_measurement(measured, tmp_path):
    fixed = _summary(tmp_path, "fixed", backend="int8", routes="fixed")["int8_routes"]
    assert fixed["mode"] == "fixed" and fixed["products"] == {}
    assert _summary(tmp_path, "simulate")["int8_routes"] is None


def test_auto_routes_follow_the_environment(monkeypatch):
    monkeypatch.delenv(routes.ROUTES_ENV, raising=False)
    try:
        assert resolve_routes("auto") == "measured"
        monkeypatch.setenv(routes.ROUTES_ENV, "fixed")
        assert resolve_routes("auto") == "fixed"
        assert resolve_routes("measured") == "measured"
        monkeypatch.setenv(routes.ROUTES_ENV, "fast")
        with pytest.raises(ConfigError, match="METAGRAD_INT8_ROUTES must be fixed or measured"):
            resolve_routes("auto")
    finally:
        set_routes(None)
    with pytest.raises(ConfigError, match="routes must be one of"):
        build_config({"routes": "fast"})


def test_route_record_lists_what_was_used(measured, monkeypatch):
    monkeypatch.setattr(routes, "time_routes", fake_timer("float"))
    config = QuantConfig(grad=QuantSpec(8, "nearest"), backend="int8")
    x, w, lw = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(x, w, lw, config)
    record = route_record()
    assert record["mode"] == "measured"
    assert {tuple(p["routes"].values()) for p in record["products"].values()} <= {
        ("float",),
        ("float", "float"),
    }
