"""Launched by ``torchrun`` in tests/test_distributed.py: train, then save this rank's state.

Usage: ``torchrun ... tests/ddp_worker.py OUT_DIR SETTINGS_JSON``. Registers ``ddp_mlp``, a model
without batch norm, so that N processes can be compared with one process exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from metagrad.models import register_model
from metagrad.parallel import distributed
from metagrad.training.config import build_config
from metagrad.training.trainer import Trainer


@register_model
def ddp_mlp(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> nn.Module:
    """Flatten, two hidden layers of 32, classifier: no batch norm, 8x8 inputs."""
    model = nn.Sequential()
    model.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU())
    model.features = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    model.classifier = nn.Linear(32, num_classes)
    return model


def full(value: Tensor) -> Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def main() -> None:
    out, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    cfg = build_config({"out": str(out / "run"), "progress": False, **settings})
    trainer = Trainer(cfg)
    trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    # a sharded model's (--shard fsdp) full weights: gathered on every rank
    weights = trainer.model.state_dict()
    state = {"model": {k: full(v) for k, v in weights.items()}}
    hypernet = getattr(trainer.optimizer, "hypernet", None)
    if hypernet is not None:
        state["hypernet"] = hypernet.state_dict()
        state["pending"] = [g.clone() for g in trainer.optimizer.pending_gradients().values()]
    torch.save(state, out / f"rank{rank}.pt")
    del trainer  # the DDP or sharded model goes before the process group
    distributed.shutdown()


if __name__ == "__main__":
    main()
