"""Launched by ``torchrun`` in tests/test_wrapped_ddp.py: MetaGrad given the inner module of DDP.

Usage: ``torchrun ... tests/ddp_wrapped_worker.py OUT_DIR``. On a two-layer transformer LM it
trains 3 MetaGrad steps given the wrapper (``ddp``) and given the inner module while the
closure calls the wrapper (``inner``), then tries the two refused cases, and saves this rank's
weights, hypernetwork, losses and refusal messages to ``OUT_DIR/rank{RANK}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import metagrad as mg

VOCAB, LENGTH, WIDTH = 16, 8, 16


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.blocks(self.embed(ids), mask=mask, is_causal=True))


class WithExtra(nn.Module):
    """The LM and a bias of its own: DDP runs both, MetaGrad is given the LM only."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.extra = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids) + self.extra


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyLM()
    mg.quantize_(model, mg.QuantConfig(grad=mg.QuantSpec(bits=4, rounding="stochastic")))
    return model


def _train(mode: str, rank: int, steps: int = 3) -> dict:
    """``ddp``: MetaGrad(ddp); ``inner``: MetaGrad(model); ``late``: the first step bypasses DDP;
    ``foreign``: DDP runs the model and a layer MetaGrad is not given."""
    model = _model()
    ddp = DistributedDataParallel(WithExtra(model) if mode == "foreign" else model)
    torch.manual_seed(1 + rank)  # hypernetwork and rounding: rank-dependent, the same per mode
    opt = mg.MetaGrad(ddp if mode == "ddp" else model, lr=0.05, base="adam", hyper_lr=1e-2)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, VOCAB, (4, LENGTH), generator=g)
        run = model if mode == "late" and step == 0 else ddp

        def closure(ids=ids, run=run):
            opt.zero_grad()
            logits = run(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            return loss

        try:
            losses.append(opt.step(closure).item())
        except RuntimeError as err:
            return {"error": str(err), "step": step}
    return {
        "model": model.state_dict(),
        "hypernet": opt.hypernet.state_dict(),
        "losses": losses,
        "adopted": opt._ddp is ddp,
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {mode: _train(mode, rank) for mode in ("ddp", "inner", "late", "foreign")}
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
