"""Compiled twins of the library's elementwise hot spots (the quantizer, the fused hypernetwork).

Each kernel is a plain torch function, registered with :func:`kernel`. Run eagerly it is the
reference; with compilation on (:func:`set_compile`), ``torch.compile`` fuses it into a few
generated kernels (C++ with OpenMP on CPU, Triton on CUDA) that compute the same numbers in fewer
passes over memory (on CPU with vector bit casts and conversions: :mod:`metagrad.vector_casts`).
Compilation is off by default in the library, on in ``metagrad train`` (``--compile``), and falls
back to eager execution, with a warning, where no compiler works.

Usage::

    import metagrad as mg
    mg.kernels.set_compile(True)      # or: with mg.kernels.compiled(): ...
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from metagrad import vector_casts
from metagrad.layout import flat_view

F = TypeVar("F", bound=Callable[..., Any])

RECOMPILE_LIMIT = 64
"""Compiled variants allowed per kernel (dtypes, layouts, granularities, grad mode: a training
run needs a dozen or two; dynamo's default of 8 would silently fall back to eager code)."""

_enabled = False
_availability: dict[str, tuple[bool, str]] = {}


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum()


def available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``torch.compile`` works for ``device`` here, and why not (compiles a tiny probe)."""
    kind = torch.device(device).type
    if kind not in _availability:
        try:
            compiled_probe = torch.compile(_probe, dynamic=True)
            compiled_probe(torch.ones(4, device=kind))
            _availability[kind] = (True, "")
        except Exception as err:  # any compiler or backend failure means "not here"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _availability[kind] = (False, f"{type(err).__name__}: {reason}")
    return _availability[kind]


def set_compile(enabled: bool, device: str | torch.device = "cpu") -> bool:
    """Turn compiled kernels on or off; returns whether they are on.

    Turning them on checks that ``torch.compile`` works for ``device``; where it does not, the
    kernels stay eager and a warning says why.
    """
    global _enabled
    if enabled:
        ok, why = available(device)
        if not ok:
            warnings.warn(
                f"metagrad: torch.compile does not work here ({why}); using eager kernels",
                RuntimeWarning,
                stacklevel=2,
            )
            enabled = False
    _enabled = bool(enabled)
    if _enabled:
        vector_casts.install()
        from torch._dynamo import config

        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return _enabled


def compile_enabled() -> bool:
    """Whether registered kernels run compiled."""
    return _enabled


@contextmanager
def compiled(enabled: bool = True, device: str | torch.device = "cpu") -> Iterator[bool]:
    """Run registered kernels compiled (or eager) inside the ``with`` block."""
    before = _enabled
    try:
        yield set_compile(enabled, device)
    finally:
        set_compile(before)


RECOMPUTE = {
    "realize_reads_threshold": 1_000,
    "realize_opcount_threshold": 10_000,
    "realize_acc_reads_threshold": 1_000,
    "realize_cpu_opcount_threshold": 10_000,
    "realize_cpu_acc_reads_threshold": 1_000,
    "cpp.max_horizontal_fusion_size": 64,
}
"""Inductor settings that make it recompute cheap elementwise values in every loop that reads
them instead of storing them to memory: for kernels whose intermediates are many times larger
than their inputs (a hypernetwork's hidden units). On CPU, up to 64 reductions over the same
elements share a loop (inductor's default, 16, would recompute the values once per 16)."""


EXACT_CASTS = {"emulate_precision_casts": True}
"""Inductor settings that round low-precision intermediates as eager code does."""

THREADS_AT_RUN_TIME = {"cpp.dynamic_threads": True}
"""Inductor settings for every kernel: each CPU loop gets an OpenMP region whose threads are
chosen at run time. Otherwise inductor decides per loop, from the sizes of the first call,
whether it runs in parallel at all; since one dynamic-shape compilation serves every size (and
is kept in inductor's on-disk cache for later processes), a kernel first called on a small
tensor would run on one thread for every tensor after it."""


def _inductor_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` this torch's inductor knows (names come and go between releases; a
    dotted name is a setting of a sub-config, such as ``cpp.threads``)."""
    from torch._inductor import config

    def known(name: str) -> bool:
        owner: Any = config
        for part in name.split("."):
            if not hasattr(owner, part):
                return False
            owner = getattr(owner, part)
        return True

    return {k: v for k, v in options.items() if known(k)}


def kernel(
    fn: F | None = None,
    *,
    recompute: bool = False,
    static_ints: bool = False,
    exact_casts: bool = False,
) -> F | Callable[[F], F]:
    """Register ``fn`` (pure torch code) as a kernel: compiled when :func:`set_compile` is on.

    The compiled twin is built on first use, with dynamic shapes, so one compilation serves all
    layer sizes. ``recompute=True`` compiles with :data:`RECOMPUTE`. ``static_ints=True`` traces
    integer arguments (axes, layouts) as constants, one compilation per value, where dynamic
    shapes would make them symbolic. ``exact_casts=True`` rounds every low-precision
    intermediate as eager code does (inductor otherwise keeps bf16 and fp16 intermediates in
    float32). ``fn.eager`` is always the uncompiled reference. Use as ``@kernel`` or
    ``@kernel(recompute=True)``.
    """
    if fn is None:
        return functools.partial(  # type: ignore[return-value]
            kernel, recompute=recompute, static_ints=static_ints, exact_casts=exact_casts
        )
    compiled_fn: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled_fn
        if not _enabled or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled_fn is None:
            options = _inductor_options(
                {
                    **THREADS_AT_RUN_TIME,
                    **(RECOMPUTE if recompute else {}),
                    **(EXACT_CASTS if exact_casts else {}),
                }
            )
            compiled_fn = torch.compile(fn, dynamic=True, options=options)
        from torch._dynamo import config

        if not static_ints or config.specialize_int:
            with vector_casts.active():
                return compiled_fn(*args, **kwargs)
        # set for this call only, by assignment: config.patch costs several times more
        config.specialize_int = True
        try:
            with vector_casts.active():
                return compiled_fn(*args, **kwargs)
        finally:
            config.specialize_int = False

    run.eager = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


FINITE_GROUP = 8
"""Tensors per compiled call of :func:`all_finite`: one call for a whole list would compile a
graph as long as the list (hundreds of parameters: minutes), and one per tensor costs a call
each."""


@kernel
def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All elements of ``t`` in 1-D (a view when ``t`` is dense in any dim order), at least two
    (a single element is repeated: size 1 would compile a variant of its own)."""
    flat = flat_view(t)
    return flat.repeat(2) if flat.numel() == 1 else flat


def all_finite(
    tensors: Sequence[torch.Tensor], device: str | torch.device | None = None
) -> torch.Tensor:
    """Whether every element of every tensor is finite: a 0-d bool tensor on ``device`` (default:
    the first tensor's device; True for no elements), without synchronisation.

    Compiled, the floating-point tensors of each device and dtype are checked in calls of
    :data:`FINITE_GROUP` tensors, each read once as 1-D, so that one compilation serves every
    model; eager ``torch.isfinite(t).all()`` makes four passes per tensor. Integer tensors are
    finite."""
    if device is None:
        device = tensors[0].device if tensors else "cpu"
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    flags = []
    for t in tensors:
        if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.is_complex():  # (inductor's complex support is partial)
            flags.append(torch.isfinite(t).all().to(device))
        else:
            groups.setdefault((t.device, t.dtype), []).append(_flat(t))
    for (where, dtype), flat in groups.items():
        pad = torch.zeros(2, dtype=dtype, device=where)
        for start in range(0, len(flat), FINITE_GROUP):
            chunk = flat[start : start + FINITE_GROUP]
            chunk += [pad] * (FINITE_GROUP - len(chunk))
            flags.append(_all_finite(chunk).to(device))
    if len(flags) == 1:
        return flags[0]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of ``t`` is finite: a 0-d bool tensor on ``t``'s device (no
    synchronisation; :func:`all_finite` of one tensor)."""
    return all_finite([t])
