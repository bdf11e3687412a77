"""Vector bit casts and int32 conversions in the C++ code inductor generates for metagrad's
compiled kernels.

Inductor's CPU backend has no vector form of a bit cast (``Tensor.view(torch.int32)`` of float32
values, and back): it stores the vector, casts element by element in a loop and loads the
result. The float formats read each value's binade from its bits and build their powers of two
from bits, so their compiled rounding spent much of its time in such loops. Its conversion of
int32 to float32 takes the same scalar loop wherever a kernel works on two vectors at a time
(as one that writes bf16 does): ATen has the vector conversion for one vector, not for two, so
the rescaling of integer products fell to it. :func:`install` gives float32 <-> int32 bit casts
the vector form ATen already has (``at::vec::cast``, a reinterpretation of the register), and
int32 -> float32 conversions of several vectors one conversion per vector (the same rounding),
for kernels compiled while :func:`active` is on; :mod:`metagrad.kernels` turns it on for its own
kernels only, so code that others compile is generated as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_SAME_WIDTH = {(torch.float32, torch.int32), (torch.int32, torch.float32)}
_active = 0


class active:
    """Within the block, bit casts in generated CPU kernels are vector casts (once installed)."""

    def __enter__(self) -> None:
        global _active
        _active += 1

    def __exit__(self, *exc: object) -> None:
        global _active
        _active -= 1


def _vector_form(scalarized: Callable[..., Any]) -> Callable[..., Any]:
    from torch._inductor.codegen.cpp import DTYPE_TO_CPP
    from torch._inductor.virtualized import V

    def to_dtype_bitcast(x: Any, dtype: torch.dtype, src_dtype: torch.dtype) -> Any:
        lanes = getattr(V.kernel, "_get_num_vectors", None)
        if not _active or (src_dtype, dtype) not in _SAME_WIDTH or lanes is None:
            return scalarized(x, dtype, src_dtype)
        n_vec, target = lanes(src_dtype), DTYPE_TO_CPP[dtype]
        if n_vec == 1:
            return f"at::vec::cast<{target}>({x})"
        return (
            f"([&]() {{ at::vec::VectorizedN<{target}, {n_vec}> out; "
            f"for (int i = 0; i < {n_vec}; i++) out[i] = at::vec::cast<{target}>({x}[i]); "
            "return out; }())"
        )

    to_dtype_bitcast.metagrad_vector_form = True  # type: ignore[attr-defined]
    return to_dtype_bitcast


def _per_vector_conversion(general: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(general)
    def get_to_dtype_expr(
        kernel: Any, src: Any, dtype: torch.dtype, src_dtype: torch.dtype, rounding: bool = False
    ) -> Any:
        lanes = getattr(kernel, "_get_num_vectors", None)
        if (
            not _active
            or rounding
            or (src_dtype, dtype) != (torch.int32, torch.float32)
            or not getattr(src, "is_vec", False)
            or lanes is None
            or lanes(src_dtype) != lanes(dtype)
            or lanes(dtype) == 1
        ):
            return general(kernel, src, dtype, src_dtype, rounding)
        n_vec = lanes(dtype)
        return (
            f"([&]() {{ at::vec::VectorizedN<float, {n_vec}> out; "
            f"for (int i = 0; i < {n_vec}; i++) out[i] = at::vec::convert<float>({src}[i]); "
            "return out; }())"
        )

    get_to_dtype_expr.metagrad_vector_form = True  # type: ignore[attr-defined]
    return get_to_dtype_expr


def install() -> bool:
    """Give inductor's vector kernels the vector bit cast and the per-vector int32 conversion
    (idempotent); False where this torch's inductor is not laid out as expected (its own scalar
    loops then stay)."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:
        return False
    overrides = getattr(cpp, "CppVecOverrides", None)
    scalarized = getattr(overrides, "to_dtype_bitcast", None)
    vec_kernel = getattr(cpp, "CppVecKernel", None)
    general = getattr(vec_kernel, "get_to_dtype_expr", None)
    if None in (overrides, scalarized, general) or not hasattr(cpp, "DTYPE_TO_CPP"):
        return False
    if not getattr(scalarized, "metagrad_vector_form", False):
        overrides.to_dtype_bitcast = staticmethod(_vector_form(scalarized))
    if not getattr(general, "metagrad_vector_form", False):
        vec_kernel.get_to_dtype_expr = _per_vector_conversion(general)
    return True
