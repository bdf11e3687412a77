"""What the training benchmarks share: running ``metagrad train`` per setting, and step timing.

Each training run is its own process (so peak memory is per run), launched by
:mod:`metagrad.training.launcher`, and resumes from its checkpoint if the benchmark is started
again. Step timing interleaves the settings (one step of each in turn, on the same batches), which
keeps the ratios robust to the machine's background load.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metagrad import kernels
from metagrad.backward.int8.routes import set_routes
from metagrad.data import BatchLoader, ImageDataset
from metagrad.data.corpus import CharCorpus, load_char_corpus
from metagrad.machine import retain_freed_cpu_memory
from metagrad.models import model_task
from metagrad.training.config import TrainConfig, build_config
from metagrad.training.launcher import Launch, launch_runs
from metagrad.training.records import gradient_record
from metagrad.training.run_files import METRICS, SUMMARY, read_summary
from metagrad.training.setup import (
    attention_kernel,
    build_model,
    build_optimizer,
    resolve_amp,
    resolve_device,
)
from metagrad.training.tasks import task_for_model

PROBE_STEPS = 3
MAX_EXTRA_WARMUP = 5
"""Warm-up steps a setting may take beyond the asked ones while its steps still compile."""


def command_line() -> str:
    """The command that started this process, as run from the repository root:
    ``python -m benchmarks.NAME ARGS`` for a benchmark module."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join(["python", *program, *sys.argv[1:]])


def train_runs(
    runs: list[tuple[str, dict[str, Any]]],
    data: str,
    runs_dir: Path,
    *,
    parallel: int = 1,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train (or finish) each of ``runs`` (name, ``metagrad train`` settings) in its own process
    under ``runs_dir/<name>``, ``parallel`` at a time (:mod:`metagrad.training.launcher`); their
    benchmark records by name.

    A finished run is read, not trained again; a run that diverged (non-finite loss) is recorded
    as such, and not started again. ``on_record(name, record)`` is called as each record is read.
    Raises RuntimeError, once the others are done, if a run failed.
    """
    records: dict[str, dict[str, Any]] = {}

    def read(launch: Launch) -> None:
        records[launch.name] = read_record(launch.name, launch.out)
        if on_record is not None:
            on_record(launch.name, records[launch.name])

    launches = [Launch(name, settings, runs_dir / name) for name, settings in runs]
    status = launch_runs(
        launches, data, parallel=parallel, log=False, label=runs_dir.name, on_result=read
    )
    failed = sorted(name for name, code in status.items() if code != 0)
    if failed:
        raise RuntimeError(f"metagrad train failed for {', '.join(failed)}")
    return records


def read_record(name: str, out: Path) -> dict[str, Any]:
    """The benchmark record of the run in ``out`` (from its summary and metrics)."""
    summary = read_summary(out)
    if summary is None:
        raise RuntimeError(f"{name}: no {SUMMARY} in {out}")
    metrics = out / METRICS  # absent if the run diverged in its first epoch
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return run_record(name, summary, [json.loads(line) for line in lines])


Extend = Callable[[str, dict[str, Any], Path], dict[str, Any]]
"""``(run name, record, run directory) -> record``: what a benchmark adds to a run's record."""


def training_benchmark(
    benchmark: str,
    description: str,
    runs: list[tuple[str, dict[str, Any]]],
    base: dict[str, Any],
    extend: Extend | None = None,
) -> None:
    """The command line of a resumable training benchmark: each of ``runs`` (name, settings on
    top of ``base``) is trained or finished by :func:`train_runs` (``--parallel`` at a time), and
    ``benchmarks/results/<benchmark>.json`` is rewritten after every run with all finished so far
    (records from earlier invocations kept)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default=f"runs/{benchmark}")
    parser.add_argument("--output", default=f"benchmarks/results/{benchmark}.json")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    args = parser.parse_args()
    base = {**base, "threads": args.threads}

    output = Path(args.output)
    done: dict[str, dict[str, Any]] = {}
    if output.is_file():
        done = {r["run"]: r for r in json.loads(output.read_text())["runs"]}

    def write(name: str, record: dict[str, Any]) -> None:
        done[name] = extend(name, record, Path(args.runs_dir) / name) if extend else record
        result = {
            "benchmark": benchmark,
            "command": command_line(),
            "settings": base,
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "runs": [done[n] for n, _ in runs if n in done],
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        acc, bpc = done[name]["final_test_acc"], done[name].get("final_test_bpc")
        reached = f"final test acc {acc:.2f}%" if acc is not None else "diverged"
        if bpc is not None:
            reached = f"final test bpc {bpc:.3f}"
        print(f"   {name}: {reached}")

    todo = [(n, {**base, **s}) for n, s in runs if not args.only or n in args.only]
    train_runs(
        todo, args.data, Path(args.runs_dir), parallel=max(1, args.parallel), on_record=write
    )
    print(f"wrote {output}")


def saved_train_config(saved: dict[str, Any]) -> TrainConfig:
    """The settings a summary recorded, as a ``TrainConfig`` (keys of other versions ignored)."""
    known = TrainConfig.defaults()
    return build_config({k: v for k, v in saved.items() if k in known and k != "resume"})


def run_record(name: str, summary: dict[str, Any], history: list[dict[str, Any]]) -> dict:
    """One line of a results file: the setting and what it reached."""
    cfg = summary["config"]
    record = {
        "run": name,
        **gradient_record(saved_train_config(cfg)),
        "seed": cfg["seed"],
        "epochs": summary["epochs_completed"],
        "steps": summary["steps"],
        "final_test_acc": summary["final_test_acc"],
        "diverged_at_step": summary.get("diverged_at_step"),
        "best_test_acc": summary["best_test_acc"],
        "mean_step_seconds": summary["mean_step_seconds"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "test_acc_per_epoch": [r["test_acc"] for r in history if "test_acc" in r],
    }
    if summary.get("task", "image") != "image":  # a language model: bits per character
        record["task"] = summary["task"]
        record["final_test_bpc"] = summary["final_test_bpc"]
        record["best_test_bpc"] = summary["best_test_bpc"]
        record["test_bpc_per_epoch"] = [r["test_bpc"] for r in history]
    if cfg["method"] == "metagrad":
        record["hypernet"] = summary["hypernet"]
        record["hyper_share_of_step_time"] = summary["hyper_share_of_step_time"]
    return record


Step = Callable[[torch.Tensor, torch.Tensor], None]


def training_step(
    settings: dict[str, Any], data: ImageDataset | CharCorpus, *, fullgraph: bool = False
) -> Step:
    """One training step of ``settings`` (``metagrad train`` keys, plus ``tf32`` on CUDA), as
    ``metagrad train`` runs it: autocast as ``amp`` says, compiled kernels as ``compile`` says
    (``model``: ``torch.compile(model, fullgraph=fullgraph)``), the ``int8`` backend's routes as
    ``routes`` says (``auto``: fixed, so that timings are reproducible), freed CPU memory as
    ``cpu_memory`` says (for the whole process: settings interleaved in one process share it).

    Global switches (compiled kernels, TF32, routes) are set at every call, so steps of settings
    that differ in them can be interleaved in one process.
    """
    settings = dict(settings)
    tf32 = bool(settings.pop("tf32", False))
    cfg = build_config({**settings, "out": "unused"})
    device = resolve_device(cfg.device)
    if cfg.cpu_memory == "retain":
        retain_freed_cpu_memory()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, device)
    optimizer = build_optimizer(cfg, model)
    amp = resolve_amp(cfg.amp, device)
    compiled = cfg.compile in ("auto", "kernels", "model")
    forward = torch.compile(model, fullgraph=fullgraph) if cfg.compile == "model" else model
    task = task_for_model(cfg.model)
    routes = "fixed" if cfg.routes == "auto" else cfg.routes

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        kernels.set_compile(compiled, device)
        set_routes(routes)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with (
                attention_kernel(cfg.attention_kernel),
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=bool(amp)),
            ):
                out = forward(x)
            loss = task.loss(out, y)
            loss.backward()
            return loss

        optimizer.step(closure)

    return step


def synthetic_data(batch_size: int) -> ImageDataset:
    """Random CIFAR-shaped images (two batches), for memory probes."""
    n = batch_size * 2
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n) % 10
    half = (0.5, 0.5, 0.5)
    return ImageDataset(
        images, labels, images[:2], labels[:2], [str(i) for i in range(10)], half, half
    )


def probe_memory(settings: dict[str, Any]) -> dict[str, float]:
    """Tensor memory (MB) of ``PROBE_STEPS`` training steps of a fresh model in this process:
    ``peak`` (everything alive at the worst moment: weights, optimizer state, gradients,
    activations, temporaries) and ``growth`` (peak minus what was alive before the first step).

    CUDA: the allocator's statistics. CPU: the PyTorch profiler's memory timeline (every tensor
    allocation and free), which, unlike the resident set size, does not depend on the C
    allocator's caching. A twin runs first and is freed, so that compiling kernels is not
    counted.
    """
    device = resolve_device(settings.get("device", "auto"))
    data, (x, y) = _probe_batch(settings)
    x, y = x.to(device), y.to(device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    warm = training_step(settings, data)
    for _ in range(2):
        warm(x, y)
    del warm
    gc.collect()
    step = training_step(settings, data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(PROBE_STEPS):
            step(x, y)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(
            activities=activities, profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            for _ in range(PROBE_STEPS):
                step(x, y)
        with tempfile.TemporaryDirectory() as tmp:
            timeline = Path(tmp) / "memory.json"
            prof.export_memory_timeline(str(timeline), device="cpu")
            _, sizes = json.loads(timeline.read_text())
        totals = [sum(s) for s in sizes]
        before, peak = totals[0], max(totals)
    return {"peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}


def _probe_batch(settings: dict[str, Any]) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The data and one training batch for a memory probe: random CIFAR-shaped images for an
    image model, the first windows of the built-in corpus for a language model."""
    if model_task(settings.get("model", "vgg16")) == "image":
        data = synthetic_data(settings["batch_size"])
        x = (data.train_images[: settings["batch_size"]].float() / 255 - 0.5) / 0.5
        return data, (x, data.train_labels[: settings["batch_size"]])
    data = load_char_corpus()
    cfg = build_config({**settings, "out": "unused"})
    cpu = torch.device("cpu")
    model = build_model(cfg, data, cpu)
    loader = task_for_model(cfg.model).train_loader(cfg, data, model, cpu, (0, 1))
    return data, next(iter(loader.epoch(0)))


def step_memory(settings: dict[str, Any]) -> dict[str, float]:
    """:func:`probe_memory` of ``settings`` in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.runner", "--probe", json.dumps(settings)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compile_events() -> int:
    """A count that grows whenever dynamo, AOTAutograd or inductor compile in this process."""
    from torch._dynamo.utils import counters

    return sum(sum(counters[part].values()) for part in ("frames", "aot_autograd", "inductor"))


@dataclass
class StepTimes:
    """One setting's step timing: the median of the timed steps, and the warm-up apart."""

    seconds: float
    warmup_seconds: list[float] = field(default_factory=list)  # each warm-up step
    # warm-up steps that compiled, less as many median steps (with whatever else those steps did
    # first, such as the int8 backend's route measurements)
    compile_seconds: float = 0.0
    compiled_while_timed: int = 0  # timed steps that compiled nonetheless (0 expected)
    step_seconds: list[float] = field(default_factory=list)  # each timed step, round by round

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 5),
            "step_seconds": [round(t, 5) for t in self.step_seconds],
            "warmup_seconds": [round(t, 3) for t in self.warmup_seconds],
            "compile_seconds": round(self.compile_seconds, 3),
            "compiled_while_timed": self.compiled_while_timed,
        }


def time_steps_apart(
    settings: dict[str, dict[str, Any]],
    data: ImageDataset | CharCorpus,
    base: dict[str, Any],
    steps: int = 30,
    warmup: int = 3,
    errors: dict[str, str] | None = None,
) -> dict[str, StepTimes]:
    """:func:`time_steps` with the warm-up reported apart.

    After ``warmup`` interleaved warm-up steps, a setting whose last warm-up step still compiled
    (``torch.compile`` of the model, compiled kernels, a recompilation) takes more, up to
    :data:`MAX_EXTRA_WARMUP`, so that no compilation falls into the timed steps. With
    ``errors`` given, a setting that fails to build or to step is left out and its error
    recorded there (``"TypeError: ..."``) instead of raised.
    """
    batches = step_batches(data, base, warmup + steps)
    runs: dict[str, Step] = {}
    for name, overrides in settings.items():
        try:
            runs[name] = training_step({**base, **overrides}, data)
        except Exception as err:
            if errors is None:
                raise
            errors[name] = _error_line(err)

    def timed(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, bool] | None:
        before = compile_events()
        _sync(x.device)
        t0 = time.perf_counter()
        try:
            runs[name](x, y)
        except Exception as err:
            if errors is None:
                raise
            errors[name] = _error_line(err)
            traceback.print_exc()
            return None
        _sync(x.device)
        return time.perf_counter() - t0, compile_events() != before

    warm: dict[str, list[tuple[float, bool]]] = {name: [] for name in runs}
    times: dict[str, list[tuple[float, bool]]] = {name: [] for name in runs}

    def step_each(names: list[str], x: torch.Tensor, y: torch.Tensor, into: dict) -> None:
        for name in names:
            if name in runs and (t := timed(name, x, y)) is not None:
                into[name].append(t)
            else:
                runs.pop(name, None)

    for x, y in batches[:warmup]:
        step_each(list(runs), x, y, warm)
    for extra in range(MAX_EXTRA_WARMUP if warmup else 0):
        compiling = [name for name in runs if warm[name][-1][1]]
        if not compiling:
            break
        step_each(compiling, *batches[extra % warmup], warm)
    for x, y in batches[warmup:]:
        step_each(list(runs), x, y, times)
    result = {}
    for name in runs:
        ts = times[name]
        median = statistics.median(t for t, _ in ts)
        result[name] = StepTimes(
            median,
            [t for t, _ in warm[name]],
            sum(max(0.0, t - median) for t, compiled in warm[name] if compiled),
            sum(compiled for _, compiled in ts),
            [t for t, _ in ts],
        )
    return result


def _error_line(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def time_steps(
    settings: dict[str, dict[str, Any]],
    data: ImageDataset | CharCorpus,
    base: dict[str, Any],
    steps: int = 30,
    warmup: int = 3,
) -> dict[str, float]:
    """Median seconds per training step for each named setting (``base`` plus its overrides),
    after the warm-up (compilation included: :func:`time_steps_apart`).

    Image models take augmented CIFAR batches; language models random windows of ``data``.
    """
    timed = time_steps_apart(settings, data, base, steps, warmup)
    return {name: t.seconds for name, t in timed.items()}


def step_batches(
    data: ImageDataset | CharCorpus, base: dict[str, Any], count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches of ``base``'s model on ``data``, on its device:
    augmented CIFAR batches for image models, random windows of ``data`` for language models."""
    if model_task(base.get("model", "vgg16")) == "image":
        loader: Any = BatchLoader(
            data.train_images,
            data.train_labels,
            base["batch_size"],
            mean=data.mean,
            std=data.std,
            shuffle=True,
            augment=True,
            seed=0,
        )
    else:
        cfg = build_config({**{k: v for k, v in base.items() if k != "tf32"}, "out": "unused"})
        cpu = torch.device("cpu")
        model = build_model(cfg, data, cpu)
        loader = task_for_model(cfg.model).train_loader(cfg, data, model, cpu, (0, 1))
    device = resolve_device(base.get("device", "auto"))
    batches = zip(range(count), loader.epoch(0), strict=False)
    return [(x.to(device), y.to(device)) for _, (x, y) in batches]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    probe = argparse.ArgumentParser(description="print probe_memory(SETTINGS) (a fresh process)")
    probe.add_argument("--probe", required=True, metavar="SETTINGS_JSON")
    print(json.dumps(probe_memory(json.loads(probe.parse_args().probe))))
