"""MetaGrad on an FSDP2-sharded model, for tests/test_fsdp_metagrad.py.

Usage: ``torchrun --nproc_per_node 2 tests/fsdp_metagrad_worker.py OUT CASES`` (sharded), or
``python tests/fsdp_metagrad_worker.py OUT CASES`` (one process, unsharded: the reference).
``CASES`` is a JSON list of settings. Each case trains a small MLP whose layers include an odd
number of rows (uneven shards) and a single row (an empty shard on rank 1) for ``steps``
MetaGrad steps on a global batch of 16 (8 per rank when sharded), with nearest per-sample
gradient quantization (so that two half batches give the gradient of the whole batch); then
again, stopping at ``resume_at`` into a DCP checkpoint and resuming from it in a fresh model
and optimizer; then, with ``resume_from``, resumes from another run's checkpoint. Writes
``OUT/<case>-{sharded,whole}-rank<r>.pt`` with the losses and the full weights and hypernetwork.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

import metagrad as mg
from metagrad.meta.hyper import create_hypernet
from metagrad.parallel.fsdp import load_optimizer_state, shard_model

BATCH = 16
CONFIG = mg.QuantConfig(grad=mg.QuantSpec(bits=8, rounding="nearest", granularity="sample"))


def build(case: dict, sharded: bool) -> tuple[nn.Module, mg.MetaGrad]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 1)
    )
    mg.quantize_(model, CONFIG)
    if sharded:
        policy = None
        if case.get("bf16"):  # bf16 weights in the forward and backward, float32 reduction
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(model, mp_policy=policy)
    hypernet = create_hypernet(case.get("hypernet", "grad+weight"))
    settings = {"momentum": 0.9} if case["base"] == "sgd" else {}
    optimizer = mg.MetaGrad(
        model,
        lr=case["lr"],
        base=case["base"],
        hyper_lr=1e-2,
        horizon=case["horizon"],
        hypernet=hypernet,
        **settings,
    )
    return model, optimizer


def batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12 * BATCH, 12, generator=gen)
    y = x[:, :3].sum(1, keepdim=True).sin() + 0.1 * torch.randn(12 * BATCH, 1, generator=gen)
    per = BATCH // world
    out = []
    for start in range(0, len(x), BATCH):
        lo = start + rank * per
        out.append((x[lo : lo + per], y[lo : lo + per]))
    return out


def train(model, optimizer, data, first: int, last: int, world: int, bf16: bool) -> list[float]:
    losses = []
    for step in range(first, last):
        x, y = data[step]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure).detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def snapshot(model, optimizer, losses: list[float]) -> dict:
    return {
        "losses": losses,
        "model": {k: full(v) for k, v in model.state_dict().items()},
        "hypernet": {k: v.clone() for k, v in optimizer.hypernet.state_dict().items()},
    }


def resume(case: dict, sharded: bool, path: Path) -> tuple[nn.Module, mg.MetaGrad]:
    model, optimizer = build(case, sharded)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    load_optimizer_state(path, optimizer)
    return model, optimizer


def run(case: dict, out: Path, rank: int, world: int) -> None:
    sharded = world > 1
    bf16 = bool(case.get("bf16"))  # bf16 autocast (sharded: and FSDP's bf16 policy)
    data = batches(rank, world)
    model, optimizer = build(case, sharded)
    initial = {k: v.clone() for k, v in optimizer.hypernet.state_dict().items()}
    straight = train(model, optimizer, data, 0, case["steps"], world, bf16)
    result = {"initial_hypernet": initial, "straight": snapshot(model, optimizer, straight)}

    model, optimizer = build(case, sharded)
    first = train(model, optimizer, data, 0, case["resume_at"], world, bf16)
    path = out / f"{case['name']}-{'sharded' if sharded else 'whole'}"
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=path)
    model, optimizer = resume(case, sharded, path)
    rest = train(model, optimizer, data, case["resume_at"], case["steps"], world, bf16)
    result["resumed"] = snapshot(model, optimizer, first + rest)

    if case.get("resume_from"):  # another number of processes wrote it
        model, optimizer = resume(case, sharded, out / f"{case['name']}-{case['resume_from']}")
        rest = train(model, optimizer, data, case["resume_at"], case["steps"], world, bf16)
        result["crossed"] = snapshot(model, optimizer, first + rest)
    torch.save(result, out / f"{case['name']}-{'sharded' if sharded else 'whole'}-rank{rank}.pt")


def refusals(rank: int) -> None:
    """The combinations MetaGrad refuses under FSDP2, with their messages."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mg.quantize_(model, CONFIG)
    shard_model(model)
    messages = {}
    try:
        mg.MetaGrad(model, lr=0.1, comm_bits=8)
    except ValueError as err:
        messages["comm_bits"] = str(err)
    partial = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mg.quantize_(partial, CONFIG)
    from torch.distributed.fsdp import fully_shard

    fully_shard(partial[0])
    try:
        mg.MetaGrad(partial, lr=0.1)
    except ValueError as err:
        messages["partial"] = str(err)
    torch.save(messages, Path(sys.argv[1]) / f"refusals-rank{rank}.pt")


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    try:
        for case in cases:
            run(case, out, rank, world)
        if world > 1:
            refusals(rank)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
