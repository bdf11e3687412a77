"""What a run's checkpoint holds, and how ``--resume`` restores a run from it.

:class:`CheckpointState` is the part of the :class:`~metagrad.training.trainer.Trainer` that
turns the run into a state dict (model, optimizer, schedule, position in the data, history,
timings and every rank's random-number state) and back, refusing a checkpoint whose settings or
dataset differ from the run's. With ``--shard fsdp`` the model and optimizer state are shards
beside it (:mod:`metagrad.training.sharded`), which the state dict names. Every field is
type-checked (:func:`state_problem`) before any is restored, so a damaged or hand-edited
checkpoint is one line naming the field, never a crash later in training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metagrad.checkpoint import CheckpointError, load_checkpoint
from metagrad.parallel import distributed
from metagrad.training.config import HYPER_KEYS, RESUMABLE_KEYS, TrainConfig
from metagrad.training.records import peak_memory_mb
from metagrad.training.run_files import CHECKPOINT, is_number
from metagrad.training.sharded import (
    PARTS,
    SHARDS_NAME,
    load_shards,
    local_tensors,
    on_every_rank,
    save_shards,
    weights_state,
)
from metagrad.training.tasks import Loader, Task

if TYPE_CHECKING:
    from metagrad.parallel.comm import QuantizedHookState

__all__ = ["CheckpointState", "nonfinite_entries", "state_problem"]


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Paths of the floating-point tensors in a (nested) state dict that hold NaN or inf (of
    this rank's shard, for a DTensor)."""
    if isinstance(state, Tensor):
        [state] = local_tensors([state])
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


def _brief(value: Any, limit: int = 40) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters (long vocabularies)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _what(value: Any) -> str:
    """A value for a message: scalars as their repr, anything else as its type's name."""
    if value is None or isinstance(value, str | int | float | bool):
        return _brief(value)
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rng(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1


Check = Callable[[Any], str | None]
"""A field's check: None if the value is right, else the problem after the field's name
(``" is 'abc', expected a list"``, ``"[2] is None, ..."``, ``" lacks 'seen'"``)."""


def _is(ok: Callable[[Any], bool], expected: str, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        right = (optional and value is None) or ok(value)
        return None if right else f" is {_what(value)}, expected {expected}"

    return check


def _list_of(ok: Callable[[Any], bool], item: str, optional: bool = False) -> Check:
    """A list whose every element passes ``ok``; ``item``: one, with its article ("a dict")."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if not isinstance(value, list):
            return f" is {_what(value)}, expected a list, each element {item}"
        bad = next((i for i, element in enumerate(value) if not ok(element)), None)
        if bad is None:
            return None
        return f"[{bad}] is {_what(value[bad])}, expected {item}"

    return check


def _dict_of(numbers: dict[str, bool]) -> Check:
    """A dict of ``numbers``: {key: an integer >= 0 (True) or any number (False)}."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f" is {_what(value)}, expected a dict of {', '.join(numbers)}"
        for name, integer in numbers.items():
            if name not in value:
                return f" lacks {name!r}"
            number = value[name]
            if not (_is_int(number) and number >= 0 if integer else _is_real(number)):
                expected = "an integer >= 0" if integer else "a number"
                return f".{name} is {_what(number)}, expected {expected}"
        return None

    return check


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _epoch_record(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_int(value.get("epoch"))
        and _is_real(value.get("train_loss"))
    )


def _shards(value: Any) -> bool:
    """What ``checkpoint.pt`` records of its shard directory (``--shard fsdp``)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and SHARDS_NAME.fullmatch(value["name"]) is not None
        and isinstance(value.get("parts"), list)
        and "model" in value["parts"]
        and set(value["parts"]) <= set(PARTS)
        and isinstance(value.get("sha256"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value["sha256"].items())
    )


def _rank_rng(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _rng(value.get("torch_rng"))
        and (value.get("cuda_rng") is None or _rng(value["cuda_rng"]))
    )


_REQUIRED: dict[str, Check] = {
    "config": _is(_is_dict, "a dict of settings"),
    "model": _is(_is_dict, "a state dict"),
    "optimizer": _is(_is_dict, "a state dict"),
    "scheduler": _is(_is_dict, "a state dict"),
    "position": _dict_of({"epoch": True, "batch": True, "step": True}),
    "history": _list_of(_epoch_record, "an epoch record (a dict with epoch and train_loss)"),
    "partial": _dict_of({"loss_sum": False, "correct": True, "seen": True, "seconds": False}),
    "step_seconds": _list_of(is_number, "a finite number"),
}
"""The fields every checkpoint has, with their checks."""
_OPTIONAL: dict[str, Check] = {
    "dataset": _is(_is_dict, "a dict", optional=True),
    "hyper_seconds": _is(is_number, "a finite number"),
    "peak_memory_mb": _is(is_number, "a finite number"),
    "gradient_records": _list_of(_is_dict, "a dict"),
    "skipped_steps": _is(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "nonfinite_steps": _is(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "cuda_rng": _is(_rng, "a uint8 tensor", optional=True),
    "rank_rng": _list_of(_rank_rng, "a dict of uint8 torch_rng and cuda_rng", optional=True),
    "comm": _list_of(_is_dict, "a dict", optional=True),
    "grad_scaler": _is(_is_dict, "a state dict", optional=True),
    "shards": _is(_shards, "a dict of name (shards-stepNNNNNN), parts and sha256", optional=True),
}
"""Fields a checkpoint of an earlier version may lack (they take their defaults)."""


def state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's fields (``"step_seconds[0] is 'a', expected a finite
    number"``), or None: every field :meth:`CheckpointState._load_state` reads is checked."""
    in_shards = set(PARTS) if state.get("shards") is not None else set()
    for key, check in (*_REQUIRED.items(), *_OPTIONAL.items()):
        if key not in state:
            if key in _REQUIRED and key not in in_shards:
                return f"lacks {key!r}"
            continue
        problem = check(state[key])
        if problem is not None:
            return f"{key}{problem}"
    if not state.get("rank_rng") and not _rng(state.get("torch_rng")):
        return f"torch_rng is {_what(state.get('torch_rng'))}, expected a uint8 tensor"
    return None


class CheckpointState:
    """The checkpointed state of a training run: saved by :meth:`state_dict`, restored by
    :meth:`_resume`. The attributes below are the run's (set up by the trainer)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    dist: distributed.Distributed | None
    task: Task
    data: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    comm_state: QuantizedHookState | None
    loader: Loader
    epoch: int
    batch: int
    step: int
    history: list[dict[str, Any]]
    partial: dict[str, Any]
    step_seconds: list[float]
    hyper_seconds: float
    earlier_peak_memory_mb: float
    gradient_records: list[dict[str, Any]]
    skipped_steps: int
    nonfinite_steps: int
    sharded: bool
    """``--shard fsdp``: the model and optimizer state are saved as shards (even by one process)."""

    def state_dict(self) -> dict[str, Any]:
        """The run's state; under torchrun a collective (every rank's RNG state is gathered)."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        weights = (
            {}  # --shard fsdp: in shards (_save_weights)
            if self.sharded
            else {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        )
        return {
            "config": self.cfg.to_dict(),
            "dataset": self.task.signature(self.data),
            "world_size": self.dist.world_size if self.dist else 1,
            **weights,
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

    def _save_weights(self, state: dict[str, Any]) -> None:
        """Refuse to save a non-finite model or optimizer state (``FloatingPointError``); with
        ``--shard fsdp`` write them as shards (every rank) and name those in ``state``.

        Sharded, each rank checks its own shards and the verdict is all-reduced.
        """
        sharded = self.sharded
        weights = weights_state(self.model, self.optimizer, self.cfg.method) if sharded else state
        bad = nonfinite_entries({k: weights[k] for k in PARTS if k in weights})
        if sharded and self.dist is not None and not on_every_rank(not bad, self.device):
            bad = bad or ["another rank's shards"]
        if bad:
            raise FloatingPointError(
                f"non-finite values in {', '.join(bad[:3])} at step {self.step}; checkpoint not "
                f"written, {self._last_good()}"
            )
        if sharded:
            state["shards"] = save_shards(weights, self.out, self.step)

    def _last_good(self) -> str:
        """Where the run's last good state is, for the messages of a run that stops."""
        if (self.out / CHECKPOINT).exists():
            return f"{self.out / CHECKPOINT} keeps the last good state"
        return f"no checkpoint was written yet in {self.out}"

    def _gather_rng(self, rng: Tensor, cuda_rng: Tensor | None) -> list[dict[str, Any]] | None:
        """Every rank's random-number states (torchrun runs), else None."""
        if not self.dist:
            return None
        cpu = distributed.all_gather_tensors(rng)
        cuda = distributed.all_gather_tensors(cuda_rng) if cuda_rng is not None else None
        return [
            {"torch_rng": cpu[r], "cuda_rng": None if cuda is None else cuda[r]}
            for r in range(self.dist.world_size)
        ]

    def _comm_state_dict(self) -> list[dict[str, Any]] | None:
        """Every rank's state of the quantized communication hook, else None."""
        state = self.comm_state
        if state is None or not self.dist:
            return None
        states: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state.state_dict())
        return states

    def _resume(self) -> None:
        """Restore the run from its checkpoint; any problem with it raises CheckpointError."""
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
        """Restore the run from ``state``, refusing other settings or another dataset."""
        problem = state_problem(state)
        if problem is not None:
            raise CheckpointError(f"{self.out / CHECKPOINT}: damaged or incompatible ({problem})")
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
        shards = state.get("shards")
        if self.sharded != (shards is not None):
            held = "shards" if shards is not None else "no shards"
            raise CheckpointError(f"{self.out / CHECKPOINT} holds {held}, unlike this run")
        if shards is None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_shards(self.model, self.optimizer, self.cfg.method, self.out, shards)
        self.scheduler.load_state_dict(state["scheduler"])
        if shards is not None and "optimizer" not in shards["parts"]:  # its learning rates
            lrs = self.scheduler.get_last_lr()
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
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
