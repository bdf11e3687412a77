"""Training runs whose trainer is a subclass of ``metagrad train``'s, each in a worker process.

A benchmark that changes what a training step does (an oracle, a control method) subclasses
:class:`~metagrad.training.trainer.Trainer` and names the class in its jobs; :func:`fit_all`
trains each job in its own process (``parallel`` at a time, started fresh with ``spawn``), and
finishes a job whose run stopped (from its checkpoint) or reads one that ended. A run that
diverged is recorded as such, as the launcher of ``metagrad train`` runs does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks.runner import read_record
from metagrad.training.config import build_config
from metagrad.training.run_files import CHECKPOINT, is_diverged, is_finished, read_summary
from metagrad.training.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: its name, ``metagrad train`` settings (``out`` included), the trainer class and
    keyword options for it."""

    name: str
    settings: dict[str, Any]
    trainer: type[Trainer] = Trainer
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def fit(job: Job) -> dict[str, Any]:
    """Train or finish ``job`` in this process; its benchmark record (``runner.read_record``)."""
    cfg = build_config(job.settings)
    out = Path(cfg.out)
    summary = read_summary(out)
    if not (is_finished(summary, cfg.epochs) or is_diverged(summary)):
        if (out / CHECKPOINT).exists():
            cfg = dataclasses.replace(cfg, resume=True)
        with contextlib.suppress(FloatingPointError):  # diverged: the summary says where
            job.trainer(cfg, **job.options).fit()
    return read_record(job.name, out)


def fit_all(
    jobs: list[Job],
    parallel: int = 1,
    on_record: Callable[[Job, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each job's record by name, ``parallel`` jobs at a time; ``on_record(job, record)`` as each
    job ends. A job that raised re-raises here, after the others."""
    records: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, parallel), mp_context=context) as pool:
        futures = {pool.submit(fit, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                records[job.name] = future.result()
            except Exception as err:  # reported after the others finish
                errors.append(err)
                print(f"  {job.name}: failed ({type(err).__name__}: {err})", flush=True)
                continue
            print(f"  {job.name}: done", flush=True)
            if on_record is not None:
                on_record(job, records[job.name])
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed; the first: {errors[0]}") from errors[0]
    return records
