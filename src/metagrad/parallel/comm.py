"""Averaging gradients across ranks with low-precision payloads (a DDP communication hook).

:func:`quantized_all_reduce_mean` averages a tensor over the ranks of a process group in two
phases, so that each rank sends about what a ring all-reduce sends, but as ``bits``-bit codes:

1. every rank quantizes its whole (zero-padded) tensor to ``bits``-bit codes, one float32 scale
   per block of ``block_size`` elements (stochastic rounding, :func:`metagrad.quant.quantize_codes`
   with one scale per row of the ``(blocks, block_size)`` view), and an ``all_to_all`` hands
   chunk ``k`` of every rank's codes and scales to rank ``k``;
2. rank ``k`` dequantizes and sums its chunk in float32, divides by the world size, quantizes
   that mean again (stochastic, same bits and blocks) and an ``all_gather`` hands every rank all
   the reduced chunks, which each rank dequantizes the same way: the result is bit-identical on
   every rank.

Codes travel as bytes: one code per byte for 5 to 8 bits, two for 3 and 4 bits, four for 2 bits;
scales travel as the bytes of their float32 values, in the same message. Both roundings are
unbiased (up to the quantizer's dither resolution), so the result's expectation is the mean and
its error in block ``b`` is below ``sum_r s_rb / N + t_b``: the ranks' step sizes ``s_rb`` in that
block averaged, plus the step size ``t_b`` of the reduced block.

A block holding NaN or inf on any rank comes out all-NaN (the quantizer's NaN scale), so
divergence stays visible.

:func:`register_comm_hook` installs the matching hook on a ``DistributedDataParallel`` model;
:func:`all_reduce_mean_` averages a list of tensors in place (one collective per dtype).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from metagrad.parallel.distributed import rank_seed
from metagrad.quant.quantize import quantize_codes
from metagrad.quant.spec import FULL_PRECISION_BITS, MAX_BITS, MIN_BITS, QuantSpec

DEFAULT_BLOCK_SIZE = 1024
"""Elements per float32 scale: the scales add ``4 / block_size`` bytes per element."""

HALF_PRECISION_BITS = 16
HOOK_BITS: tuple[int, ...] = (
    FULL_PRECISION_BITS,
    HALF_PRECISION_BITS,
    *range(MIN_BITS, MAX_BITS + 1),
)
COMM_BITS: tuple[int, ...] = (FULL_PRECISION_BITS, HALF_PRECISION_BITS, 8, 4)
"""The all-reduce payloads a training run offers (``MetaGrad(comm_bits=...)``, ``--comm-bits``):
full precision, bfloat16, 8 and 4 bits."""
_SCALE_BYTES = 4  # float32
_MAX_CODES_PER_BYTE = 4

# all_gather_single is all_gather_into_tensor's newer name (older torch has only the latter)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ProcessGroup = dist.ProcessGroup


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    if bits not in (FULL_PRECISION_BITS, HALF_PRECISION_BITS) and not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be {MIN_BITS}..{MAX_BITS} (quantized), {HALF_PRECISION_BITS} (bfloat16) "
            f"or {FULL_PRECISION_BITS} (full precision), got {bits}"
        )


def _check_block_size(block_size: int) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size <= 0
        or block_size % _MAX_CODES_PER_BYTE
    ):
        raise ValueError(
            f"block_size must be a positive multiple of {_MAX_CODES_PER_BYTE}, got {block_size!r}"
        )


def _check_float(tensor: Tensor, what: str = "tensor") -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {tensor.dtype}")


def code_width(bits: int) -> int:
    """Bits a ``bits``-bit code takes on the wire: 2, 4 or 8 (codes never straddle bytes)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _pack(codes: Tensor, width: int) -> Tensor:
    """int8 codes (flat) as bytes: ``8 // width`` offset-binary codes per uint8, low bits first."""
    if width == 8:
        return codes.view(torch.uint8)
    per_byte = 8 // width
    # offset binary: codes in [-qmax, qmax] become 1..2**width - 1 (masked: NaN codes are junk)
    levels = (codes + (1 << (width - 1))).view(torch.uint8).bitwise_and_((1 << width) - 1)
    levels = levels.view(-1, per_byte)
    packed = levels[:, 0].clone()
    for k in range(1, per_byte):
        packed.bitwise_or_(levels[:, k].bitwise_left_shift(k * width))
    return packed


def _unpack(packed: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_pack` over the last dim: uint8 ``(..., bytes)`` to float32 codes."""
    if width == 8:
        return packed.view(torch.int8).to(torch.float32)
    per_byte = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    levels = packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_((1 << width) - 1)
    codes = levels.to(torch.float32).sub_(1 << (width - 1))
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _encode(x: Tensor, spec: QuantSpec, width: int, generator: torch.Generator | None) -> Tensor:
    """``x`` (chunks, blocks, block_size) float32 as bytes (chunks, segment): scales, then codes."""
    chunks, blocks, block_size = x.shape
    codes, scale = quantize_codes(
        x.view(chunks * blocks, block_size), spec, generator=generator, dtype=torch.int8
    )
    scale_bytes = scale.view(chunks, blocks).view(torch.uint8)
    return torch.cat([scale_bytes, _pack(codes.view(-1), width).view(chunks, -1)], dim=1)


def _decode(segments: Tensor, blocks: int, width: int) -> Tensor:
    """Inverse of :func:`_encode`: bytes (chunks, segment) to float32 (chunks, blocks, block)."""
    chunks = segments.shape[0]
    split = blocks * _SCALE_BYTES
    scale = segments[:, :split].contiguous().view(torch.float32)  # (chunks, blocks), aligned
    codes = _unpack(segments[:, split:], width).view(chunks, blocks, -1)
    return codes.mul_(scale.unsqueeze(-1))


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce_mean(
    tensor: Tensor,
    bits: int,
    group: ProcessGroup | None,
    generator: torch.Generator | None,
    block_size: int,
) -> tuple[Tensor, int]:
    """:func:`quantized_all_reduce_mean` and the bytes this rank handed to peers (quantized)."""
    world_size, rank = _world(group)
    if bits == FULL_PRECISION_BITS:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out.div_(world_size), 0
    if bits == HALF_PRECISION_BITS:
        out = tensor.to(torch.bfloat16, copy=True)
        dist.all_reduce(out, group=group)
        return out.div_(world_size).to(tensor.dtype), 0
    numel = tensor.numel()
    if world_size == 1 or numel == 0:
        return tensor.clone(), 0
    spec = QuantSpec(bits, "stochastic", "sample")
    width = code_width(bits)
    blocks = math.ceil(numel / (world_size * block_size))  # per chunk
    padded = torch.zeros(
        world_size * blocks * block_size, dtype=torch.float32, device=tensor.device
    )
    padded[:numel].copy_(tensor.reshape(-1))

    # phase 1: rank k receives chunk k of every rank's codes, sums it and quantizes the mean
    send = _encode(padded.view(world_size, blocks, block_size), spec, width, generator)
    received = torch.empty_like(send)
    dist.all_to_all_single(received.view(-1), send.view(-1), group=group)
    reduced = _decode(received, blocks, width).sum(dim=0).div_(world_size)

    # phase 2: every rank gathers every reduced chunk and decodes them identically
    mine = _encode(reduced.unsqueeze(0), spec, width, generator).view(-1)
    gathered = torch.empty(world_size, mine.numel(), dtype=torch.uint8, device=tensor.device)
    _all_gather_single(gathered.view(-1), mine, group=group)
    out = _decode(gathered, blocks, width).view(-1)[:numel]

    sent = (send.numel() - send[rank].numel()) + mine.numel() * (world_size - 1)
    return out.view(tensor.shape).to(tensor.dtype), sent


def quantized_all_reduce_mean(
    tensor: Tensor,
    bits: int,
    *,
    group: ProcessGroup | None = None,
    generator: torch.Generator | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """The mean of ``tensor`` over the ranks of ``group``, sent as ``bits``-bit codes.

    Every rank must call it with a tensor of the same shape. The result is a new tensor (shape
    and dtype of ``tensor``), bit-identical on every rank, unbiased (stochastic rounding) and
    computed in float32; see the module docstring for the two phases and the error bound.
    ``bits`` 16 is a bfloat16 all-reduce (as PyTorch's ``bf16_compress_hook``).

    Args:
        tensor: a floating-point tensor, of any shape (treated as flat).
        bits: 2 to 8 (8 and 4 are the intended settings), or 32 for the backend's plain
            all-reduce in ``tensor``'s dtype followed by a division.
        group: the process group (default: the default group).
        generator: the random generator of the stochastic rounding, on ``tensor``'s device.
            Ranks should draw different dither (seed it per rank); None uses the global one.
        block_size: elements per float32 scale, a positive multiple of 4.

    With one rank nothing is sent and nothing is quantized: the result is a copy of ``tensor``.
    """
    _check_float(tensor)
    _check_bits(bits)
    _check_block_size(block_size)
    return _all_reduce_mean(tensor, bits, group, generator, block_size)[0]


def all_reduce_mean_(
    tensors: Sequence[Tensor],
    *,
    bits: int = FULL_PRECISION_BITS,
    group: ProcessGroup | None = None,
    generator: torch.Generator | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """Average ``tensors`` over the ranks of ``group`` in place, identically on every rank.

    The tensors are flattened into one buffer per (device, dtype), in order of first
    appearance, and each buffer is averaged by one :func:`quantized_all_reduce_mean` (``bits``
    32: the backend's all-reduce). Every rank must pass tensors of the same shapes and dtypes in
    the same order.
    """
    _check_bits(bits)
    _check_block_size(block_size)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for i, tensor in enumerate(tensors):
        _check_float(tensor, f"tensors[{i}]")
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    with torch.no_grad():
        for same in groups.values():
            flat = _flatten_dense_tensors(same)
            mean = _all_reduce_mean(flat, bits, group, generator, block_size)[0]
            for tensor, averaged in zip(same, _unflatten_dense_tensors(mean, same), strict=True):
                tensor.copy_(averaged)


def payload_bytes(
    numel: int, bits: int, world_size: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """Bytes each rank sends for one :func:`quantized_all_reduce_mean` of ``numel`` elements.

    Exact, for ``bits`` 2 to 8: the codes and float32 scales of ``world_size - 1`` chunks in
    each phase, the tensor being padded to a multiple of ``world_size * block_size``. (For the
    full-precision all-reduce see :func:`ring_all_reduce_bytes`.)
    """
    _check_bits(bits)
    _check_block_size(block_size)
    if bits == FULL_PRECISION_BITS:
        raise ValueError(
            "payload_bytes counts quantized payloads (bits 2..8); for 32 bits use "
            "ring_all_reduce_bytes"
        )
    if numel < 0 or world_size < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got {numel} and {world_size}")
    if world_size == 1 or numel == 0:
        return 0
    chunk = math.ceil(numel / (world_size * block_size)) * block_size
    segment = chunk // block_size * _SCALE_BYTES + chunk * code_width(bits) // 8
    return 2 * (world_size - 1) * segment


def ring_all_reduce_bytes(numel: int, element_size: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce: ``2 * (N - 1) / N * numel * element_size``.

    The standard cost model (a reduce-scatter and an all-gather around a ring), for reference:
    a backend's actual algorithm may send more or less (gloo picks among several).
    """
    if numel < 0 or element_size < 1 or world_size < 1:
        raise ValueError(
            f"need numel >= 0, element_size >= 1 and world_size >= 1, got {numel}, "
            f"{element_size} and {world_size}"
        )
    return 2 * (world_size - 1) / world_size * numel * element_size


@dataclass
class QuantizedHookState:
    """State of :func:`quantized_hook`: its settings, its generator and what it has sent.

    The generator belongs to this rank (see :meth:`seeded`); checkpoint it with
    :meth:`state_dict` on every rank to resume with the same dither.
    """

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    group: ProcessGroup | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    bytes_sent: int = 0
    calls: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_block_size(self.block_size)
        if self.bits == FULL_PRECISION_BITS:
            raise ValueError("QuantizedHookState needs bits 2..8; bits 32 needs no hook")

    @classmethod
    def seeded(
        cls,
        bits: int,
        seed: int = 0,
        *,
        group: ProcessGroup | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: torch.device | str = "cpu",
    ) -> Self:
        """A state whose generator on ``device`` is seeded with ``seed`` and this global rank."""
        generator = torch.Generator(device=device)
        generator.manual_seed(rank_seed(seed, dist.get_rank()))
        return cls(bits, block_size, group, generator)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state and the byte counters (settings are not included)."""
        return {
            "generator": self.generator.get_state(),
            "bytes_sent": self.bytes_sent,
            "calls": self.calls,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same rank)."""
        self.generator.set_state(state_dict["generator"])
        self.bytes_sent = int(state_dict["bytes_sent"])
        self.calls = int(state_dict["calls"])


def _bf16_hook(group: ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """PyTorch's ``bf16_compress_hook`` under another name.

    DDP refuses that hook by name on builds without CUDA and NCCL (its check is about NCCL's
    bf16 support); gloo all-reduces bf16 tensors, so CPU models call it through this one.
    """
    return default_hooks.bf16_compress_hook(group, bucket)


def quantized_hook(
    state: QuantizedHookState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    """DDP communication hook: the bucket's mean by :func:`quantized_all_reduce_mean`.

    Runs synchronously and returns a completed future.
    """
    mean, sent = _all_reduce_mean(
        bucket.buffer(), state.bits, state.group, state.generator, state.block_size
    )
    state.bytes_sent += sent
    state.calls += 1
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(mean)
    return future


def register_comm_hook(
    ddp_model: DistributedDataParallel,
    bits: int,
    *,
    seed: int = 0,
    group: ProcessGroup | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizedHookState | None:
    """Make ``ddp_model`` average its gradients at ``bits`` bits; call before the first backward.

    ``bits`` 32 keeps DDP's default all-reduce; 16 installs PyTorch's ``bf16_compress_hook``
    (on CPU through a renamed wrapper, as DDP refuses it by name without CUDA); 2 to 8 install
    :func:`quantized_hook` with a generator seeded from ``seed`` and the rank. ``group``
    defaults to the model's process group. Returns the hook's state for ``bits`` 2 to 8
    (checkpoint it with ``state_dict()`` on every rank), None otherwise.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a DistributedDataParallel model, got {type(ddp_model).__name__}"
        )
    if bits not in HOOK_BITS:
        raise ValueError(f"bits must be one of {HOOK_BITS} for a comm hook, got {bits!r}")
    if group is None:
        group = ddp_model.process_group
    if bits == FULL_PRECISION_BITS:
        return None
    device = next(ddp_model.parameters()).device
    if bits == HALF_PRECISION_BITS:
        hook = _bf16_hook if device.type == "cpu" else default_hooks.bf16_compress_hook
        ddp_model.register_comm_hook(group, hook)
        return None
    state = QuantizedHookState.seeded(bits, seed, group=group, block_size=block_size, device=device)
    ddp_model.register_comm_hook(state, quantized_hook)
    return state


def data_parallel(
    model: torch.nn.Module,
    bits: int,
    *,
    seed: int = 0,
    device_ids: list[int] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[DistributedDataParallel, QuantizedHookState | None]:
    """``model`` under ``DistributedDataParallel``, averaging its gradients at ``bits`` bits.

    A quantized hook's blocks follow the layout of DDP's gradient buckets, which DDP rebuilds
    after the first iteration (in the order gradients became ready): a run resumed from a
    checkpoint would start again on the first layout, and quantize differently from a run that
    was never stopped. For ``bits`` below 16 the model is wrapped with
    ``find_unused_parameters=True``, under which DDP keeps its first layout for the whole run,
    so a resumed run is bit-identical to an uninterrupted one. Returns the DDP model and the
    hook's state (see :func:`register_comm_hook`).
    """
    keep_layout = bits < HALF_PRECISION_BITS
    ddp = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=keep_layout)
    return ddp, register_comm_hook(ddp, bits, seed=seed, block_size=block_size)
