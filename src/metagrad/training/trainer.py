"""The training loop behind ``metagrad train``: metrics, summary, atomic checkpoints, resume.

What is trained on (data, batches, loss, evaluation, metrics) comes from the model's task
(:mod:`metagrad.training.tasks`): image classification or character language modelling.
"""

from __future__ import annotations

import math
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from metagrad import kernels
from metagrad.backward import fallback_report
from metagrad.checkpoint import (
    CheckpointError,
    RunLock,
    check_writable_dir,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from metagrad.meta.diagnostics import gradient_report
from metagrad.models import CLASSIFIER_NAME, FIRST_CONV_NAME, create_model
from metagrad.nn.convert import quantize_
from metagrad.nn.layers import quantized_layers
from metagrad.parallel import distributed
from metagrad.training.config import HYPER_KEYS, RESUMABLE_KEYS, ConfigError, TrainConfig
from metagrad.training.tasks import (  # noqa: F401  (the image task's helpers, re-exported)
    CROP_PADDING,
    EVAL_BATCH,
    dataset_signature,
    evaluate,
    load_dataset,
    task_for_model,
)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
GRADIENTS = "gradients.jsonl"
SUMMARY = "summary.json"
OUTPUT_FILES = (CHECKPOINT, METRICS, GRADIENTS, SUMMARY)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (``auto``: bf16 on CUDA, off elsewhere)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_compile(name: str, device: torch.device) -> str:
    """What ``--compile`` does here: ``off``, ``kernels`` or ``model``; turns kernels on or off.

    ``auto`` means ``kernels`` where ``torch.compile`` works. Where it does not, an explicit
    request falls back to ``off`` with a warning.
    """
    if name == "auto":
        name = "kernels" if kernels.available(device)[0] else "off"
    if name == "off":
        kernels.set_compile(False)
        return name
    return name if kernels.set_compile(True, device) else "off"


def provenance(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides its settings: code version, torch, device, threads."""
    return {
        "commit": _git_commit(),
        "metagrad": _package_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        ),
        "threads": torch.get_num_threads(),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from (``+dirty`` if modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _package_version() -> str:
    from metagrad import __version__

    return __version__


def build_model(cfg: TrainConfig, dataset: Any, device: torch.device) -> nn.Module:
    """The registry's model, quantized as ``cfg`` says, checked against the data (its task's:
    an :class:`~metagrad.data.ImageDataset` or a :class:`~metagrad.data.corpus.CharCorpus`)."""
    task = task_for_model(cfg.model)
    model = create_model(cfg.model, width=cfg.width, **task.model_kwargs(dataset))
    skip = {FIRST_CONV_NAME, CLASSIFIER_NAME} if cfg.fp_first_last else set()
    report = quantize_(model, cfg.quant_config(), filter_fn=lambda m, name: name not in skip)
    model.quantization_coverage = report.to_dict()  # for the run's summary
    model = model.to(device, memory_format=torch.channels_last)
    task.check_model(cfg, model, dataset)
    return model.train()


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer; ``model`` may be DDP-wrapped (MetaGrad then averages gradients)."""
    if cfg.method == "metagrad":
        from metagrad.meta.hyper import create_hypernet
        from metagrad.meta.optim import MetaGrad

        return MetaGrad(
            model,
            lr=cfg.lr,
            base=cfg.optimizer,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            hypernet=create_hypernet(cfg.hyper, hidden=cfg.hyper_hidden, form=cfg.hyper_form),
            hyper_lr=cfg.hyper_lr,
            comm_bits=cfg.comm_bits,
            horizon=cfg.hyper_horizon,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one synchronisation)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Paths of the floating-point tensors in a (nested) state dict that hold NaN or inf."""
    if isinstance(state, Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix or "tensor"]
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, list | tuple)
        else ()
    )
    return [bad for k, v in items for bad in nonfinite_entries(v, f"{prefix}.{k}".strip("."))]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _brief(value: Any, limit: int = 40) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters (long vocabularies)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA's allocator peak, or the process's peak resident set on CPU.

    On Linux the peak is ``VmHWM`` of ``/proc/self/status``: unlike ``getrusage``'s maxrss, it
    does not inherit the peak of the parent process that started this one.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process_max_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


class Trainer:
    """One training run in ``cfg.out``; ``fit()`` runs it (or resumes it) to the end.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains its part of every
    global batch of ``cfg.batch_size`` under DistributedDataParallel; rank 0 writes the files.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._check_out_dir()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.dist = distributed.from_environment(self.device)
        rank, world_size = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        if self.dist and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.batch_size < world_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is the global batch; it must be at least the "
                f"number of processes ({world_size})"
            )
        self.is_main = rank == 0
        self.lock = self._lock_out_dir() if self.is_main else None
        try:
            self._setup(cfg, rank, world_size)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: TrainConfig, rank: int, world_size: int) -> None:
        """Everything after the lock: data, model, optimizer, batches, schedule, resume."""
        self.comm_state = None
        self.amp = resolve_amp(cfg.amp, self.device)
        self.compile = resolve_compile(cfg.compile, self.device)
        self.task = task_for_model(cfg.model)
        self.data = self.task.load_data(cfg)
        self.model = build_model(cfg, self.data, self.device)
        self.ddp = self._wrap(self.model) if self.dist else None
        trained = self.ddp or self.model
        self.forward = torch.compile(trained) if self.compile == "model" else trained
        self.optimizer = build_optimizer(cfg, trained if cfg.method == "metagrad" else self.model)
        if rank:  # the model is rank 0's; the randomness of training (dither) differs per rank
            torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.loader = self.task.train_loader(
            cfg, self.data, self.model, self.device, (rank, world_size)
        )
        self.eval_split = self.task.eval_split(self.data, self.model, self.device)
        steps_per_epoch = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)),
        )
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.step_seconds: list[float] = []
        self.hyper_seconds = 0.0
        self.earlier_peak_memory_mb = 0.0
        self.gradient_records: list[dict[str, Any]] = []
        self.partial_record: dict[str, Any] | None = None
        if cfg.resume:
            self._resume()

    def _wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DistributedDataParallel, with ``cfg.comm_bits`` communication."""
        from metagrad.parallel.comm import data_parallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        bits = self.cfg.comm_bits if self.cfg.method == "plain" else 32  # MetaGrad averages
        ddp, self.comm_state = data_parallel(model, bits, seed=self.cfg.seed, device_ids=device_ids)
        return ddp

    def _check_out_dir(self) -> None:
        check_writable_dir(self.out)
        has_run = (self.out / CHECKPOINT).exists()
        if has_run and not self.cfg.resume:
            raise ConfigError(
                f"{self.out} already holds a run; pass --resume to continue it, or another --out"
            )
        if not has_run and self.cfg.resume:
            raise CheckpointError(f"--resume: no checkpoint at {self.out / CHECKPOINT}")

    def _lock_out_dir(self) -> RunLock:
        """Refuse a second run on the same ``--out``; then clear a killed run's temporary files."""
        lock = RunLock(self.out)
        lock.acquire()
        remove_stale_temp_files(self.out, OUTPUT_FILES)
        return lock

    def close(self) -> None:
        """Release the run directory's lock (the run can be resumed later)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's state; under torchrun a collective (every rank's RNG state is gathered)."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "config": self.cfg.to_dict(),
            "dataset": self.task.signature(self.data),
            "world_size": self.dist.world_size if self.dist else 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "history": self.history,
            "partial": self.partial,
            "step_seconds": self.step_seconds,
            "hyper_seconds": self.hyper_seconds,
            "peak_memory_mb": peak_memory_mb(self.device)[0],
            "gradient_records": self.gradient_records,
            "torch_rng": rng,
            "cuda_rng": cuda_rng,
            "rank_rng": self._gather_rng(rng, cuda_rng),
            "comm": self._comm_state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def _gather_rng(self, rng: Tensor, cuda_rng: Tensor | None) -> list[dict[str, Any]] | None:
        if not self.dist:
            return None
        cpu = distributed.all_gather_tensors(rng)
        cuda = distributed.all_gather_tensors(cuda_rng) if cuda_rng is not None else None
        return [
            {"torch_rng": cpu[r], "cuda_rng": None if cuda is None else cuda[r]}
            for r in range(self.dist.world_size)
        ]

    def _comm_state_dict(self) -> list[dict[str, Any]] | None:
        state = self.comm_state
        if state is None or not self.dist:
            return None
        states: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state.state_dict())
        return states

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        state = load_checkpoint(path)
        try:
            self._load_state(state)
        except CheckpointError:
            raise
        except KeyError as err:
            raise CheckpointError(f"{path} lacks {err}; not a metagrad run") from None
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path}: damaged or incompatible ({reason})") from None

    def _load_state(self, state: dict[str, Any]) -> None:
        # A setting added after the checkpoint was written takes its default.
        saved = {**TrainConfig.defaults(), **state["config"]}
        now = self.cfg.to_dict()
        inert = HYPER_KEYS if now["method"] == "plain" else frozenset()
        changed = sorted(
            k for k in now if k not in RESUMABLE_KEYS | inert and saved.get(k) != now[k]
        )
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise CheckpointError(f"cannot resume {self.out}: settings differ ({diffs})")
        signature, expected = self.task.signature(self.data), state.get("dataset")
        if expected is not None and expected != signature:
            diffs = ", ".join(
                f"{k} {_brief(expected.get(k))} -> {_brief(v)}"
                for k, v in signature.items()
                if expected.get(k) != v
            )
            raise CheckpointError(
                f"cannot resume {self.out}: the dataset differs from the run's ({diffs})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        pos = state["position"]
        self.epoch, self.batch, self.step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
        if not (0 <= self.batch <= len(self.loader) and self.epoch >= 0 and self.step >= 0):
            raise CheckpointError(f"{self.out / CHECKPOINT}: position {pos} is out of range")
        self.history = list(state["history"])
        self.partial = dict(state["partial"])
        self.step_seconds = list(state["step_seconds"])
        self.hyper_seconds = state.get("hyper_seconds", 0.0)
        self.earlier_peak_memory_mb = state.get("peak_memory_mb", 0.0)
        self.gradient_records = list(state.get("gradient_records", []))
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        rank = self.dist.rank if self.dist else 0
        rank_rng = state.get("rank_rng") or [
            {"torch_rng": state["torch_rng"], "cuda_rng": state.get("cuda_rng")}
        ]
        if rank < len(rank_rng):  # another number of processes: new ranks start fresh streams
            torch.set_rng_state(rank_rng[rank]["torch_rng"])
            cuda_rng = rank_rng[rank].get("cuda_rng")
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
        comm = state.get("comm")
        if comm and self.comm_state is not None and rank < len(comm):
            self.comm_state.load_state_dict(comm[rank])
        if state.get("grad_scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])

    def _save(self, partial_record: dict[str, Any] | None = None) -> None:
        """Write the checkpoint, metrics and summary (rank 0), only from a finite state."""
        state = self.state_dict()
        bad = nonfinite_entries({"model": state["model"], "optimizer": state["optimizer"]})
        if bad:
            raise FloatingPointError(
                f"non-finite values in {', '.join(bad[:3])} at step {self.step}; checkpoint not "
                f"written, {self.out / CHECKPOINT} keeps the last good state"
            )
        if not self.is_main:
            return
        save_checkpoint(state, self.out / CHECKPOINT)
        records = self.history + ([partial_record] if partial_record else [])
        write_jsonl(records, self.out / METRICS)
        if self.gradient_records:
            write_jsonl(self.gradient_records, self.out / GRADIENTS)
        write_json(self._summary(False, in_progress=True), self.out / SUMMARY)

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, global_size: int) -> tuple[float, int] | None:
        """One optimizer step on this rank's ``x, y`` of a global batch of ``global_size``
        targets (samples, or characters for a language model).

        Returns the global batch's summed loss and number of correct predictions, or None if
        the step was skipped because its loss or gradients were not finite (``--nonfinite
        skip``); with ``--nonfinite stop`` that raises ``FloatingPointError`` instead, before
        anything is applied.
        """
        outputs: list[Tensor] = []
        sums: list[Tensor] = []
        scaler, amp, task = self.scaler, self.amp, self.task
        world_size = self.dist.world_size if self.dist else 1

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=bool(amp)):
                out = self.forward(x)
            if world_size == 1:
                loss = task.loss(out, y)
                sums.append(loss.detach() * y.numel())
            else:  # DDP averages over ranks: weight each rank's sum by its share of the batch
                loss_sum = task.loss(out, y, reduction="sum")
                sums.append(loss_sum.detach())
                loss = loss_sum * (world_size / global_size)
            scaler.scale(loss).backward()
            outputs.append(out.detach())
            return loss

        def global_totals() -> tuple[float, int]:
            correct = task.correct(outputs[-1], y)
            totals = torch.stack([sums[-1].double(), correct.double()])
            if self.dist:
                totals = distributed.all_reduce_sum(totals)
            loss_sum, n_correct = totals.tolist()
            return loss_sum, int(n_correct)

        hyper_before = getattr(self.optimizer, "hyper_time", 0.0)
        if scaler.is_enabled():  # fp16: loss scaling, non-finite gradients skipped by the scaler
            closure()
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            self.skipped_steps += int(scaler.get_scale() < scale)
            loss_sum, correct = global_totals()
            applied = math.isfinite(loss_sum)
        elif self.cfg.method == "metagrad":  # MetaGrad checks loss and gradients itself
            self.optimizer.step(closure)
            loss_sum, correct = global_totals()
            applied = not self.optimizer.last_step_skipped
        else:
            closure()
            loss_sum, correct = global_totals()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            applied = math.isfinite(loss_sum) and all_finite(grads)
            if applied:
                self.optimizer.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        self.hyper_seconds += getattr(self.optimizer, "hyper_time", 0.0) - hyper_before
        self.scheduler.step()
        if not applied:
            self._nonfinite(loss_sum)
            return None
        if not all_finite(list(self.model.parameters())):
            raise FloatingPointError(
                f"the weights became non-finite at step {self.step} (finite loss and "
                f"gradients); stopping, {self.out / CHECKPOINT} keeps the last good state"
            )
        return loss_sum, correct

    def _nonfinite(self, loss_sum: float) -> None:
        """Apply ``--nonfinite`` to a step whose loss or gradients were not finite."""
        if self.cfg.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradients at step {self.step} (loss {loss_sum}); stopped "
                f"before applying them, {self.out / CHECKPOINT} keeps the last good state "
                "(--nonfinite skip skips such steps instead)"
            )
        self.nonfinite_steps += 1
        if self.nonfinite_steps in (1, 10, 100, 1000):
            tqdm.write(
                f"step {self.step}: non-finite loss or gradients, step skipped "
                f"({self.nonfinite_steps} so far)"
            )

    def _epoch_record(self, seconds: float, complete: bool) -> dict[str, Any]:
        if self.ddp is not None and self.ddp.broadcast_buffers:  # evaluate rank 0's statistics
            distributed.broadcast_tensors_(list(self.model.buffers()))
        test_loss, test_acc = self.task.evaluate(self.model, self.eval_split, self.amp, self.dist)
        seen = max(1, self.partial["seen"])
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            **self.task.metrics(
                self.partial["loss_sum"] / seen,
                100.0 * self.partial["correct"] / seen,
                test_loss,
                test_acc,
            ),
            "seconds": seconds,
            "lr": self.optimizer.param_groups[0]["lr"],
            "nonfinite_steps": self.nonfinite_steps,
        }
        if not complete:
            record["partial"] = True
        return record

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (or ``cfg.max_steps``); returns the summary it writes."""
        cfg = self.cfg
        stopped_early = False
        try:
            while self.epoch < cfg.epochs and not stopped_early:
                stopped_early = self._run_epoch()
        except FloatingPointError:
            # Record where the run diverged, and the diagnostics up to there; the checkpoint
            # keeps the last good epoch.
            if self.is_main:
                if self.gradient_records:
                    write_jsonl(self.gradient_records, self.out / GRADIENTS)
                write_json(self._summary(False, diverged_at_step=self.step), self.out / SUMMARY)
            raise
        finally:
            self.close()
        summary = self._summary(stopped_early)
        if self.is_main:
            write_json(summary, self.out / SUMMARY)
        return summary

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch; True if ``max_steps`` stopped it early."""
        cfg = self.cfg
        bar = tqdm(
            total=len(self.loader),
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and self.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        started = time.perf_counter() - self.partial["seconds"]
        for x, y in self.loader.epoch(self.epoch, start=self.batch):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Targets of the global batch: samples, times the targets of each (characters).
            global_size = self.loader.global_batch_size(self.batch) * math.prod(y.shape[1:])
            t0 = time.perf_counter()
            result = self.train_step(x, y, global_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step_seconds.append(time.perf_counter() - t0)
            self.batch += 1
            self.step += 1
            if cfg.diag_every and self.step % cfg.diag_every == 0 and self.is_main:
                report = gradient_report(self.model, x, y, self.optimizer, self.task.loss)
                self.gradient_records.append({"step": self.step, **report})
            if result is not None:
                loss_sum, correct = result
                self.partial["loss_sum"] += loss_sum
                self.partial["correct"] += correct
                self.partial["seen"] += global_size
                bar.set_postfix(
                    loss=f"{loss_sum / global_size:.3f}",
                    lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                )
            bar.update()
            if cfg.max_steps and self.step >= cfg.max_steps and self.batch < len(self.loader):
                self.partial["seconds"] = time.perf_counter() - started
                bar.close()
                self.partial_record = self._epoch_record(self.partial["seconds"], complete=False)
                self._save(self.partial_record)
                return True
        bar.close()
        record = self._epoch_record(time.perf_counter() - started, complete=True)
        self.history.append(record)
        if self.is_main:
            tqdm.write(
                f"epoch {record['epoch']}/{cfg.epochs}: {self.task.describe(record)} "
                f"| {record['seconds']:.1f}s"
            )
        self.epoch, self.batch = self.epoch + 1, 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self._save()
        return bool(cfg.max_steps and self.step >= cfg.max_steps)

    def _communication_summary(self) -> dict[str, Any] | None:
        """Bytes each rank sent per step for the model's gradients (torchrun runs).

        Counted by the quantized hook; otherwise the ring all-reduce's cost model (32 and 16
        bits) or the quantized payload of one all-reduce of every gradient (MetaGrad).
        """
        if not self.dist:
            return None
        from metagrad.parallel.comm import payload_bytes, ring_all_reduce_bytes

        bits, world_size = self.cfg.comm_bits, self.dist.world_size
        numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        state = self.comm_state
        if state is not None and state.calls:
            per_step, how = state.bytes_sent / max(1, self.step), "counted"
        elif bits in (32, 16):
            per_step, how = ring_all_reduce_bytes(numel, bits // 8, world_size), "ring model"
        else:
            per_step, how = payload_bytes(numel, bits, world_size), "payload"
        return {
            "world_size": self.dist.world_size,
            "comm_bits": bits,
            "bytes_per_step": per_step,
            "bytes_how": how,
        }

    def _hypernet_summary(self) -> dict[str, Any] | None:
        hypernet = getattr(self.optimizer, "hypernet", None)
        if hypernet is None:
            return None
        return {
            "kind": self.cfg.hyper,
            "form": self.cfg.hyper_form,
            "hidden": self.cfg.hyper_hidden,
            "lr": self.cfg.hyper_lr,
            "horizon": self.cfg.hyper_horizon,
            "parameters": sum(p.numel() for p in hypernet.parameters()),
        }

    def _summary(
        self, stopped_early: bool, diverged_at_step: int | None = None, in_progress: bool = False
    ) -> dict[str, Any]:
        records = self.history + ([self.partial_record] if self.partial_record else [])
        accs = [r["test_acc"] for r in records if "test_acc" in r]  # image classification
        final = accs[-1] if accs else None
        steps = self.step_seconds[1:] or self.step_seconds
        memory, memory_kind = peak_memory_mb(self.device)
        memory = max(memory, self.earlier_peak_memory_mb)  # earlier processes of a resumed run
        return {
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "rank": self.dist.rank if self.dist else 0,
            "amp": str(self.amp).removeprefix("torch.") if self.amp else "off",
            "compile": self.compile,
            "amp_skipped_steps": self.skipped_steps,
            "nonfinite_policy": self.cfg.nonfinite,
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self.dist.world_size if self.dist else 1,
            "communication": self._communication_summary(),
            "provenance": provenance(self.device),
            "quantization": str(self.cfg.quant_config()),
            "quantization_spec": self.cfg.quant_config().to_dict(),
            "hypernet": self._hypernet_summary(),
            "quantized_layers": len(quantized_layers(self.model)),
            "quantization_coverage": self.model.quantization_coverage,
            "backend": self.cfg.backend,
            "int8_fallbacks": fallback_report(self.model),
            "in_progress": in_progress,
            "epochs_completed": len(self.history),
            "steps": self.step,
            "stopped_early": stopped_early,
            "diverged_at_step": diverged_at_step,
            "final_test_acc": None if diverged_at_step is not None else final,
            "final_train_loss": records[-1]["train_loss"] if records else None,
            "best_test_acc": max(accs) if accs else None,
            **self.task.summary(records, diverged_at_step is not None, self.data),
            "mean_step_seconds": sum(steps) / len(steps) if steps else None,
            "hyper_share_of_step_time": (
                self.hyper_seconds / sum(self.step_seconds) if self.step_seconds else None
            )
            if self.cfg.method == "metagrad"
            else None,
            "peak_memory_mb": memory,
            "peak_memory_kind": memory_kind,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }


def saved_config(out: str | Path) -> dict[str, Any]:
    """The settings saved with the run in ``out`` (for ``--resume``)."""
    path = Path(out) / CHECKPOINT
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no run settings; not a metagrad run")
    return config


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training run that ``cfg`` describes; returns its summary.

    Under ``torchrun`` every process calls it; the process group is closed at the end.
    """
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.fit()
    finally:
        del trainer  # the DDP model must go before the process group
        distributed.shutdown()
