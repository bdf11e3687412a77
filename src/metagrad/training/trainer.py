"""The training loop behind ``metagrad train``: metrics, summary, atomic checkpoints, resume.

What is trained on (data, batches, loss, evaluation, metrics) comes from the model's task
(:mod:`metagrad.training.tasks`); what a run is built from, from :mod:`metagrad.training.setup`;
what its checkpoint holds, from :mod:`metagrad.training.checkpoint_state`; the files it writes,
from :mod:`metagrad.training.run_files`; ``--shard fsdp``, from :mod:`metagrad.training.sharded`.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from metagrad import kernels
from metagrad.backward import fallback_report
from metagrad.backward.int8.routes import route_record
from metagrad.checkpoint import (
    CheckpointError,
    RunLock,
    check_writable_dir,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from metagrad.machine import retain_freed_cpu_memory
from metagrad.meta.diagnostics import gradient_report
from metagrad.nn.layers import quantized_layers
from metagrad.parallel import distributed
from metagrad.training.checkpoint_state import CheckpointState
from metagrad.training.config import ConfigError, TrainConfig
from metagrad.training.records import (
    communication_summary,
    cpu_model,
    gradient_record,
    hypernet_summary,
    peak_memory_mb,
    provenance,
)
from metagrad.training.run_files import (
    CHECKPOINT,
    GRADIENTS,
    METRICS,
    OUTPUT_FILES,
    SUMMARY,
    saved_config,
)
from metagrad.training.setup import (
    attention_kernel,
    build_model,
    build_optimizer,
    resolve_amp,
    resolve_compile,
    resolve_device,
    resolve_routes,
    warmup_cosine,
)
from metagrad.training.sharded import all_finite_shards, remove_old_shards, shard_for_training
from metagrad.training.tasks import load_dataset, task_for_model

__all__ = [  # the run, and (re-exported) what its callers build and read it with
    "CHECKPOINT",
    "Trainer",
    "all_finite",
    "build_model",
    "build_optimizer",
    "cpu_model",
    "load_dataset",
    "resolve_amp",
    "resolve_device",
    "saved_config",
    "train",
]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one synchronisation)."""
    return bool(kernels.all_finite(tensors))


class Trainer(CheckpointState):
    """One training run in ``cfg.out``; ``fit()`` runs it (or resumes it) to the end.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains its part of every
    global batch of ``cfg.batch_size`` under DistributedDataParallel, or FSDP2 (``cfg.shard``
    ``fsdp``); rank 0 writes the files (with fsdp, every rank writes its shards).
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._check_out_dir()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.cpu_memory == "retain":
            retain_freed_cpu_memory()
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.dist = distributed.from_environment(self.device, cfg.dist_timeout)
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
        self.routes = resolve_routes(cfg.routes)
        self.task = task_for_model(cfg.model)
        self.data = self.task.load_data(cfg)
        self.model = build_model(cfg, self.data, self.device)
        self.sharded = cfg.shard == "fsdp"
        if self.sharded and self.dist:
            shard_for_training(self.model)
        self.ddp = self._wrap(self.model) if self.dist and not self.sharded else None
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
    def _save(self, partial_record: dict[str, Any] | None = None) -> None:
        """Write the checkpoint, metrics and summary (rank 0), only from a finite state; with
        ``--shard fsdp`` every rank writes its shards first, and older shards go last."""
        state = self.state_dict()
        self._save_weights(state)
        if not self.is_main:
            return
        save_checkpoint(state, self.out / CHECKPOINT)
        if self.sharded:
            remove_old_shards(self.out, state["shards"]["name"])
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
        the step was skipped because its loss, its gradients or the model's buffers after its
        forward pass (batch-norm statistics) were not finite (``--nonfinite skip``: weights,
        optimizer state and buffers are left as they were); with ``--nonfinite stop`` that
        raises ``FloatingPointError`` instead, before anything is applied.
        """
        outputs: list[Tensor] = []
        sums: list[Tensor] = []
        scaler, amp, task = self.scaler, self.amp, self.task
        world_size = self.dist.world_size if self.dist else 1

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            if self.sharded:  # rank 0's buffers, as DDP broadcasts them before each forward
                self._sync_buffers()
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=bool(amp)):
                out = self.forward(x)
            if world_size == 1:
                loss = task.loss(out, y)
                total = loss.detach() * y.numel()
            else:  # DDP averages over ranks: weight each rank's sum by its share of the batch
                loss_sum = task.loss(out, y, reduction="sum")
                total = loss_sum.detach()
                loss = loss_sum * (world_size / global_size)
            if not all_finite(list(self.model.buffers())):  # e.g. batch-norm statistics: the
                loss, total = loss * math.nan, total * math.nan  # step is non-finite (skipped)
            sums.append(total)
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
        # a skipped step's forward pass still updates buffers (batch-norm statistics, perhaps
        # with NaN): keep them to put back, so that a skipped step changes nothing
        buffers = [b.clone() for b in self.model.buffers()] if self.cfg.nonfinite == "skip" else []
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
            applied = math.isfinite(loss_sum) and self._finite(grads)
            if applied:
                self.optimizer.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        self.hyper_seconds += getattr(self.optimizer, "hyper_time", 0.0) - hyper_before
        self.scheduler.step()
        if not applied:
            self._nonfinite(loss_sum)
            with torch.no_grad():
                for buffer, kept in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(kept)
            return None
        if not self._finite(list(self.model.parameters())):
            raise FloatingPointError(
                f"the weights became non-finite at step {self.step} (finite loss and "
                f"gradients); stopping, {self._last_good()}"
            )
        return loss_sum, correct

    def _finite(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` are finite: a sharded model's on every rank."""
        return all_finite_shards(tensors, self.device, self.sharded and self.dist is not None)

    def _sync_buffers(self, evaluating: bool = False) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank: before each forward of a
        sharded model, and before evaluating (DDP broadcasts them before its own forwards)."""
        if self.dist and (self.ddp is None or (evaluating and self.ddp.broadcast_buffers)):
            distributed.broadcast_tensors_(list(self.model.buffers()))

    def _nonfinite(self, loss_sum: float) -> None:
        """Apply ``--nonfinite`` to a step whose loss or gradients were not finite."""
        if self.cfg.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss, gradients or buffers at step {self.step} (loss {loss_sum}); "
                "stopped "
                f"before applying them, {self._last_good()} (--nonfinite skip skips such steps "
                "instead)"
            )
        self.nonfinite_steps += 1
        if self.nonfinite_steps in (1, 10, 100, 1000):
            tqdm.write(
                f"step {self.step}: non-finite loss, gradients or buffers, step skipped "
                f"({self.nonfinite_steps} so far)"
            )

    def _epoch_record(self, seconds: float, complete: bool) -> dict[str, Any]:
        self._sync_buffers(evaluating=True)  # evaluate rank 0's statistics
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
                with attention_kernel(cfg.attention_kernel):  # training and evaluation
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
                report = gradient_report(
                    self.model, x, y, self.optimizer, self.task.loss, amp=self.amp
                )
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

    def _summary(
        self, stopped_early: bool, diverged_at_step: int | None = None, in_progress: bool = False
    ) -> dict[str, Any]:
        """The record of ``summary.json``: settings, results, timings, memory, provenance."""
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
            "communication": communication_summary(
                self.dist, self.cfg.comm_bits, self.model, self.comm_state, self.step, self.sharded
            ),
            "provenance": provenance(self.device),
            "gradients": gradient_record(self.cfg),
            "quantization": str(self.cfg.quant_config()),
            "quantization_spec": self.cfg.quant_config().to_dict(),
            "hypernet": hypernet_summary(self.cfg, self.optimizer),
            "quantized_layers": len(quantized_layers(self.model)),
            "quantization_coverage": self.model.quantization_coverage,
            "backend": self.cfg.backend,
            "int8_fallbacks": fallback_report(self.model),
            "int8_routes": route_record() if self.cfg.backend == "int8" else None,
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training run that ``cfg`` describes; returns its summary.

    Under ``torchrun`` every process calls it; the process group is closed at the end.
    """
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.fit()
    except RuntimeError as err:
        place = trainer.dist if trainer is not None else None
        if place is None or not distributed.is_collective_failure(err):
            raise
        message = distributed.collective_failure(err, place, cfg.dist_timeout)
        raise distributed.CollectiveFailure(message) from None
    finally:
        del trainer  # the DDP model must go before the process group
        distributed.shutdown()
