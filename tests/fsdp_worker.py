"""Launched by ``torchrun`` in tests/test_fsdp.py: train each case, then save this rank's results.

Usage: ``torchrun ... tests/fsdp_worker.py OUT_DIR CASES_JSON``. A case is a dict:

- ``name``; ``mode``: ``"fsdp"`` (``quantize_`` then ``shard_model``), ``"ddp"``
  (``DistributedDataParallel``) or ``"single"`` (one process, the whole batch; run by one rank
  only, without collectives);
- ``model``: ``"mlp"`` (three ``nn.Linear``) or ``"gpt"`` (``gpt_char`` at width 0.25);
- ``config``: ``{"preset": NAME}`` or ``QuantConfig.from_specs`` keywords, and ``backend``;
- optional ``steps``, ``seed`` (each rank's dither: ``seed + rank``), ``autocast`` (bf16),
  ``mp`` (``[param_dtype, reduce_dtype]`` names for FSDP's ``MixedPrecisionPolicy``),
  ``compile``: ``"model"`` (``torch.compile`` of the sharded or wrapped model) or ``"units"``
  (``unit.compile()`` of each FSDP unit), with ``compiler`` as its backend (default ``"inductor"``).

Saves ``OUT_DIR/rank{RANK}.pt``: case name -> losses (averaged over the ranks), full weights
(gathered from the shards), the conversion report read before sharding, and what sharding did.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import metagrad as mg
from metagrad.nn.restore import is_converted
from metagrad.parallel.fsdp import default_units, is_sharded, shard_group, shard_model

BATCH = {"mlp": 8, "gpt": 4}
"""The whole batch of a step; each of the ranks takes an equal slice."""
FEATURES, CLASSES, VOCAB, LENGTH = 16, 8, 32, 16
LR, MOMENTUM, STEPS = 0.05, 0.9, 3


def build_model(kind: str) -> nn.Module:
    """The same initial weights on every rank and in every mode."""
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES)
        )
    return mg.create_model("gpt_char", width=0.25, num_classes=VOCAB, in_channels=VOCAB)


def build_config(settings: dict[str, Any]) -> mg.QuantConfig:
    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is None:
        return mg.QuantConfig.from_specs(**settings)
    return mg.preset_config(preset, mg.QuantConfig(**settings))


def batch(kind: str, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch, the slice of ``rank`` out of ``world`` (world 1: all of it)."""
    g = torch.Generator().manual_seed(1000 + step)
    size = BATCH[kind]
    if kind == "mlp":
        inputs = torch.randn(size, FEATURES, generator=g)
        target = torch.randint(0, CLASSES, (size,), generator=g)
    else:
        ids = torch.randint(0, VOCAB, (size, LENGTH + 1), generator=g)
        inputs, target = ids[:, :-1], ids[:, 1:]
    part = slice(rank * size // world, (rank + 1) * size // world)
    return inputs[part], target[part]


def _policy(names: list[str | None] | None) -> MixedPrecisionPolicy | None:
    if names is None:
        return None
    dtypes = [None if n is None else getattr(torch, n) for n in names]
    return MixedPrecisionPolicy(param_dtype=dtypes[0], reduce_dtype=dtypes[1])


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def train(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    mode, kind = case["mode"], case["model"]
    model = build_model(kind)
    report = mg.quantize_(model, build_config(case["config"]))
    result: dict[str, Any] = {"report": report.to_dict()}
    run: nn.Module = model
    if mode == "fsdp":
        shard_model(model, mp_policy=_policy(case.get("mp")))
        group = shard_group(model)
        result["sharded"] = is_sharded(model)
        result["group_size"] = None if group is None else dist.get_world_size(group)
        result["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
        result["numel"] = sum(p.numel() for p in model.parameters())
        result["still_quantized"] = all(
            is_converted(model.get_submodule(name)) for name in report.converted
        )
        first = model.get_submodule(next(iter(report.converted)))
        first.register_forward_pre_hook(
            lambda module, args: result.update(forward_dtype=str(next(module.parameters()).dtype))
        )
    elif mode == "ddp":
        run = DistributedDataParallel(model)
    compiled = case.get("compile")
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        compiler = case.get("compiler", "inductor")
        if compiled == "units":  # each FSDP unit compiled in place, after sharding
            for unit in default_units(model):
                unit.compile(backend=compiler)
        else:
            run = torch.compile(run, backend=compiler)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ranks = 1 if mode == "single" else world
    me = 0 if mode == "single" else rank
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if case.get("autocast")
        else contextlib.nullcontext()
    )
    torch.manual_seed(case.get("seed", 1) + me)  # this rank's dither, the same in every mode
    losses = []
    for step in range(case.get("steps", STEPS)):
        inputs, target = batch(kind, step, me, ranks)
        with autocast:
            out = run(inputs)
        loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if ranks > 1:
            dist.all_reduce(mean)
            mean /= ranks
        losses.append(mean.item())
    result["losses"] = losses
    if compiled:
        result["graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
    result["weights"] = {name: _full(p) for name, p in model.named_parameters()}
    return result


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for index, case in enumerate(cases):
        if case["mode"] == "single" and index % world != rank:
            continue  # one rank runs each single-process reference
        start = time.perf_counter()
        try:
            results[case["name"]] = train(case, rank, world)
            results[case["name"]]["seconds"] = time.perf_counter() - start
        except Exception as err:  # the test reports it
            results[case["name"]] = {"error": "".join(traceback.format_exception(err))}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # a rank that has finished waits for the one still running a reference
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
