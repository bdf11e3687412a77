"""MetaGrad in Lightning: returned by ``configure_optimizers``, run by automatic optimization.

Lightning passes a closure (``training_step``, ``zero_grad``, ``backward``) to
``optimizer.step``, which is what ``metagrad.MetaGrad.step`` needs: nothing else changes. The
module is a two-layer transformer language model on random tokens, converted by
``metagrad.quantize_`` to 4-bit stochastic gradients, trained a few steps on the CPU.

Gradient clipping goes in ``on_before_optimizer_step`` (it runs inside the closure, where
``self.parameters()`` yields the substituted weights and the gradients MetaGrad keeps), not in
``Trainer(gradient_clip_val=...)``: Lightning clips the optimizer's param groups, which misses
the meta weights' gradients.

With ``--ddp`` it trains on 2 CPU processes (``strategy="ddp"``, gloo). Lightning wraps the module
in ``DistributedDataParallel`` after ``configure_optimizers`` received the bare module; MetaGrad
finds the wrapper when the closure first runs through it and averages the gradients itself
(``metagrad.meta.wrapped``), so the ranks stay bit-identical: the run prints whether they are.

Run: ``python examples/lightning_metagrad.py [--ddp] [--out result.json]`` (needs
``pip install -e ".[integrations]"``).
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
from torch import nn

import metagrad as mg
from metagrad.parallel.distributed import shutdown

STEPS = 8
VOCAB, LENGTH, WIDTH = 32, 16, 32


class TinyLM(L.LightningModule):
    """Embedding, two pre-norm transformer layers (causal), a head; converted at construction."""

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        self.clip = clip
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH,
            nhead=2,
            dim_feedforward=2 * WIDTH,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.report = mg.quantize_(self, mg.QuantConfig(grad=mg.QuantSpec(bits=4)))
        self.losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.blocks(self.embed(ids), mask=mask, is_causal=True))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: mg.MetaGrad) -> None:
        nn.utils.clip_grad_norm_(self.parameters(), self.clip)

    def configure_optimizers(self) -> mg.MetaGrad:
        return mg.MetaGrad(self, lr=3e-3, base="adam", hyper_lr=1e-3)


class RankCheck(L.Callback):
    """At the end of training: whether every rank holds the same weights, bit for bit."""

    identical: bool | None = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        gathered = trainer.strategy.all_gather(flat).reshape(trainer.world_size, -1)
        self.identical = all(torch.equal(gathered[0], g) for g in gathered)


def fit(ddp: bool = False, steps: int = STEPS, clip: float = 1.0) -> dict:
    """Train ``TinyLM`` with MetaGrad for ``steps`` steps; its module, optimizer and losses."""
    torch.manual_seed(0)
    module = TinyLM(clip)
    ids = torch.randint(0, VOCAB, (8, LENGTH), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)
    check = RankCheck()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[check],
    )
    trainer.fit(module, loader)
    optimizer = trainer.optimizers[0]
    return {
        "module": module,
        "optimizer": optimizer,
        "losses": module.losses,
        "rank": trainer.global_rank,
        "ranks_identical": check.identical,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="2 CPU processes, strategy='ddp'")
    parser.add_argument("--out", help="write this rank-0 summary as JSON here")
    args = parser.parse_args(argv)
    run = fit(ddp=args.ddp)
    if run["rank"] == 0:
        summary = {
            "losses": run["losses"],
            "ranks_identical": run["ranks_identical"],
            "meta_weights": len(run["optimizer"].meta_params),
            "quantized_layers": len(mg.nn.layers.quantized_layers(run["module"])),
        }
        print(json.dumps(summary))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f)
    if args.ddp:
        # Lightning leaves the gloo group open, and the optimizer holds the DDP wrapper it
        # adopted: free both now, not at interpreter exit, where the group's threads can abort.
        run.clear()
        shutdown()
    return run


if __name__ == "__main__":
    main()
