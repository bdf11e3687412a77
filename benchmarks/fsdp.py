"""Sharded (FSDP2) against replicated (DDP) training of the character GPT: memory and step time.

    python -m benchmarks.fsdp            # -> benchmarks/results/fsdp-cpu.json
    python -m benchmarks.fsdp --quick    # few steps (a smoke run)

Each setting is ``metagrad train --model gpt_char`` (Adam, global batch 64 windows of the
built-in corpus, float32, one thread per process, the default INT4 stochastic gradients) run by
``torchrun --nproc_per_node 2`` on the CPU (gloo): ``--shard ddp`` and ``--shard fsdp``, plain
and with ``--method metagrad``, in turns (``--repeats``). Each rank records its peak resident
memory (``VmHWM``, as ``summary.json``'s ``peak_memory_mb``), the bytes of its parameters,
gradients and optimizer state (the local shards under FSDP), and its median step time with the
first ``--warmup`` steps left out. Writes ``benchmarks/results/fsdp-cpu.json`` and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line
from metagrad.parallel import distributed
from metagrad.training.records import cpu_model, peak_memory_mb

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS: dict[str, dict[str, str]] = {
    "ddp": {"shard": "ddp", "method": "plain"},
    "fsdp": {"shard": "fsdp", "method": "plain"},
    "ddp metagrad": {"shard": "ddp", "method": "metagrad"},
    "fsdp metagrad": {"shard": "fsdp", "method": "metagrad"},
}
"""The settings compared, by name: each ``--shard``, plain and with MetaGrad."""
BASE: dict[str, Any] = {
    "model": "gpt_char",
    "width": 1.0,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 0.0,
    "grad_bits": 4,
    "amp": "off",
    "compile": "off",
    "threads": 1,
    "device": "cpu",
    "epochs": 1,
    "progress": False,
}


def _state_mb(trainer: Any) -> float:
    """MiB of this rank's parameters, gradients and optimizer state (local shards)."""
    from metagrad.training.sharded import local_tensors

    tensors = [*trainer.model.parameters()]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    tensors += [
        v for state in trainer.optimizer.state.values() for v in state.values() if v is not None
    ]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in local_tensors(tensors)) / 2**20


def worker(out: Path, settings: dict[str, Any]) -> None:
    """One rank (under torchrun): train ``settings``, write ``out/rank<R>.json``."""
    from metagrad.training.config import build_config
    from metagrad.training.trainer import Trainer

    trainer = Trainer(build_config({**settings, "out": str(out / "run")}))
    trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "step_seconds": trainer.step_seconds,
        "peak_memory_mb": peak_memory_mb(trainer.device)[0],
        "state_mb": _state_mb(trainer),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    del trainer  # the sharded model goes before the process group
    distributed.shutdown()


def run_setting(name: str, steps: int, width: float, nproc: int) -> list[dict[str, Any]]:
    """Launch one run of setting ``name`` for ``steps`` steps; each rank's record."""
    settings = {**BASE, **SETTINGS[name], "width": width, "max_steps": steps}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={nproc}", "-m", "benchmarks.fsdp"]
        cmd += ["--worker", tmp, json.dumps(settings)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def summarize(records: list[list[dict[str, Any]]], warmup: int) -> dict[str, Any]:
    """Per rank over the repeats: median step time (warm-up left out), peak memory, state."""
    ranks = []
    for rank in range(len(records[0])):
        steps = [s for rep in records for s in rep[rank]["step_seconds"][warmup:]]
        ranks.append(
            {
                "rank": rank,
                "median_step_seconds": round(statistics.median(steps), 5),
                "steps_timed": len(steps),
                "peak_memory_mb": round(max(rep[rank]["peak_memory_mb"] for rep in records), 1),
                "state_mb": round(records[0][rank]["state_mb"], 3),
            }
        )
    return {"ranks": ranks}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| setting | rank | median step (s) | peak RSS (MiB) | params+grads+optimizer (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, setting in result["settings"].items():
        for r in setting["ranks"]:
            lines.append(
                f"| {name} | {r['rank']} | {r['median_step_seconds']:.4f} | "
                f"{r['peak_memory_mb']:.1f} | {r['state_mb']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "SETTINGS"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat")
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, in turns")
    parser.add_argument("--width", type=float, default=BASE["width"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp-cpu.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), json.loads(args.worker[1]))
        return None
    steps, warmup, repeats = (6, 2, 1) if args.quick else (args.steps, args.warmup, args.repeats)
    if steps <= warmup:
        raise SystemExit(f"--steps ({steps}) must exceed --warmup ({warmup})")
    records: dict[str, list] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name in SETTINGS:
            records[name].append(run_setting(name, steps, args.width, args.nproc))
            print(f"{name}: done", flush=True)
    result = {
        "benchmark": "fsdp",
        "command": command_line(),
        "machine": {"torch": torch.__version__, "device": "cpu", "device_name": cpu_model()},
        "train": {**BASE, "width": args.width, "max_steps": steps},
        "processes": args.nproc,
        "warmup_steps": warmup,
        "repeats": repeats,
        "memory_kind": "process_max_rss",
        "settings": {name: summarize(records[name], warmup) for name in SETTINGS},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
