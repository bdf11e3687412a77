"""Training with quantized gradient communication: vgg16 width 0.25, 4 epochs, 2 processes.

    python -m benchmarks.comm_training --data ../shared/data/cifar10-jpeg.zip

Each setting is a ``torchrun --nproc_per_node 2 -m metagrad train`` run (gloo, one thread per
process, global batch 128) that differs only in ``--comm-bits``: 32 (DDP's float32 all-reduce),
16 (PyTorch's ``bf16_compress_hook``), 8 and 4
(:func:`~metagrad.parallel.comm.quantized_hook`). Gradients are computed in full precision, so
the communication is the only difference. Seeds 0, 1, 2.
Writes ``benchmarks/results/comm-training.json`` (after every run; finished runs are skipped and
stopped ones resumed when started again, by :mod:`metagrad.training.launcher`) and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line
from metagrad.training.launcher import Launch, launch_runs
from metagrad.training.run_files import METRICS, read_summary

SETTINGS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}
BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "epochs": 4,
    "batch_size": 128,
    "lr": 0.1,
    "threads": 1,
    "compile": "off",
    "device": "cpu",
}


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per setting, bytes per step, their ratio to fp32, accuracy over seeds."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_setting.setdefault(r["setting"], []).append(r)
    fp32 = {r["seed"]: r["final_test_acc"] for r in by_setting.get("fp32", [])}
    fp32_bytes = by_setting["fp32"][0]["bytes_per_step"] if "fp32" in by_setting else None
    lines = [
        "| comm | bytes per step per rank | fp32 bytes / bytes | final test acc (%) | "
        "minus fp32 comm, paired by seed |",
        "|---|---:|---:|---|---|",
    ]
    for name, rs in by_setting.items():
        accs = [r["final_test_acc"] for r in rs]
        diffs = [r["final_test_acc"] - fp32[r["seed"]] for r in rs if r["seed"] in fp32]
        ratio = f"{fp32_bytes / rs[0]['bytes_per_step']:.2f}" if fp32_bytes else ""
        lines.append(
            f"| {name} | {rs[0]['bytes_per_step']:,.0f} ({rs[0]['bytes_how']}) | {ratio} | "
            f"{_mean_sd(accs)} | {_mean_sd(diffs) if name != 'fp32' else ''} |"
        )
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default="runs/comm-training")
    parser.add_argument("--output", default="benchmarks/results/comm-training.json")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="settings to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=BASE["epochs"])
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    args = parser.parse_args()

    output = Path(args.output)
    done = json.loads(output.read_text())["runs"] if output.is_file() else []
    runs_dir = Path(args.runs_dir)
    planned: dict[str, tuple[str, int, int]] = {}  # run name -> (setting, seed, comm bits)
    launches = []
    for seed in args.seeds:
        for name, bits in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            settings = {**BASE, "epochs": args.epochs, "seed": seed, "comm_bits": bits}
            planned[f"{name}-seed{seed}"] = (name, seed, bits)
            launches.append(Launch(f"{name}-seed{seed}", settings, runs_dir / f"{name}-seed{seed}"))

    def add(launch: Launch) -> None:
        """Record the run's result and rewrite the results file."""
        nonlocal done
        name, seed, bits = planned[launch.name]
        summary = read_summary(launch.out)
        assert summary is not None  # a run with a result has a summary
        record = {
            "setting": name,
            "seed": seed,
            "comm_bits": bits,
            "final_test_acc": summary["final_test_acc"],
            "test_acc_per_epoch": None,
            "bytes_per_step": summary["communication"]["bytes_per_step"],
            "bytes_how": summary["communication"]["bytes_how"],
            "mean_step_seconds": summary["mean_step_seconds"],
            "epochs": summary["epochs_completed"],
            "commit": summary["provenance"]["commit"],
        }
        metrics = launch.out / METRICS
        record["test_acc_per_epoch"] = [
            json.loads(line)["test_acc"] for line in metrics.read_text().splitlines()
        ]
        done = [r for r in done if (r["setting"], r["seed"]) != (name, seed)] + [record]
        result = {
            "benchmark": "comm-training",
            "command": command_line(),
            "settings": {**BASE, "epochs": args.epochs, "processes": args.nproc},
            "torch": torch.__version__,
            "runs": sorted(done, key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"])),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")

    status = launch_runs(
        launches, args.data, nproc=args.nproc, log=False, label="comm-training", on_result=add
    )
    failed = sorted(name for name, code in status.items() if code != 0)
    if failed:
        raise SystemExit(f"metagrad train failed for {', '.join(failed)}")
    print(table(json.loads(output.read_text())["runs"]))


if __name__ == "__main__":
    main()
