"""Orthogonal transforms applied before quantization (and undone after), and their registry.

A transform ``T`` acts along the rows of a matrix ``t`` (shape ``(rows, length)``), i.e. along
one axis of the tensor (its :attr:`axis`: the product's contraction axis, or the samples); the
quantizer computes ``T^-1 Q(T t)``. ``T`` is orthogonal, so when both operands of a product
are transformed along the product's contraction axis with the same ``T`` the transforms cancel in
the product, ``(T a)^T (T b) = a^T b``: that is how hardware uses them, and why the simulation of
a quantized product on transformed operands is exact.

- ``rht``: randomized Hadamard transform over blocks of ``block`` elements (a power of two) along
  the row: ``T = H D / sqrt(block)`` with ``D`` a diagonal of random signs, drawn afresh at every
  call from the given generator (QuaRot, Quartet, NVIDIA's NVFP4 recipe). It spreads outliers
  across the block, which makes block scales tighter.
- ``bhq``: block Householder (Chen et al. 2020), along the sample axis: samples are ranked by
  magnitude; the ``n/g`` largest are each put in a group with ``g - 1`` of the smallest, and a
  Householder reflection maps the large one onto the group's mean direction, so its magnitude is
  shared by ``g`` samples before a per-sample quantizer sees them.
- ``bhqs``: ``bhq`` with the paper's per-group diagonal scaling before the reflection (its
  reference code's ``s``): the large sample times ``(lambda_1 / sqrt(g))**(-1/3)``, the small ones
  times ``(lambda_2 h_max / (g - 1))**(-1/3)``, with ``lambda_1`` the large sample's magnitude,
  ``lambda_2`` the largest of the small ones' and ``h_max`` the reflection's largest entry. The
  scaling makes the transform invertible but not orthogonal; the quantizer computes
  ``T^-1 Q(T t)``, unbiased for any invertible ``T``.

A row whose length is not a multiple of the block is zero-padded; the quantizer drops the padded
positions after the inverse (a projection: still unbiased, never a larger error).

Precision: a transform whose matrix is exact in bfloat16 (``rht``: its entries are +-1 before
one scaling) runs in the tensor's own dtype, so under mixed precision it is a bf16 product with
float32 accumulation, as hardware runs it on tensor cores; the others run in float32.

A new transform is a class with ``axis``, ``data_dependent``, ``low_precision``,
``padded_length``, ``prepare``, ``forward`` and ``inverse``, registered with
:func:`register_transform`; one that acts on blocks of a row one by one may say so with
``blockwise(state) -> block``, and the quantizer then fuses it with block scales of that size
(its ``forward`` then also takes ``gain``: a power of two, as a 0-d tensor, to multiply the
result by; the quantizer scales rows near their dtype's largest value down with it). One whose
``forward`` and ``inverse`` also take ``columns=True`` (the same map of the columns of a
``(length, n)`` matrix) says so with ``acts_on_columns = True``, and then quantizes rows that
run down a convolution error's memory where they lie, without transposed copies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from metagrad.quant.draws import draw_integers
from metagrad.quant.formats import NAME_CHARS, NAME_HELP
from metagrad.registry import Registry

MIN_RHT_BLOCK, MAX_RHT_BLOCK = 2, 1024

Axis = Literal["inner", "sample"]


@runtime_checkable
class Transform(Protocol):
    """An invertible map of the rows of a ``(rows, length)`` matrix (orthogonal along the
    ``inner`` axis, where the two operands' transforms cancel in their product)."""

    axis: ClassVar[Axis]  # "inner": the product's contraction axis; "sample": dim 0
    data_dependent: ClassVar[bool]  # whether prepare reads the values (else only the shape)
    low_precision: ClassVar[bool]  # whether forward/inverse may run in bf16/fp16 (exact matrix)

    def padded_length(self, length: int) -> int:
        """The row length the transform works on (rows are zero-padded to it)."""
        ...

    def prepare(self, t: Tensor, generator: torch.Generator | None) -> Any:
        """The random or data-dependent state of one use on (padded) rows like ``t``."""
        ...

    def forward(self, t: Tensor, state: Any) -> Tensor: ...

    def inverse(self, t: Tensor, state: Any) -> Tensor: ...


OVERFLOW_SHIFT = 32
"""A transform runs on values scaled by ``2**-OVERFLOW_SHIFT`` when their largest magnitude is
within that factor of the dtype's largest value (its sums could overflow otherwise)."""


def overflow_guard(rows: Tensor) -> Tensor:
    """``2**-OVERFLOW_SHIFT`` where the largest magnitude of ``rows`` is within that factor of
    its dtype's largest value (a transform's sums of such values could overflow), else 1."""
    top = torch.finfo(rows.dtype).max * 2.0**-OVERFLOW_SHIFT
    big = rows.abs().amax() > top
    one = torch.ones((), dtype=rows.dtype, device=rows.device)
    return torch.where(big, one * 2.0**-OVERFLOW_SHIFT, one)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two)."""
    return _sign_hadamard(n, dtype, device) / math.sqrt(n)


def _sign_hadamard(n: int, dtype: torch.dtype, device) -> Tensor:
    """The Sylvester-Hadamard matrix of order ``n`` with entries +-1 (do not modify).

    Cached in eager code; under ``torch.compile`` built in the graph from its closed form
    ``H[i, j] = (-1)**popcount(i & j)`` (the same matrix, a few fused integer ops).
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two order, got {n}")
    if torch.compiler.is_compiling():
        index = torch.arange(n, device=device)
        both = index[:, None] & index[None, :]
        parity = torch.zeros_like(both)
        for bit in range(n.bit_length() - 1):
            parity ^= (both >> bit) & 1
        return (1 - 2 * parity).to(dtype)
    return _cached_sign_hadamard(n, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_sign_hadamard(n: int, dtype: torch.dtype, device) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype=dtype, device=device)


@dataclass
class _RHTState:
    signs: Tensor  # (block,) of +-1
    block: int


@dataclass(frozen=True)
class RandomizedHadamard:
    """Randomized Hadamard transform over blocks of ``block`` elements along each row."""

    axis: ClassVar[Axis] = "inner"
    data_dependent: ClassVar[bool] = False
    low_precision: ClassVar[bool] = True
    acts_on_columns: ClassVar[bool] = True  # forward and inverse take columns=True
    block: int = 128

    def __post_init__(self) -> None:
        b = self.block
        if (
            isinstance(b, bool)
            or not isinstance(b, int)
            or b & (b - 1)
            or not (MIN_RHT_BLOCK <= b <= MAX_RHT_BLOCK)
        ):
            raise ValueError(
                f"rht block must be a power of two in {MIN_RHT_BLOCK}..{MAX_RHT_BLOCK}, got {b!r}"
            )

    def block_for(self, length: int) -> int:
        """The block used on rows of ``length``: ``block``, or less for shorter rows."""
        if length >= self.block:  # also for a symbolic length (torch.compile, dynamic shapes)
            return self.block
        return min(self.block, 1 << max(int(length) - 1, 1).bit_length())

    def padded_length(self, length: int) -> int:
        b = self.block_for(length)
        return -(-length // b) * b

    def prepare(self, t: Tensor, generator: torch.Generator | None) -> _RHTState:
        block = self.block_for(t.shape[-1])
        bits = draw_integers(t, 0, 2, block, generator)  # one draw under torch.compile too
        return _RHTState(bits.to(t.dtype).mul_(2).sub_(1), block)

    def _apply(
        self,
        t: Tensor,
        state: _RHTState,
        *,
        inverse: bool,
        gain: Tensor | None = None,
        columns: bool = False,
    ) -> Tensor:
        rows, length = t.shape
        b = state.block
        along = rows if columns else length
        if along % b:
            raise ValueError(f"rht rows of length {along} are not a multiple of its block {b}")
        h = _sign_hadamard(b, t.dtype, t.device)
        signs = state.signs.to(t.dtype)
        # forward: (x * signs) @ h = x @ (signs[:, None] * h); inverse: (x @ h) * signs. The
        # +-1 products (and a power-of-two gain) are exact in any dtype; the 1/sqrt(block)
        # scaling comes after.
        h = h * signs if inverse else signs[:, None] * h
        if gain is not None:
            h = h * gain.to(t.dtype)
        if columns:  # each block of a column times h, as a row's block would be: h^T @ block
            product = torch.matmul(h.t(), t.view(rows // b, b, length))
        else:
            product = t.reshape(-1, b) @ h
        return product.mul_(1 / math.sqrt(b)).reshape(rows, length)

    def blockwise(self, state: _RHTState) -> int:
        """The length of the blocks it acts on one by one: rows of any multiple of it may be
        transformed as a ``(n, block)`` matrix."""
        return state.block

    def forward(
        self, t: Tensor, state: _RHTState, gain: Tensor | None = None, columns: bool = False
    ) -> Tensor:
        """The transform of ``t``'s rows (``columns``: of its columns, in blocks down them);
        ``gain``: a power of two (0-d) the result is multiplied by, folded into the matrix (so
        ``t`` is not rescaled in memory first)."""
        return self._apply(t, state, inverse=False, gain=gain, columns=columns)

    def inverse(self, t: Tensor, state: _RHTState, columns: bool = False) -> Tensor:
        return self._apply(t, state, inverse=True, columns=columns)


@dataclass
class _BHQState:
    order: Tensor  # positions: each group's (its large one first), then those in no group
    inverse_order: Tensor  # the permutation that undoes ``order``
    reflection: Tensor  # (g, g): the Householder reflection of one group, symmetric orthogonal
    scale: Tensor | None = None  # per position of ``order``: the diagonal scaling (``scaled``)


@dataclass(frozen=True)
class BlockHouseholder:
    """Block Householder transform over groups of ``group`` positions along the row.

    Positions (the samples, when the row runs over samples) are ranked by their largest
    magnitude across rows; each of the ``length // group`` largest is grouped with ``group - 1``
    of the smallest, and reflected so that its values are spread evenly over its group.
    Positions in no group are left as they are. The transformed row lists the groups one after
    another (``T = R P``: a permutation, then the block reflection, still orthogonal), so that
    the reflection runs on contiguous memory. Its entries are not exact in bf16, so the
    transform runs in float32. ``scaled``: ``T = R S P`` with the paper's per-group diagonal
    scaling ``S`` (module docs), invertible, no longer orthogonal.
    """

    axis: ClassVar[Axis] = "sample"
    data_dependent: ClassVar[bool] = True
    low_precision: ClassVar[bool] = False
    group: int = 8
    scaled: bool = False

    def __post_init__(self) -> None:
        g = self.group
        if isinstance(g, bool) or not isinstance(g, int) or not 2 <= g <= 1024:
            raise ValueError(f"bhq group must be an integer in 2..1024, got {g!r}")

    def padded_length(self, length: int) -> int:
        return length

    def prepare(self, t: Tensor, generator: torch.Generator | None) -> _BHQState:
        length = t.shape[-1]
        g = min(self.group, length)
        n_groups = length // g
        columns = t.t()  # one position per row
        top = torch.maximum(columns.amax(dim=1), -columns.amin(dim=1))
        ranked = top.argsort(descending=True, stable=True)
        large = ranked[:n_groups]
        small = ranked[n_groups:].flip(0)[: n_groups * (g - 1)]  # the smallest positions
        others = ranked[n_groups : length - n_groups * (g - 1)]
        groups = torch.cat([large.unsqueeze(1), small.reshape(n_groups, g - 1)], dim=1)
        order = torch.cat([groups.flatten(), others])
        v = torch.full((g,), -1 / math.sqrt(g), dtype=t.dtype, device=t.device)
        v[0] += 1
        v = v / v.norm()
        reflection = torch.eye(g, dtype=t.dtype, device=t.device) - 2 * torch.outer(v, v)
        scale = None
        if self.scaled and n_groups and g > 1:
            tiny = torch.finfo(t.dtype).tiny
            large_size = top[large].clamp_min(tiny)  # lambda_1 of each group
            small_size = top[groups[:, 1:]].amax(dim=1).clamp_min(tiny)  # lambda_2
            h_max = reflection.abs().max()
            grouped = torch.stack(
                [
                    (large_size / math.sqrt(g)).pow(-1 / 3),
                    (small_size * h_max / (g - 1)).pow(-1 / 3),
                ],
                dim=1,
            )
            per_position = torch.cat([grouped[:, :1], grouped[:, 1:].expand(-1, g - 1)], dim=1)
            scale = torch.cat([per_position.flatten(), top.new_ones(len(others))])
        return _BHQState(order, order.argsort(), reflection, scale)

    def _reflect(self, columns: Tensor, state: _BHQState) -> Tensor:
        """The reflection of each group of consecutive rows of ``columns`` (length, rows)."""
        g = state.reflection.shape[0]
        grouped = columns.shape[0] // g * g
        head = state.reflection.to(columns.dtype) @ columns[:grouped].reshape(
            -1, g, columns.shape[1]
        )
        head = head.reshape(grouped, -1)
        return head if grouped == columns.shape[0] else torch.cat([head, columns[grouped:]])

    def forward(self, t: Tensor, state: _BHQState) -> Tensor:
        # works on t.T, (length, rows): one position per row, contiguous memory when t is the
        # transposed view that a sample axis gives (else copied so: gathering whole rows is a
        # copy of each, gathering strided ones an element at a time)
        columns = t.t().contiguous().index_select(0, state.order)
        if state.scale is not None:
            columns = columns * state.scale.to(columns.dtype).unsqueeze(1)
        return self._reflect(columns, state).t()

    def inverse(self, t: Tensor, state: _BHQState) -> Tensor:
        columns = self._reflect(t.t().contiguous(), state)
        if state.scale is not None:
            columns = columns / state.scale.to(columns.dtype).unsqueeze(1)
        return columns.index_select(0, state.inverse_order).t()


TransformFactory = Callable[[int], Transform]

_TRANSFORMS: Registry[TransformFactory] = Registry(
    "transform",
    pattern=rf"[A-Za-z](?:[{NAME_CHARS}]*[A-Za-z_.+-])?",
    pattern_help=f"{NAME_HELP}, not ending in a digit (a spec writes its block after it: rht32)",
)


def register_transform(name: str, factory: TransformFactory) -> TransformFactory:
    """Make ``factory(block) -> Transform`` available by ``name``."""
    return _TRANSFORMS.add(name, factory)


def get_transform(name: str, block: int) -> Transform:
    """The registered transform ``name`` with block (or group) size ``block``."""
    return _TRANSFORMS.lookup(name)(block)


def list_transforms() -> list[str]:
    """Names of the registered transforms."""
    return list(_TRANSFORMS)


register_transform("rht", RandomizedHadamard)
register_transform("bhq", BlockHouseholder)
register_transform("bhqs", functools.partial(BlockHouseholder, scaled=True))
