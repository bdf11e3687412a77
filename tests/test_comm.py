"""Quantized gradient averaging across two gloo processes (metagrad.parallel.comm).

Two module fixtures each spawn two ranks once: one runs the collectives, the other trains a small
DDP model under each hook. Every rank saves what it computed; the tests compare the ranks' files
with each other and with float64 references recomputed here from the same seeded inputs.
"""

import copy
import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metagrad.parallel import comm
from metagrad.parallel.comm import (
    QuantizedHookState,
    all_reduce_mean_,
    payload_bytes,
    quantized_all_reduce_mean,
    register_comm_hook,
    ring_all_reduce_bytes,
)
from metagrad.parallel.distributed import shutdown

WORLD = 2
NUMEL, BLOCK = 5000, 256  # padded to 5120: 20 blocks, 10 per rank's chunk
ZERO_BLOCK = slice(1024, 1280)  # all-zero on every rank: must come back exactly zero
BITS = (8, 4, 3, 2)
REPEATS, UNBIASED_BITS = 200, 4
DDP_BITS = (32, 16, 8, 4)
DDP_STEPS, RESUME_AT = 5, 3


def _spawn(worker, tmp_path: Path) -> list[dict]:
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(worker, args=(init, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _init(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


def _inputs(rank: int) -> torch.Tensor:
    """Rank ``rank``'s tensor: blocks of very different magnitudes, one all-zero block."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(NUMEL, generator=g)
    x *= torch.logspace(-4, 2, NUMEL // 50).repeat_interleave(50)[
        torch.randperm(NUMEL, generator=g)
    ]
    x[ZERO_BLOCK] = 0
    return x


def _offset_inputs(rank: int) -> torch.Tensor:
    """Values 0.3 of a 4-bit step past a code (where nearest rounding is biased); absmax first."""
    g = torch.Generator().manual_seed(2000 + rank)
    qmax = 2 ** (UNBIASED_BITS - 1) - 1
    step = torch.logspace(-3, 1, math.ceil(NUMEL / BLOCK))
    levels = torch.randint(-qmax, qmax, (NUMEL,), generator=g) + 0.3
    levels[::BLOCK] = qmax
    return levels * step.repeat_interleave(BLOCK)[:NUMEL]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed_tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + rank)
    return [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.randn(2, 3, 2, generator=g),
    ]


def _collectives_worker(rank: int, init: str, out: str) -> None:
    _init(rank, init)
    x = _inputs(rank)
    res: dict = {"mean": {}, "sent": {}}
    for bits in BITS:
        res["mean"][bits], res["sent"][bits] = comm._all_reduce_mean(
            x, bits, None, _generator(10 * bits + rank), BLOCK
        )
    res["bf16"] = quantized_all_reduce_mean(
        x.to(torch.bfloat16), 8, generator=_generator(rank), block_size=BLOCK
    )
    y = _offset_inputs(rank)
    res["single"] = quantized_all_reduce_mean(
        y, UNBIASED_BITS, generator=_generator(rank), block_size=BLOCK
    )
    total = torch.zeros(NUMEL, dtype=torch.float64)
    for k in range(REPEATS):
        g = _generator(100_000 + 1000 * k + rank)
        total += quantized_all_reduce_mean(y, UNBIASED_BITS, generator=g, block_size=BLOCK)
    res["repeated"] = total / REPEATS
    nan = x.clone()
    nan[7] = float("nan") if rank == 0 else 0.0
    res["nan"] = quantized_all_reduce_mean(nan, 8, generator=_generator(rank), block_size=BLOCK)
    exact = _mixed_tensors(rank)
    all_reduce_mean_(exact)
    res["exact"] = exact
    quantized = _mixed_tensors(rank)
    all_reduce_mean_(quantized, bits=8, generator=_generator(rank), block_size=BLOCK)
    res["quantized"] = quantized
    singles = [dist.new_group([r]) for r in range(WORLD)]
    res["alone"] = quantized_all_reduce_mean(x, 4, group=singles[rank], generator=_generator(0))
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def collectives(tmp_path_factory) -> list[dict]:
    return _spawn(_collectives_worker, tmp_path_factory.mktemp("collectives"))


def _steps(bits: int, x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Each block's step size ``absmax / qmax`` (0 for an all-zero block), per element."""
    qmax = 2 ** (bits - 1) - 1
    blocks = math.ceil(x.numel() / block)
    padded = torch.zeros(blocks * block, dtype=x.dtype)
    padded[: x.numel()] = x
    amax = padded.view(blocks, block).abs().amax(dim=1, keepdim=True)
    return (amax / qmax).expand(blocks, block).reshape(-1)[: x.numel()]


def _reference(inputs) -> torch.Tensor:
    return sum(inp.double() for inp in inputs) / WORLD


@pytest.mark.parametrize("bits", BITS)
def test_result_is_bit_identical_on_every_rank(collectives, bits):
    assert torch.equal(collectives[0]["mean"][bits], collectives[1]["mean"][bits])
    assert collectives[0]["mean"][bits].dtype == torch.float32


def test_low_precision_input_keeps_its_dtype_and_agrees(collectives):
    a, b = collectives[0]["bf16"], collectives[1]["bf16"]
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("bits", BITS)
def test_error_is_below_the_mean_input_step_plus_the_output_step(collectives, bits):
    # phase 1 errs by under one step s_r per rank, averaged: sum_r s_r / N; phase 2 by under
    # one step t of the reduced block, whose absmax becomes exactly +-qmax codes: t = max|out|/qmax
    inputs = [_inputs(r) for r in range(WORLD)]
    out = collectives[0]["mean"][bits].double()
    bound = sum(_steps(bits, x.double()) for x in inputs) / WORLD + _steps(bits, out)
    err = (out - _reference(inputs)).abs()
    assert torch.all(err <= bound * (1 + 1e-5))
    assert torch.all(out[ZERO_BLOCK] == 0)
    assert err.max() > 0  # it did quantize


def test_non_finite_block_comes_back_nan_on_every_rank(collectives):
    a, b = collectives[0]["nan"], collectives[1]["nan"]
    assert torch.isnan(a[:BLOCK]).all() and torch.isnan(b[:BLOCK]).all()
    assert torch.isfinite(a[BLOCK:]).all() and torch.equal(a[BLOCK:], b[BLOCK:])


def test_averaged_results_converge_to_the_true_mean(collectives):
    bits = UNBIASED_BITS
    qmax = 2 ** (bits - 1) - 1
    inputs = [_offset_inputs(r).double() for r in range(WORLD)]
    mean = _reference(inputs)
    steps_in = [_steps(bits, x) for x in inputs]
    s_mean = sum(steps_in) / WORLD
    t_max = (_steps(bits, mean) * qmax + s_mean) / qmax  # bounds the reduced block's step
    # rounding a value to a grid of step h stochastically: variance <= h^2 / 4, bias <= h / 512
    sigma = (sum(s**2 for s in steps_in) / WORLD**2 + t_max**2).sqrt() / 2
    bias = (s_mean + t_max) / 512
    err = collectives[0]["repeated"] - mean
    assert torch.equal(collectives[0]["repeated"], collectives[1]["repeated"])
    assert torch.all(err.abs() <= bias + 5 * sigma / math.sqrt(REPEATS))
    # the signed error, in units of each element's step, averages out over elements and repeats:
    # (nearest rounding would leave -0.3 of a step here after the first phase alone)
    unit = err / s_mean
    n = NUMEL * REPEATS
    tol = ((bias + 5 * sigma / math.sqrt(n)) / s_mean).max()
    assert abs(unit.mean()) <= tol < 0.01
    single = collectives[0]["single"].double() - mean
    assert err.norm() < 0.2 * single.norm()


@pytest.mark.parametrize("bits", BITS)
def test_bytes_handed_to_collectives_match_payload_bytes(collectives, bits):
    expected = payload_bytes(NUMEL, bits, WORLD, BLOCK)
    assert collectives[0]["sent"][bits] == collectives[1]["sent"][bits] == expected


def test_full_precision_all_reduce_mean_is_exact_per_dtype(collectives):
    inputs = [_mixed_tensors(r) for r in range(WORLD)]
    for i, (a, b) in enumerate(zip(*inputs, strict=True)):
        expected = (a + b) / WORLD  # exact for two ranks: one rounding, a halving
        for rank in range(WORLD):
            got = collectives[rank]["exact"][i]
            assert got.dtype == a.dtype and torch.equal(got, expected), (i, rank)


def test_quantized_all_reduce_mean_in_place_agrees_and_is_close(collectives):
    inputs = [_mixed_tensors(r) for r in range(WORLD)]
    for i, (a, b) in enumerate(zip(*inputs, strict=True)):
        got = collectives[0]["quantized"][i]
        assert got.dtype == a.dtype and got.shape == a.shape
        assert torch.equal(got, collectives[1]["quantized"][i])
        amax = max(a.abs().max(), b.abs().max()).double()
        assert (got.double() - (a.double() + b.double()) / WORLD).abs().max() <= 3 * amax / 127


def test_single_rank_group_returns_the_tensor_unquantized(collectives):
    for rank in range(WORLD):
        assert torch.equal(collectives[rank]["alone"], _inputs(rank))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_worker(rank: int, init: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, init)
    res: dict = {"params": {}}

    def step(ddp: DDP, opt: torch.optim.Optimizer, i: int) -> None:
        g = torch.Generator().manual_seed(100 * i + rank)
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    for bits in DDP_BITS:
        torch.manual_seed(0)
        ddp = DDP(_Net(), bucket_cap_mb=0.004)  # a few buckets
        state = register_comm_hook(ddp, bits, seed=1)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        res["init"] = _flat_params(ddp.module)
        for i in range(DDP_STEPS):
            if bits == UNBIASED_BITS and i == RESUME_AT:
                saved = copy.deepcopy((ddp.module.state_dict(), opt.state_dict()))
                saved_hook = state.state_dict()
            step(ddp, opt, i)
        res["params"][bits] = _flat_params(ddp.module)
        if bits == 8:
            res["calls"], res["bytes_sent"] = state.calls, state.bytes_sent
    # resume the 4-bit run from step RESUME_AT: with the hook's generator restored, exactly
    for restore_generator in (True, False):
        ddp.module.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        if restore_generator:
            state.load_state_dict(saved_hook)
        for i in range(RESUME_AT, DDP_STEPS):
            step(ddp, opt, i)
        res[f"resumed{int(restore_generator)}"] = _flat_params(ddp.module)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    del ddp, opt, state  # a DDP reducer that outlives its process group aborts the process
    shutdown()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    return _spawn(_ddp_worker, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("bits", DDP_BITS)
def test_ddp_hook_keeps_ranks_bit_identical(ddp_runs, bits):
    assert torch.equal(ddp_runs[0]["params"][bits], ddp_runs[1]["params"][bits])


@pytest.mark.parametrize(("bits", "tol"), [(16, 0.01), (8, 0.05), (4, 0.75)])
def test_ddp_hook_trains_close_to_full_precision_communication(ddp_runs, bits, tol):
    params, init = ddp_runs[0]["params"], ddp_runs[0]["init"]
    moved = (params[32] - init).norm()
    assert (params[bits] - params[32]).norm() <= tol * moved
    assert not torch.equal(params[bits], params[32])


def test_ddp_hook_counts_calls_and_bytes(ddp_runs):
    assert ddp_runs[0]["calls"] > DDP_STEPS  # more than one bucket per step once rebuilt
    assert ddp_runs[0]["bytes_sent"] == ddp_runs[1]["bytes_sent"] > 0


def test_ddp_hook_state_resumes_exactly(ddp_runs):
    for rank in range(WORLD):
        run = ddp_runs[rank]
        assert torch.equal(run["resumed1"], run["params"][UNBIASED_BITS])
        assert not torch.equal(run["resumed0"], run["params"][UNBIASED_BITS])


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_payload_bytes_ratio_to_float32_ring(world_size):
    numel = 2**24  # a multiple of world_size * block: no padding
    ring = ring_all_reduce_bytes(numel, 4, world_size)
    assert ring == 2 * (world_size - 1) / world_size * numel * 4
    # per element: 4 bytes in float32, against a code plus 4 / 1024 bytes of scale
    assert ring / payload_bytes(numel, 8, world_size, 1024) == pytest.approx(4 / (1 + 4 / 1024))
    assert ring / payload_bytes(numel, 4, world_size, 1024) == pytest.approx(4 / (0.5 + 4 / 1024))
    assert ring / payload_bytes(numel, 2, world_size, 1024) == pytest.approx(4 / (0.25 + 4 / 1024))


def test_payload_bytes_counts_padding_and_trivial_cases():
    # 1 element: one block of codes and one scale per chunk, both phases, to the other rank
    assert payload_bytes(1, 8, 2, 1024) == 2 * (1024 + 4)
    assert payload_bytes(1, 4, 2, 1024) == 2 * (512 + 4)
    assert payload_bytes(10**6, 8, 1, 1024) == 0
    assert payload_bytes(0, 8, 4, 1024) == 0


@pytest.mark.parametrize("width", [2, 4, 8])
def test_codes_pack_and_unpack_exactly(width):
    qmax = 2 ** (width - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (64,), generator=_generator(width), dtype=torch.int8)
    packed = comm._pack(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * width // 8
    assert torch.equal(comm._unpack(packed, width), codes.float())


def test_bad_arguments_raise_clear_errors():
    x = torch.ones(8)
    for bits in (1, 9, 12, 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            quantized_all_reduce_mean(x, bits)
    with pytest.raises(ValueError, match="floating-point"):
        quantized_all_reduce_mean(torch.ones(8, dtype=torch.int32), 8)
    for block_size in (0, -4, 6):
        with pytest.raises(ValueError, match="block_size"):
            quantized_all_reduce_mean(x, 8, block_size=block_size)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        all_reduce_mean_([x, torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="ring_all_reduce_bytes"):
        payload_bytes(100, 32, 2)
    with pytest.raises(ValueError, match="world_size"):
        payload_bytes(100, 8, 0)
    with pytest.raises(ValueError, match="no hook"):
        QuantizedHookState(32)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_comm_hook(nn.Linear(2, 2), 8)
