"""What a run is built from: device, autocast, compilation, model, optimizer and schedule."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from metagrad import kernels
from metagrad.backward.int8.routes import ROUTES, ROUTES_ENV, set_routes
from metagrad.meta.updates import get_base_rule
from metagrad.models import create_model
from metagrad.nn.convert import quantize_
from metagrad.training.config import ConfigError, TrainConfig
from metagrad.training.tasks import task_for_model

__all__ = [
    "build_model",
    "build_optimizer",
    "resolve_amp",
    "resolve_compile",
    "resolve_device",
    "resolve_routes",
    "warmup_cosine",
]


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` (``auto``: CUDA where torch sees it, else the CPU)."""
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


def attention_kernel(name: str) -> AbstractContextManager[object]:
    """The context a forward pass runs in for ``--attention-kernel``: ``math`` restricts
    ``scaled_dot_product_attention`` to its math kernel (its backward follows the forward's
    choice); ``default`` leaves the choice to PyTorch."""
    if name == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def resolve_routes(name: str) -> str:
    """The ``int8`` backend's route mode for ``--routes``, set for this process (the record of
    the routes used starts afresh). ``auto``: ``$METAGRAD_INT8_ROUTES`` if set, else
    ``measured``."""
    where = "routes"
    if name == "auto":
        where, name = ROUTES_ENV, os.environ.get(ROUTES_ENV) or "measured"
    try:
        set_routes(name)
    except ValueError:
        raise ConfigError(f"{where} must be fixed or measured; got {name!r}") from None
    ROUTES.used.clear()
    return name


def build_model(cfg: TrainConfig, dataset: Any, device: torch.device) -> nn.Module:
    """The registry's model, quantized as ``cfg`` says, checked against the data (its task's:
    an :class:`~metagrad.data.ImageDataset` or a :class:`~metagrad.data.corpus.CharCorpus`)."""
    task = task_for_model(cfg.model)
    model = create_model(cfg.model, width=cfg.width, **task.model_kwargs(dataset))
    skip = set(cfg.high_precision_layers())
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

        settings = {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
        settings["weight_decay"] = cfg.weight_decay
        taken = get_base_rule(cfg.optimizer).settings  # Adam: no momentum, no nesterov
        return MetaGrad(
            model,
            lr=cfg.lr,
            base=cfg.optimizer,
            **{k: v for k, v in settings.items() if k in taken},
            hypernet=create_hypernet(cfg.hyper, hidden=cfg.hyper_hidden, form=cfg.hyper_form),
            hyper_lr=cfg.hyper_lr,
            comm_bits=cfg.comm_bits,
            horizon=cfg.hyper_horizon,
        )
    make = get_base_rule(cfg.optimizer).optimizer  # config refuses a rule without one
    return make(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
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
