"""Which route each backward product of the ``int8`` backend takes: fixed, or chosen by measurement.

A layer's two backward products (``dL/dx`` and ``dL/dW``, of a linear layer or a convolution)
each run on one of two routes that multiply the very same 8-bit codes:

* ``integer``: ``torch._int_mm`` on int8 operands (exact int32 sums, rescaled in float32);
* ``float``: products in :func:`~metagrad.backward.int8.codes.exact_code_dtype` (bf16 under
  mixed precision, the operands' own float dtype otherwise), the scales applied in float32
  afterwards.

Both give the same numbers up to float rounding: bit for bit where the product's sums are exact
in that dtype (bf16 rounds its result to 8 significant bits before the scale is applied).

The mode (:func:`set_routes`, else the environment variable ``METAGRAD_INT8_ROUTES``, else
``fixed``):

* ``fixed``: every product takes the integer route, except where :data:`FLOAT_ROUTES` sends a
  device's layer kind to float products;
* ``measured``: the first time a layer's products are seen (a :class:`ProductKey`: kind, which
  products, shapes, convolution geometry, dtype, layout, device, error granularity), the layer's
  backward runs a few times on each assignment of routes to its products (both integer, both
  float, and with two products the two mixed ones), interleaved; the one with the lowest median
  time is kept if it beats the all-integer one by more than :data:`MARGIN` (else the all-integer
  one is), in memory and in a JSON file (:func:`cache_path`) under the machine's fingerprint
  (:func:`metagrad.machine.fingerprint`: CPU model, torch version, threads), so that later
  processes on that machine do not measure it again. Timing whole assignments counts
  what the products share (the integer products of a convolution share one patch matrix; mixed
  routes quantize the error once per route). The random draws of stochastic rounding during the
  measurement are undone, so the run draws what it would have drawn. Grouped convolutions and
  code being traced by ``torch.compile`` keep the fixed routes.

:data:`ROUTES` holds the choices; :func:`route_record` is what ``metagrad train`` writes to
``summary.json`` (``int8_routes``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad.backward.int8.settings import IntPair
from metagrad.checkpoint import CheckpointError, write_json
from metagrad.machine import fingerprint

INTEGER, FLOAT = "integer", "float"
ROUTE_NAMES = (INTEGER, FLOAT)
ROUTE_MODES = ("fixed", "measured")
ROUTES_ENV = "METAGRAD_INT8_ROUTES"
"""Environment variable with the default mode (``fixed`` or ``measured``)."""
CACHE_DIR_ENV = "METAGRAD_CACHE_DIR"
"""Environment variable naming the folder of the route cache (default: the user's cache dir)."""
CACHE_FILE = "int8-routes.json"
CACHE_FORMAT = 1
REPETITIONS = 3
"""Timed rounds per route (after one warm-up round); the median is compared."""
MARGIN = 0.1
"""How much faster than the all-integer plan another plan must measure to be chosen (a share
of the integer plan's time): a few timed rounds are noisy, and a near tie is not worth a
route whose real cost the measurement may have missed."""

FLOAT_ROUTES: dict[tuple[str, str], str] = {
    ("cuda", "conv2d"): (
        "on CUDA the integer convolution backward (im2col + torch._int_mm) is far slower than "
        "cuDNN's: its products run in bf16 on the same 8-bit codes (exact), scales in float32"
    ),
}
"""``(device type, layer kind) -> reason`` for the products that the ``fixed`` mode runs as float
products on the exact 8-bit codes: the same numbers, faster there (``benchmarks/speed.py``
measures both). A user may add or remove entries."""

Plan = dict[str, str]
"""A route per product: ``{"dx": "integer", "dw": "float"}``."""
Candidates = dict[str, Callable[[], object]]
Timer = Callable[[Candidates, torch.device], dict[str, float]]
"""``(name -> function running a plan, device) -> name -> seconds``."""
PRODUCT_NAMES = {"dx": "dL/dx", "dw": "dL/dW"}


def float_route(device: torch.device, kind: str) -> str | None:
    """Why the fixed mode runs ``kind`` layers' products on ``device`` as float products."""
    return FLOAT_ROUTES.get((device.type, kind))


def fixed_route(device: torch.device, kind: str) -> str:
    """The route of every product of ``kind`` layers on ``device`` in the ``fixed`` mode."""
    return FLOAT if float_route(device, kind) is not None else INTEGER


_MODE: list[str | None] = [None]


def set_routes(mode: str | None) -> None:
    """Set this process's route mode, ``fixed`` or ``measured`` (None: back to the default)."""
    if mode is not None and mode not in ROUTE_MODES:
        raise ValueError(f"int8 routes must be one of {', '.join(ROUTE_MODES)}; got {mode!r}")
    _MODE[0] = mode


def routes_mode() -> str:
    """The route mode now: :func:`set_routes`'s, else ``METAGRAD_INT8_ROUTES``'s, else fixed."""
    mode = _MODE[0] or os.environ.get(ROUTES_ENV) or "fixed"
    if mode not in ROUTE_MODES:
        raise ValueError(f"{ROUTES_ENV} must be one of {', '.join(ROUTE_MODES)}; got {mode!r}")
    return mode


def cache_path() -> Path:
    """The route cache: ``$METAGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/metagrad``, else
    ``~/.cache/metagrad``; file :data:`CACHE_FILE`."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "metagrad")
    return Path(folder) / CACHE_FILE


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class ProductKey:
    """What a product's speed depends on: one entry of the route cache."""

    kind: str  # "linear" or "conv2d"
    products: tuple[str, ...]  # of "dx" (dL/dx) and "dw" (dL/dW)
    x: tuple[int, ...]  # the layer input's shape (a linear layer's: rows x features)
    weight: tuple[int, ...]
    conv: tuple[IntPair, IntPair, IntPair] | None  # stride, padding, dilation
    dtype: str
    layout: str  # "channels_last" or "contiguous" (convolutions), "rows" (linear)
    device: str
    granularity: str  # of the error's scale

    @staticmethod
    def of(
        kind: str,
        products: tuple[str, ...],
        x: Tensor,
        weight: Tensor,
        conv: tuple[IntPair, IntPair, IntPair] | None,
        granularity: str,
    ) -> ProductKey:
        """The key of ``products`` of a ``kind`` layer with input ``x`` and ``weight``."""
        if kind == "linear":
            shape, layout = (x.numel() // max(x.shape[-1], 1), x.shape[-1]), "rows"
        else:
            shape = tuple(x.shape)
            cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            layout = "channels_last" if cl and not x.is_contiguous() else "contiguous"
        conv = None if conv is None else tuple(tuple(int(v) for v in c) for c in conv)
        dtype = str(x.dtype).removeprefix("torch.")
        device = x.device.type
        return ProductKey(
            kind, products, shape, tuple(weight.shape), conv, dtype, layout, device, granularity
        )

    def __str__(self) -> str:
        conv = ""
        if self.conv is not None:
            stride, padding, dilation = (",".join(map(str, c)) for c in self.conv)
            conv = f" stride {stride} padding {padding} dilation {dilation}"
        product = " and ".join(PRODUCT_NAMES[p] for p in self.products)
        return (
            f"{self.kind} {product} x {_dims(self.x)} w {_dims(self.weight)}{conv} {self.dtype} "
            f"{self.layout} {self.device} error per {self.granularity}"
        )


def plans(products: tuple[str, ...]) -> dict[str, Plan]:
    """The route assignments a measurement times, by name (the all-integer one first)."""
    named = {r: dict.fromkeys(products, r) for r in ROUTE_NAMES}
    if len(products) == 2:
        for rx, rw in ((FLOAT, INTEGER), (INTEGER, FLOAT)):
            named[f"dx {rx} + dw {rw}"] = {"dx": rx, "dw": rw}
    return named


def _best(seconds: dict[str, float]) -> str:
    """The fastest plan if it beats the all-integer one by more than :data:`MARGIN`, else the
    all-integer one."""
    fastest = min(seconds, key=seconds.__getitem__)
    return fastest if seconds[fastest] < (1 - MARGIN) * seconds[INTEGER] else INTEGER


@dataclass
class Choice:
    """The route of each of a layer's products, the seconds each plan took when they were
    measured, and where the choice came from (``measured`` in this process, or ``cache``)."""

    routes: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    source: str = "measured"

    def to_dict(self) -> dict[str, Any]:
        return {"routes": self.routes, "seconds": self.seconds, "source": self.source}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_routes(candidates: Candidates, device: torch.device) -> dict[str, float]:
    """Median seconds of each candidate: one warm-up round, then :data:`REPETITIONS` rounds,
    the candidates in turn within each round."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for rep in range(1 + REPETITIONS):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _entry(data: Any, products: tuple[str, ...]) -> Choice | None:
    """A cache file entry as a :class:`Choice`, or None if it is not a valid one."""
    if not isinstance(data, dict):
        return None
    routes, seconds = data.get("routes"), data.get("seconds", {})
    if not isinstance(routes, dict) or sorted(routes) != sorted(products):
        return None
    if not all(r in ROUTE_NAMES for r in routes.values()) or not isinstance(seconds, dict):
        return None
    if not all(isinstance(v, (int, float)) for v in seconds.values()):
        return None
    return Choice(dict(routes), dict(seconds), "cache")


class RouteCache:
    """The routes chosen so far: in memory, and in a JSON file keyed by machine fingerprint.

    ``path``: the file (default: :func:`cache_path` at each use); ``timer``: how the candidates
    are timed (default: :func:`time_routes`). The file is read on a miss and rewritten
    atomically, merged with what it holds then, after each measurement; an unreadable file is
    ignored with a warning and rewritten.
    """

    def __init__(self, path: Path | None = None, timer: Timer | None = None) -> None:
        self.path = path
        self.timer = timer
        self.memory: dict[tuple[str, str], Choice] = {}
        self.used: dict[str, Choice] = {}
        self._warned: set[str] = set()

    def file(self) -> Path:
        return self.path if self.path is not None else cache_path()

    def clear(self) -> None:
        """Forget the choices held in memory and those used so far (not the file)."""
        self.memory.clear()
        self.used.clear()

    def choose(self, key: ProductKey, run: Callable[[Plan], object], device: torch.device) -> Plan:
        """``key``'s routes: from memory, else from the file, else measured (and saved).

        ``run(plan)`` runs the layer's backward with the routes of ``plan``.
        """
        machine, name = fingerprint(device), str(key)
        choice = self.memory.get((machine, name))
        if choice is None:
            choice = _entry(self._read().get(machine, {}).get(name), key.products)
        if choice is None:
            named = plans(key.products)
            candidates = {n: (lambda plan=plan: run(plan)) for n, plan in named.items()}
            timer = self.timer or time_routes
            with torch.random.fork_rng(_rng_devices(device), device_type=device.type):
                seconds = timer(candidates, device)
            best = _best(seconds)
            choice = Choice(named[best], {n: seconds[n] for n in named})
            self._write(machine, name, choice)
        self.memory[machine, name] = choice
        self.used[name] = choice
        return dict(choice.routes)

    def _read(self) -> dict[str, dict[str, Any]]:
        """The file's ``{fingerprint: {key: entry}}`` (empty if absent or unreadable)."""
        path = self.file()
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            machines = data["machines"]
            if data.get("format") != CACHE_FORMAT or not isinstance(machines, dict):
                raise ValueError("not a route cache of this version")
            if not all(isinstance(v, dict) for v in machines.values()):
                raise ValueError("a machine's entry is not an object")
            return machines
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._warn(path, f"route cache {path} is unreadable ({err}); it will be rewritten")
            return {}

    def _write(self, machine: str, name: str, choice: Choice) -> None:
        path = self.file()
        machines = self._read()
        entry = {"routes": choice.routes, "seconds": choice.seconds}
        machines.setdefault(machine, {})[name] = entry
        try:
            write_json({"format": CACHE_FORMAT, "machines": machines}, path)
        except CheckpointError as err:
            self._warn(f"write {path}", f"{err}: measured routes are kept in memory only")

    def _warn(self, what: Path | str, message: str) -> None:
        if str(what) not in self._warned:
            self._warned.add(str(what))
            warnings.warn(message, RuntimeWarning, stacklevel=4)


ROUTES = RouteCache()
"""The process's route choices (``measured`` mode)."""


def route_record() -> dict[str, Any]:
    """The mode and the routes of every layer's products used so far in this process
    (``summary.json``), by :class:`ProductKey`."""
    return {
        "mode": routes_mode(),
        "cache": str(ROUTES.file()),
        "products": {name: choice.to_dict() for name, choice in ROUTES.used.items()},
    }
