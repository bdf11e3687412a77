"""The published gradient quantizers side by side, plain and with MetaGrad.

    python -m benchmarks.methods --data ../shared/data/cifar10-jpeg.zip     # vgg16, width 0.25
    python -m benchmarks.methods --task gpt          # the character GPT, bits per character
    python -m benchmarks.methods --recipes psq bhq luq rht-mxfp4 rht-nvfp4 fp8-e5m2  # + recipes
    python -m benchmarks.methods --task gpt --seeds 0 1 2 3 4 5 6 7 --presets plain rht-nvfp4 \
        fp8-e5m2 --metagrad plain rht-nvfp4 fp8-e5m2 --hyper-lr 3e-4   # MetaGrad, 8 seeds

Trains full-precision gradients and every preset of :mod:`metagrad.quant.presets` (4 bits; FP8 for
``fp8-e5m2``) on each seed, the papers' whole recipes of the presets given to ``--recipes``
(``recipe+NAME``: :mod:`metagrad.quant.recipes`, paired with the gradient-only ``NAME`` by
seed), then MetaGrad on the two presets with the best mean result, each run
in its own process (resumable: start the command again to finish). Every run records, every
``--diag-every`` steps, the cosine similarity and relative error of the weight gradient that
updates the weights against the full-precision gradient of the same batch. Finally it times the
training steps of every setting side by side, interleaved on the same batches, relative to the
``plain`` preset's step (``--timing-width 1.0``: also at the paper's full width). Writes
``benchmarks/results/methods.json`` (``methods-gpt.json`` for the GPT; ``--output``) after every
run, and prints the table that docs/results.md shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import command_line, time_steps, train_runs
from metagrad.quant.presets import list_presets
from metagrad.quant.recipes import list_recipes
from metagrad.training.config import TrainConfig, build_config
from metagrad.training.records import gradient_record
from metagrad.training.tasks import task_for_model

PRESETS = ["plain", "psq", "bhq", "luq", "rht-mxfp4", "rht-nvfp4", "fp8-e5m2"]
BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "epochs": 6,
    "batch_size": 128,
    "lr": 0.1,
    "amp": "bf16",  # what users run on this CPU (AMX) and on GPUs
}
GPT_BASE: dict[str, Any] = {
    "model": "gpt_char",
    "data": "pydoc",  # Python's own documentation, shipped with CPython: no download
    "epochs": 7,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 0.0,
    "amp": "bf16",
}


@dataclass(frozen=True)
class Task:
    """What a benchmark trains and how its result reads."""

    base: dict[str, Any]
    metric: str  # the summary's key of the final result
    label: str
    higher_is_better: bool
    output: str
    runs_dir: str


TASKS = {
    "vgg16": Task(
        BASE, "final_test_acc", "test acc", True, "benchmarks/results/methods.json", "runs/methods"
    ),
    "gpt": Task(
        GPT_BASE,
        "final_test_bpc",
        "test bits/char",
        False,
        "benchmarks/results/methods-gpt.json",
        "runs/methods-gpt",
    ),
}
METAGRAD: dict[str, Any] = {"method": "metagrad", "hyper": "grad+weight", "hyper_hidden": 8}


def settings_of(method: str) -> dict[str, Any]:
    """``metagrad train`` settings of a method name: fp32, a preset, metagrad+<preset> or
    recipe+<preset> (the preset's paper's whole recipe)."""
    if method == "fp32":
        return {"grad_bits": 32}
    if method.startswith("recipe+"):
        return {"grad_quant": method.removeprefix("recipe+"), "recipe": True}
    if method.startswith("metagrad+"):
        return {**METAGRAD, "grad_quant": method.removeprefix("metagrad+")}
    return {"grad_quant": method}


OLD_LABELS = ("method", "bits", "rounding", "granularity")
"""What records of earlier versions said ran (from ``grad_bits`` alone: presets read as fp32)."""


def relabel(path: Path) -> None:
    """Rewrite what each record of the results file ``path`` says ran, from the settings of its
    method name and of the file (:func:`~metagrad.training.records.gradient_record`)."""
    results = json.loads(path.read_text())
    for record in results["runs"]:
        settings = {**results["settings"], **settings_of(record["method_name"])}
        settings = {k: v for k, v in settings.items() if k in TrainConfig.defaults()}
        described = gradient_record(build_config({**settings, "seed": record["seed"]}))
        kept = {k: v for k, v in record.items() if k not in OLD_LABELS and k not in described}
        record.clear()
        record.update(run=kept.pop("run"), **described, **kept)
    path.write_text(json.dumps(results, indent=2) + "\n")


def gradient_fidelity(run_dir: Path) -> dict[str, float | None]:
    """Median over diagnosed steps of the layer-mean cosine and relative error of the used
    weight gradient against full precision (None without diagnostics)."""
    path = run_dir / "gradients.jsonl"
    if not path.is_file():
        return {"grad_cosine": None, "grad_rel_error": None}
    cos, err = [], []
    for line in path.read_text().splitlines():
        layers = json.loads(line)["layers"].values()
        cos.append(statistics.fmean(layer["used"]["cosine"] for layer in layers))
        err.append(statistics.fmean(layer["used"]["rel_error"] for layer in layers))
    return {"grad_cosine": statistics.median(cos), "grad_rel_error": statistics.median(err)}


def aggregate(
    records: list[dict[str, Any]], methods: list[str], metric: str
) -> dict[str, dict[str, Any]]:
    """Per method: the final result over seeds (mean, spread), gap to fp32, gradient fidelity."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        runs = [r for r in records if r["method_name"] == method]
        values = [r[metric] for r in runs if r.get(metric) is not None]
        if not runs:
            continue
        out[method] = {
            "seeds": [r["seed"] for r in runs],
            "values": values,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "diverged": sum(r["diverged_at_step"] is not None for r in runs),
            "grad_cosine": _mean(r["grad_cosine"] for r in runs),
            "grad_rel_error": _mean(r["grad_rel_error"] for r in runs),
        }
    reference = out.get("fp32", {}).get("mean")
    for row in out.values():
        gap = None if reference is None or row["mean"] is None else row["mean"] - reference
        row["gap_to_fp32"] = gap
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def best_presets(table: dict[str, dict[str, Any]], task: Task, count: int = 2) -> list[str]:
    """The ``count`` presets with the best mean final result."""
    scored = [(row["mean"], m) for m, row in table.items() if m in PRESETS and row["mean"]]
    return [m for _, m in sorted(scored, reverse=task.higher_is_better)[:count]]


def print_table(table: dict[str, dict[str, Any]], timing: dict[str, float], task: Task) -> None:
    print(f"\n{'method':<22} {task.label:>15} {'vs fp32':>8} {'cos':>6} {'rel err':>8} {'step':>6}")
    for method, row in table.items():
        value = f"{row['mean']:.3f} ± {row['std']:.3f}" if row["mean"] else "diverged"
        gap = f"{row['gap_to_fp32']:+.3f}" if row["gap_to_fp32"] is not None else "-"
        cos = f"{row['grad_cosine']:.3f}" if row["grad_cosine"] is not None else "-"
        err = f"{row['grad_rel_error']:.3f}" if row["grad_rel_error"] is not None else "-"
        step = f"{timing[method]:.2f}x" if method in timing else "-"
        print(f"{method:<22} {value:>15} {gap:>8} {cos:>6} {err:>8} {step:>6}")


def _dataset(base: dict[str, Any], data: str) -> Any:
    """The data the runs train on, loaded as ``metagrad train`` loads it."""
    cfg = build_config({**base, "data": data, "out": "unused"})
    return task_for_model(cfg.model).load_data(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="vgg16")
    parser.add_argument("--data", help="default: ../shared/data/cifar10-jpeg.zip; gpt: pydoc")
    parser.add_argument("--runs-dir", help="default: runs/methods (runs/methods-gpt)")
    parser.add_argument("--output", help="default: benchmarks/results/methods(-gpt).json")
    parser.add_argument("--epochs", type=int, help="default: 6 (gpt: 7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=list_presets())
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=[],
        choices=list_recipes(),
        help="presets whose paper's whole recipe also runs (recipe+NAME rows)",
    )
    parser.add_argument(
        "--metagrad", nargs="*", help="presets to run MetaGrad on (default: best 2)"
    )
    parser.add_argument(
        "--hyper-lr", type=float, help="MetaGrad's hypernetwork lr (default: metagrad train's)"
    )
    parser.add_argument("--diag-every", type=int, default=100)
    parser.add_argument("--timing-steps", type=int, default=20, help="0: no step timing")
    parser.add_argument(
        "--timing-width",
        type=float,
        help="also time every step at this model width (1.0: the paper's VGG-16)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each run early (smoke)")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    parser.add_argument("--skip", nargs="*", default=[], help="runs not to train (METHOD-sSEED)")
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="train nothing: rewrite what each record of --output says ran (method, preset, "
        "specs) from its settings",
    )
    args = parser.parse_args()
    task = TASKS[args.task]
    args.data = args.data or task.base.get("data", "../shared/data/cifar10-jpeg.zip")
    args.runs_dir = args.runs_dir or task.runs_dir
    args.output = args.output or task.output
    if args.relabel:
        relabel(Path(args.output))
        return
    base = {k: v for k, v in task.base.items() if k != "data"}
    base.update(threads=args.threads, diag_every=args.diag_every)
    if args.epochs:
        base["epochs"] = args.epochs
    if args.max_steps:
        base["max_steps"] = args.max_steps
    records: list[dict[str, Any]] = []
    methods = ["fp32", *args.presets, *[f"recipe+{name}" for name in args.recipes]]

    def write(chosen: list[str], timing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rewrite the results file with every run finished so far."""
        table = aggregate(records, methods, task.metric)
        result = {
            "benchmark": "methods",
            "task": args.task,
            "metric": task.label,
            "command": command_line(),
            "settings": base,
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
            "metagrad_on": chosen,
            "methods": table,
            **(timing or {}),
            "runs": sorted(records, key=lambda r: (r["seed"], methods.index(r["method_name"]))),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return table

    method_of: dict[str, str] = {}  # run name -> method

    def add(name: str, record: dict[str, Any]) -> None:
        record.update(method_name=method_of[name], **gradient_fidelity(Path(args.runs_dir) / name))
        records.append(record)
        write(chosen)

    def run(names: list[str]) -> None:
        jobs = []
        for seed in args.seeds:
            for method in names:
                name = f"{method}-s{seed}"
                if name not in args.skip:
                    method_of[name] = method
                    settings = {**base, **settings_of(method), "seed": seed}
                    if args.hyper_lr is not None and method.startswith("metagrad+"):
                        settings["hyper_lr"] = args.hyper_lr
                    jobs.append((name, settings))
        runs_dir = Path(args.runs_dir)
        train_runs(jobs, args.data, runs_dir, parallel=max(1, args.parallel), on_record=add)

    chosen: list[str] = list(args.metagrad or [])
    if args.metagrad is None:  # MetaGrad on the best two presets, once they are known
        run(methods)
        chosen = best_presets(aggregate(records, methods, task.metric), task)
        methods += [f"metagrad+{preset}" for preset in chosen]
        run(methods[-len(chosen) :])
    else:
        methods += [f"metagrad+{preset}" for preset in chosen]
        run(methods)
    table = write(chosen)
    timing: dict[str, float] = {}
    if args.timing_steps:
        print("== side-by-side step timing", flush=True)
        skip = ("epochs", "diag_every", "max_steps")
        timing_base = {k: v for k, v in base.items() if k not in skip}
        medians = time_steps(
            {m: settings_of(m) for m in methods},
            _dataset(base, args.data),
            {**timing_base, "data": args.data},
            steps=args.timing_steps,
        )
        reference = medians["plain"] if "plain" in medians else medians["fp32"]
        timing = {m: t / reference for m, t in medians.items()}
        extra: dict[str, Any] = {"step_seconds": medians, "step_time_vs_plain": timing}
        if args.timing_width:
            print(f"== side-by-side step timing at width {args.timing_width}", flush=True)
            wide = time_steps(
                {m: settings_of(m) for m in methods},
                _dataset(base, args.data),
                {**timing_base, "width": args.timing_width, "data": args.data},
                steps=args.timing_steps,
            )
            reference = wide["plain"] if "plain" in wide else wide["fp32"]
            extra["timing_width"] = args.timing_width
            extra["step_seconds_at_width"] = wide
            extra["step_time_vs_plain_at_width"] = {m: t / reference for m, t in wide.items()}
        table = write(chosen, extra)
    print_table(table, timing, task)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
