"""The training loop behind ``metagrad train``: metrics, summary, atomic checkpoints, resume."""

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
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from metagrad import kernels
from metagrad.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from metagrad.config import HYPER_KEYS, RESUMABLE_KEYS, ConfigError, TrainConfig
from metagrad.data import BatchLoader, ImageDataset, download_cifar10, load_cifar10, normalize
from metagrad.data import load_digits_dataset as _load_digits
from metagrad.diagnostics import gradient_report
from metagrad.int8 import fallback_report
from metagrad.layers import quantize_, quantized_layers
from metagrad.models import CLASSIFIER_NAME, FIRST_CONV_NAME, create_model

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
GRADIENTS = "gradients.jsonl"
SUMMARY = "summary.json"
EVAL_BATCH = 1000
CROP_PADDING = 4


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


def load_dataset(cfg: TrainConfig) -> ImageDataset:
    """``digits`` (built in) or CIFAR-10 from ``cfg.data``, downloading it if asked to."""
    if cfg.data is None:
        raise ConfigError("no dataset: pass --data PATH (CIFAR-10) or --data digits (built in)")
    if cfg.data == "digits":
        return _load_digits(seed=cfg.seed)
    path = Path(cfg.data)
    if cfg.download and not path.exists():
        path = download_cifar10(path)
    return load_cifar10(path)


def build_model(cfg: TrainConfig, dataset: ImageDataset, device: torch.device) -> nn.Module:
    """The registry's model, quantized as ``cfg`` says, checked against the data's image size."""
    channels, height, width = dataset.train_images.shape[1:]
    model = create_model(
        cfg.model, num_classes=len(dataset.classes), width=cfg.width, in_channels=channels
    )
    skip = {FIRST_CONV_NAME, CLASSIFIER_NAME} if cfg.fp_first_last else set()
    quantize_(model, cfg.quant_config(), filter_fn=lambda m, name: name not in skip)
    model = model.to(device, memory_format=torch.channels_last)
    probe = torch.zeros(2, channels, height, width, device=device)
    try:
        with torch.no_grad():
            model.eval()(probe)
    except RuntimeError as err:
        raise ConfigError(
            f"model {cfg.model!r} does not accept {channels}x{height}x{width} images "
            f"(from {cfg.data}): {str(err).splitlines()[0]}"
        ) from None
    return model.train()


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.method == "metagrad":
        from metagrad.hyper import create_hypernet
        from metagrad.optim import MetaGrad

        return MetaGrad(
            model,
            lr=cfg.lr,
            base=cfg.optimizer,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            hypernet=create_hypernet(cfg.hyper, hidden=cfg.hyper_hidden, form=cfg.hyper_form),
            hyper_lr=cfg.hyper_lr,
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


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean,
    std,
    amp: torch.dtype | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over a whole split (under autocast to ``amp``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(images), EVAL_BATCH):
        x = normalize(images[i : i + EVAL_BATCH].to(device), mean, std)
        y = labels[i : i + EVAL_BATCH].to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    return loss_sum.item() / len(images), 100.0 * correct.item() / len(images)


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
    """One training run in ``cfg.out``; ``fit()`` runs it (or resumes it) to the end."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._check_out_dir()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.compile = resolve_compile(cfg.compile, self.device)
        self.data = load_dataset(cfg)
        self.model = build_model(cfg, self.data, self.device)
        self.forward = torch.compile(self.model) if self.compile == "model" else self.model
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.skipped_steps = 0
        # On CUDA the uint8 images live on the GPU and are augmented there.
        data_device = self.device if self.device.type == "cuda" else None
        self.loader = BatchLoader(
            self.data.train_images,
            self.data.train_labels,
            cfg.batch_size,
            mean=self.data.mean,
            std=self.data.std,
            shuffle=True,
            augment=self.data.train_images.shape[-1] >= 4 * CROP_PADDING,
            seed=cfg.seed,
            device=data_device,
        )
        self.test_images = self.data.test_images.to(self.device)
        self.test_labels = self.data.test_labels.to(self.device)
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

    def _check_out_dir(self) -> None:
        has_run = (self.out / CHECKPOINT).exists()
        if has_run and not self.cfg.resume:
            raise ConfigError(
                f"{self.out} already holds a run; pass --resume to continue it, or another --out"
            )
        if not has_run and self.cfg.resume:
            raise CheckpointError(f"--resume: no checkpoint at {self.out / CHECKPOINT}")

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
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
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "skipped_steps": self.skipped_steps,
        }

    def _resume(self) -> None:
        state = load_checkpoint(self.out / CHECKPOINT)
        try:
            self._load_state(state)
        except KeyError as err:
            raise CheckpointError(
                f"{self.out / CHECKPOINT} lacks {err}; not a metagrad run"
            ) from None

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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        pos = state["position"]
        self.epoch, self.batch, self.step = pos["epoch"], pos["batch"], pos["step"]
        self.history = list(state["history"])
        self.partial = dict(state["partial"])
        self.step_seconds = list(state["step_seconds"])
        self.hyper_seconds = state.get("hyper_seconds", 0.0)
        self.earlier_peak_memory_mb = state.get("peak_memory_mb", 0.0)
        self.gradient_records = list(state.get("gradient_records", []))
        self.skipped_steps = state.get("skipped_steps", 0)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("grad_scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])

    def _save(self, partial_record: dict[str, Any] | None = None) -> None:
        save_checkpoint(self.state_dict(), self.out / CHECKPOINT)
        records = self.history + ([partial_record] if partial_record else [])
        write_jsonl(records, self.out / METRICS)
        if self.gradient_records:
            write_jsonl(self.gradient_records, self.out / GRADIENTS)
        write_json(self._summary(False, in_progress=True), self.out / SUMMARY)

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> tuple[float, int]:
        """One optimizer step; returns the batch's loss and number of correct predictions."""
        outputs: list[Tensor] = []
        scaler, amp = self.scaler, self.amp

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=bool(amp)):
                out = self.forward(x)
            loss = F.cross_entropy(out.float(), y)
            scaler.scale(loss).backward()
            outputs.append(out.detach())
            return loss

        hyper_before = getattr(self.optimizer, "hyper_time", 0.0)
        if scaler.is_enabled():  # fp16: loss scaling, non-finite steps skipped (plain only)
            loss = closure()
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            self.skipped_steps += int(scaler.get_scale() < scale)
        else:
            loss = self.optimizer.step(closure)
        self.hyper_seconds += getattr(self.optimizer, "hyper_time", 0.0) - hyper_before
        self.scheduler.step()
        correct = int((outputs[-1].argmax(1) == y).sum())
        return float(loss.detach()), correct

    def _epoch_record(self, seconds: float, complete: bool) -> dict[str, Any]:
        test_loss, test_acc = evaluate(
            self.model, self.test_images, self.test_labels, self.data.mean, self.data.std, self.amp
        )
        seen = max(1, self.partial["seen"])
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": self.partial["loss_sum"] / seen,
            "train_acc": 100.0 * self.partial["correct"] / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": seconds,
            "lr": self.optimizer.param_groups[0]["lr"],
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
            if self.gradient_records:
                write_jsonl(self.gradient_records, self.out / GRADIENTS)
            write_json(self._summary(False, diverged_at_step=self.step), self.out / SUMMARY)
            raise
        summary = self._summary(stopped_early)
        write_json(summary, self.out / SUMMARY)
        return summary

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch; True if ``max_steps`` stopped it early."""
        cfg = self.cfg
        bar = tqdm(
            total=len(self.loader),
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
            dynamic_ncols=True,
        )
        started = time.perf_counter() - self.partial["seconds"]
        for x, y in self.loader.epoch(self.epoch, start=self.batch):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            t0 = time.perf_counter()
            loss, correct = self.train_step(x, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step_seconds.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; stopping")
            self.batch += 1
            self.step += 1
            if cfg.diag_every and self.step % cfg.diag_every == 0:
                report = gradient_report(self.model, x, y, self.optimizer)
                self.gradient_records.append({"step": self.step, **report})
            self.partial["loss_sum"] += loss * len(y)
            self.partial["correct"] += correct
            self.partial["seen"] += len(y)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
            if cfg.max_steps and self.step >= cfg.max_steps and self.batch < len(self.loader):
                self.partial["seconds"] = time.perf_counter() - started
                bar.close()
                self.partial_record = self._epoch_record(self.partial["seconds"], complete=False)
                self._save(self.partial_record)
                return True
        bar.close()
        record = self._epoch_record(time.perf_counter() - started, complete=True)
        self.history.append(record)
        tqdm.write(
            f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2f}% | test acc {record['test_acc']:.2f}% "
            f"| {record['seconds']:.1f}s"
        )
        self.epoch, self.batch = self.epoch + 1, 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self._save()
        return bool(cfg.max_steps and self.step >= cfg.max_steps)

    def _hypernet_summary(self) -> dict[str, Any] | None:
        hypernet = getattr(self.optimizer, "hypernet", None)
        if hypernet is None:
            return None
        return {
            "kind": self.cfg.hyper,
            "form": self.cfg.hyper_form,
            "hidden": self.cfg.hyper_hidden,
            "lr": self.cfg.hyper_lr,
            "parameters": sum(p.numel() for p in hypernet.parameters()),
        }

    def _summary(
        self, stopped_early: bool, diverged_at_step: int | None = None, in_progress: bool = False
    ) -> dict[str, Any]:
        records = self.history + ([self.partial_record] if self.partial_record else [])
        accs = [r["test_acc"] for r in records]
        final = accs[-1] if accs else None
        steps = self.step_seconds[1:] or self.step_seconds
        memory, memory_kind = peak_memory_mb(self.device)
        memory = max(memory, self.earlier_peak_memory_mb)  # earlier processes of a resumed run
        return {
            "config": self.cfg.to_dict(),
            "amp": str(self.amp).removeprefix("torch.") if self.amp else "off",
            "compile": self.compile,
            "amp_skipped_steps": self.skipped_steps,
            "provenance": provenance(self.device),
            "quantization": str(self.cfg.quant_config()),
            "hypernet": self._hypernet_summary(),
            "quantized_layers": len(quantized_layers(self.model)),
            "backend": self.cfg.backend,
            "int8_fallbacks": fallback_report(self.model) if self.cfg.backend == "int8" else {},
            "in_progress": in_progress,
            "epochs_completed": len(self.history),
            "steps": self.step,
            "stopped_early": stopped_early,
            "diverged_at_step": diverged_at_step,
            "final_test_acc": None if diverged_at_step is not None else final,
            "final_train_loss": records[-1]["train_loss"] if records else None,
            "best_test_acc": max(accs) if accs else None,
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
    """Run (or resume) the training run that ``cfg`` describes; returns its summary."""
    return Trainer(cfg).fit()
