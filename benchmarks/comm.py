"""Averaging real gradients across 2 gloo ranks: bytes, error and time of each DDP comm method.

    PYTHONPATH=src python -m benchmarks.comm    # -> benchmarks/results/comm.json

Each rank takes one backward of vgg16 at width 0.25 on its own random batch (32 images 3x32x32,
random labels, seeded by rank); the exact average of those gradients (float64) is the
reference. Every method then averages the same gradients through ``DistributedDataParallel``
for a few iterations (no optimizer step, so the local gradients never change):

- fp32: DDP's default all-reduce (``default_hooks.allreduce_hook``, its Python twin);
- fp16, bf16: PyTorch's ``fp16_compress_hook`` and ``bf16_compress_hook``;
- PowerSGD at rank 1 and 4 (``start_powerSGD_iter=2``: two plain all-reduces, then compressed
  iterations, warm-started, with error feedback: what a rank feeds the compressor includes the
  residual it kept from the previous iteration);
- ours: :func:`metagrad.parallel.comm.quantized_hook` at 8 and 4 bits, block size 1024.

Per method: bytes each rank sends per all-reduce (a ring all-reduce's cost model for PyTorch's
hooks, with PowerSGD's P and Q matrices and uncompressed tensors counted as it sends them; for
ours the bytes handed to the collectives), their ratio to fp32, the relative L2 error and the
cosine of the averaged gradient against the exact mean at the last iteration, whether ranks
agree bit for bit, and the median wall time of the hooks (compression and communication) per
all-reduce: noisy, two processes sharing 2 CPU cores over loopback.
"""

import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from metagrad.models import create_model
from metagrad.parallel.comm import (
    DEFAULT_BLOCK_SIZE,
    QuantizedHookState,
    payload_bytes,
    quantized_hook,
    ring_all_reduce_bytes,
)
from metagrad.training.records import cpu_model

OUT = Path(__file__).resolve().parent / "results" / "comm.json"
WORLD = 2
SETTINGS: dict[str, Any] = {"model": "vgg16", "width": 0.25, "batch_size": 32, "image": 32}
ITERATIONS = 6  # per method; PowerSGD compresses from the third on
POWERSGD_START = 2
METHODS = ("fp32", "fp16", "bf16", "powerSGD r=1", "powerSGD r=4", "ours int8", "ours int4")

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


def _ring(numel: int, element_size: int) -> float:
    return ring_all_reduce_bytes(numel, element_size, WORLD)


def _powersgd_bytes(state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket) -> float:
    """What PowerSGD all-reduces for ``bucket`` (its own rule for which tensors it compresses)."""
    if state.iter < state.start_powerSGD_iter:
        return _ring(bucket.buffer().numel(), 4)
    elements = 0
    for grad in bucket.gradients():
        n, m = grad.view(grad.shape[0], -1).shape
        rank = min(n, m, state.matrix_approximation_rank)
        compressed = (n + m) * rank
        worth = compressed * state.min_compression_rate < n * m
        elements += compressed if worth else n * m
    return _ring(elements, 4)


BytesOf = Callable[[Any, dist.GradBucket], float]


def _method(name: str) -> tuple[Any, Hook, BytesOf | None]:
    """(state, hook, bytes this rank sends for a bucket: evaluated before the hook runs; None
    for ours, whose state counts the bytes it hands to the collectives)."""
    if name in ("fp32", "fp16", "bf16"):
        element_size = 4 if name == "fp32" else 2
        hook = {
            "fp32": default_hooks.allreduce_hook,
            "fp16": default_hooks.fp16_compress_hook,
            "bf16": default_hooks.bf16_compress_hook,
        }[name]
        return None, hook, lambda _, bucket: _ring(bucket.buffer().numel(), element_size)
    if name.startswith("powerSGD"):
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(name.split("=")[1]),
            start_powerSGD_iter=POWERSGD_START,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
        return state, powerSGD_hook.powerSGD_hook, _powersgd_bytes
    bits = int(name.removeprefix("ours int"))
    state = QuantizedHookState.seeded(bits, seed=0, block_size=DEFAULT_BLOCK_SIZE)
    return state, quantized_hook, None


def _timed(hook: Hook, bytes_of: BytesOf | None, log: list[dict[str, float]]) -> Hook:
    """``hook``, waited for, logging each bucket's size, bytes and seconds.

    Its own name also lets CPU runs call ``bf16_compress_hook``, which DDP refuses by name
    without CUDA (as :func:`metagrad.parallel.comm.register_comm_hook` does for ``bits=16``).
    """

    def timed_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        numel = bucket.buffer().numel()
        sent = -state.bytes_sent if bytes_of is None else bytes_of(state, bucket)
        start = time.perf_counter()
        future = hook(state, bucket)
        future.wait()
        seconds = time.perf_counter() - start
        if bytes_of is None:
            sent += state.bytes_sent
        log.append({"numel": numel, "bytes": sent, "seconds": seconds})
        return future

    return timed_hook


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _compare(avg: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    avg = avg.double()
    rel = (avg - ref).norm() / ref.norm()
    cosine = (avg @ ref) / (avg.norm() * ref.norm())
    return float(rel), float(cosine)


def _ranks_agree(flat: torch.Tensor) -> bool:
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    base = create_model(SETTINGS["model"], num_classes=10, width=SETTINGS["width"])
    g = torch.Generator().manual_seed(rank)
    size = SETTINGS["image"]
    images = torch.randn(SETTINGS["batch_size"], 3, size, size, generator=g)
    labels = torch.randint(0, 10, (SETTINGS["batch_size"],), generator=g)

    def backward(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()

    local = _copy(base)
    backward(local)
    ref = _flat_grad(local).double()
    dist.all_reduce(ref)
    ref /= WORLD

    rows = []
    for name in METHODS:
        state, hook, bytes_of = _method(name)
        log: list[dict[str, float]] = []
        ddp = DDP(_copy(base))
        ddp.register_comm_hook(state, _timed(hook, bytes_of, log))
        iterations = []
        for _ in range(ITERATIONS):
            start = len(log)
            backward(ddp)
            rel, cosine = _compare(_flat_grad(ddp.module), ref)
            buckets = log[start:]
            iterations.append(
                {
                    "rel_l2_error": rel,
                    "cosine": cosine,
                    "bytes": sum(b["bytes"] for b in buckets),
                    "seconds": sum(b["seconds"] for b in buckets),
                    "bucket_numels": [int(b["numel"]) for b in buckets],
                }
            )
        last = iterations[-1]
        timed = iterations[POWERSGD_START:] if name.startswith("powerSGD") else iterations[1:]
        rows.append(
            {
                "method": name,
                "bytes_per_rank": last["bytes"],
                "rel_l2_error": last["rel_l2_error"],
                "cosine": last["cosine"],
                "ranks_bit_identical": _ranks_agree(_flat_grad(ddp.module)),
                "ms_per_all_reduce_median": 1e3 * statistics.median(i["seconds"] for i in timed),
                "iterations": iterations,
            }
        )
        dist.barrier()
    if rank == 0:
        Path(out, "rows.json").write_text(json.dumps({"numel": ref.numel(), "rows": rows}))
    dist.destroy_process_group()


def _copy(model: nn.Module) -> nn.Module:
    clone = create_model(SETTINGS["model"], num_classes=10, width=SETTINGS["width"])
    clone.load_state_dict(model.state_dict())
    return clone


def table(result: dict[str, Any]) -> str:
    lines = [
        "| method | bytes / rank | fp32 bytes / bytes | rel. L2 error | cosine | ranks agree "
        "| ms / all-reduce (noisy) |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['bytes_per_rank']:,.0f} | {row['compression']:.2f} "
            f"| {row['rel_l2_error']:.2e} | {row['cosine']:.6f} "
            f"| {'yes' if row['ranks_bit_identical'] else 'no'} "
            f"| {row['ms_per_all_reduce_median']:.1f} |"
        )
    for row in result["rows"]:
        if row["method"].startswith("powerSGD"):
            first = row["iterations"][POWERSGD_START]
            lines.append(
                f"\n{row['method']}, first compressed iteration (nothing fed back yet): "
                f"rel. L2 error {first['rel_l2_error']:.2e}, cosine {first['cosine']:.6f}"
            )
    return "\n".join(lines)


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"file://{tmp}/init", tmp), nprocs=WORLD, join=True)
        measured = json.loads(Path(tmp, "rows.json").read_text())
    numel = measured["numel"]
    rows = measured["rows"]
    fp32 = next(r["bytes_per_rank"] for r in rows if r["method"] == "fp32")
    for row in rows:
        row["compression"] = fp32 / row["bytes_per_rank"]
    ours = {r["method"]: r for r in rows if r["method"].startswith("ours")}
    for name, row in ours.items():  # the hook's count against the formula, bucket by bucket
        bits = int(name.removeprefix("ours int"))
        numels = row["iterations"][-1]["bucket_numels"]
        expected = sum(payload_bytes(n, bits, WORLD, DEFAULT_BLOCK_SIZE) for n in numels)
        assert row["bytes_per_rank"] == expected, (name, row["bytes_per_rank"], expected)
    result = {
        "benchmark": "comm",
        "command": "python -m benchmarks.comm",
        "machine": {
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "backend": "gloo",
            "threads_per_rank": 1,
        },
        "settings": {
            **SETTINGS,
            "world_size": WORLD,
            "numel": numel,
            "iterations": ITERATIONS,
            "block_size": DEFAULT_BLOCK_SIZE,
            "powerSGD_start_iter": POWERSGD_START,
        },
        "notes": {
            "bytes": "per rank per all-reduce of the whole gradient; PyTorch's hooks: ring cost "
            "model 2(N-1)/N * elements * element size (gloo's algorithm may differ); ours: "
            "bytes handed to all_to_all and all_gather (codes and float32 scales), equal to "
            "metagrad.parallel.comm.payload_bytes per bucket",
            "error": "relative L2 error and cosine of the averaged gradient against the exact "
            "float64 mean, at the last iteration. PowerSGD's includes its error feedback: each "
            "rank adds the residual it kept from the previous iteration (here of the same "
            "gradients), a scheme meant to pay off over training steps rather than in one "
            "all-reduce; 'iterations' holds every iteration's figures, the first compressed one "
            f"being index {POWERSGD_START}",
            "time": "median over iterations of the hooks' wall time (waited for), noisy: two "
            "processes on 2 CPU cores over loopback",
            "ideal_compression": {
                "int8": 4 / (1 + 4 / DEFAULT_BLOCK_SIZE),
                "int4": 4 / (0.5 + 4 / DEFAULT_BLOCK_SIZE),
            },
        },
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {OUT}")
    return result


if __name__ == "__main__":
    main()
