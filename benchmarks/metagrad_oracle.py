"""An oracle upper bound for MetaGrad's class of corrections, trained against plain.

    python -m benchmarks.metagrad_oracle --parallel 2     # plain INT4, vgg16 w0.25, 3 seeds
    python -m benchmarks.metagrad_oracle --grad-quant int4-nearest-channel --arms plain oracle

MetaGrad's hypernetwork maps each element of a layer's quantized weight gradient ``g_q`` to a
corrected one from that element's own values and layer-wide scales. The oracle does the best any
such map could: at every step it computes the full-precision gradient ``g`` of a larger batch
(this step's batch and ``--reference-batches - 1`` more, drawn by a second loader), and replaces
each quantized layer's ``g_q`` by the least-squares fit of ``g`` in the richest family of
:mod:`benchmarks.ceiling` (``gain+offset|sign(g),W``: per cell of ``|g_q|``'s quantile bin,
``sign(g_q)`` and the weight's signed bin, ``m g_q + a rms(g_q)``), refitted on that step alone.
Arms:

- ``plain``: ``metagrad train``'s plain training with the same quantizer;
- ``oracle``: the fit, rescaled to ``g_q``'s norm, as MetaGrad's hypernetwork output is: the
  bound for MetaGrad's class;
- ``oracle-ls``: the fit at its least-squares scale (it may shrink the step).

The oracle's reference passes restore the model's buffers and the random-number state, so with
its correction switched off it trains bit for bit as plain (tested): the arms differ by the
correction alone. Cells with fewer than :data:`MIN_CELL` elements keep the layer's
least-squares gain. A resumed oracle run draws its extra batches from its epoch's start again.

The comparison is fixed in advance: ``oracle - plain`` in final test accuracy, paired by seed
(:mod:`metagrad.stats`: mean, 95% CI, sign-flip p). If the oracle does not beat plain, no
hypernetwork of the class can; if it does, the gap bounds what MetaGrad leaves. Every run also
records, per step, the cosine to ``g`` of ``g_q`` and of the oracle's gradient (mean over layers).
Writes ``benchmarks/results/metagrad-oracle.json`` after every run (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.ceiling import GRAD_LEVELS, WEIGHT_LEVELS
from benchmarks.custom_runs import Job, fit_all
from benchmarks.methods import BASE as METHODS_BASE
from benchmarks.runner import command_line
from metagrad import stats
from metagrad.meta.diagnostics import full_precision_backward, untouched
from metagrad.nn.layers import quantized_weights
from metagrad.training.trainer import Trainer

BASE: dict[str, Any] = {**METHODS_BASE, "epochs": 3, "grad_quant": "plain"}
"""The methods benchmark's vgg16 setting, 3 epochs, INT4 stochastic per tensor (``plain``)."""
ARMS = ("plain", "oracle", "oracle-ls")
MIN_CELL = 32
"""Cells with fewer elements than this are not fitted alone (they take the layer's gain)."""
EXTRA_SEED = 7919
"""Seed offset of the loader that draws the reference's extra batches."""
EPS = 1e-30
COSINES = "oracle-cosines.json"
"""An oracle run's cosines to the reference over its steps, in its directory."""


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _bins(values: Tensor, levels: Sequence[float]) -> Tensor:
    """Index of each of ``values`` among the quantile edges of ``values`` at ``levels``."""
    ordered = values.sort().values
    idx = torch.tensor([round(q * (len(ordered) - 1)) for q in levels])
    return torch.bucketize(values, ordered[idx].unique(), right=True)


def oracle_correction(grad: Tensor, weight: Tensor, target: Tensor, norm: bool = True) -> Tensor:
    """The least-squares fit of ``target`` by ``m_k grad + a_k rms(grad)`` per cell ``k`` (the
    quantile bin of ``|grad|``, ``sign(grad)``, the signed quantile bin of ``weight``), shaped
    and typed like ``grad``; ``norm``: rescaled to ``grad``'s norm. An all-zero ``grad`` stays
    zero."""
    scale = _rms(grad.double())
    if scale == 0 or not torch.isfinite(scale):
        return grad.clone()
    u = (grad.double() / scale).flatten()
    t = (target.double() / scale).flatten()
    w = weight.double().flatten()
    w = w / _rms(w).clamp_min(EPS)
    weight_bin = _bins(w.abs(), WEIGHT_LEVELS) * 2 + (w < 0)
    cell = (_bins(u.abs(), GRAD_LEVELS) * 2 + (u < 0)) * (2 * len(WEIGHT_LEVELS) + 2) + weight_bin
    cells = int(cell.max()) + 1

    def total(x: Tensor | None = None) -> Tensor:
        return torch.bincount(cell, weights=x, minlength=cells).double()

    n, su, suu, st, sut = total(), total(u), total(u * u), total(t), total(u * t)
    gain = (u @ t) / (u @ u)  # the layer's least-squares multiple of the identity
    # per cell, the regression of t on u: slope cov/var, or the mean alone where u is constant
    count = n.clamp_min(1)
    mean_u, mean_t = su / count, st / count
    var = suu / count - mean_u**2
    varies = var > 1e-12 * suu / count
    slope = torch.where(varies, (sut / count - mean_u * mean_t) / var.clamp_min(EPS), 0.0)
    fitted = n >= MIN_CELL
    m = torch.where(fitted, slope, gain)
    a = torch.where(fitted, mean_t - slope * mean_u, 0.0)
    corrected = m[cell] * u + a[cell]
    if norm:
        corrected = corrected * (_rms(u) / _rms(corrected).clamp_min(EPS))
    return (corrected * scale).view_as(grad).to(grad.dtype)


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(EPS))


class OracleTrainer(Trainer):
    """``metagrad train``'s trainer, every quantized layer's weight gradient replaced by the
    oracle's before each optimizer step (``apply=False``: computed and recorded, not applied)."""

    def __init__(
        self, cfg: Any, *, reference_batches: int = 2, norm: bool = True, apply: bool = True
    ) -> None:
        if reference_batches < 1:
            raise ValueError(f"reference_batches must be >= 1, got {reference_batches}")
        self.reference_batches, self.norm, self.apply = reference_batches, norm, apply
        self.cosines: list[tuple[float, float]] = []  # per step: (g_q, oracle) to reference
        super().__init__(cfg)

    def _setup(self, cfg: Any, rank: int, world_size: int) -> None:
        super()._setup(cfg, rank, world_size)
        if world_size > 1:
            raise ValueError("the oracle trains in one process")
        rng = torch.get_rng_state()
        extra = dataclasses.replace(cfg, seed=cfg.seed + EXTRA_SEED, resume=False)
        self.extra_loader = self.task.train_loader(
            extra, self.data, self.model, self.device, (0, 1)
        )
        torch.set_rng_state(rng)
        self._extra_epoch, self._extra_batches = self.epoch, iter(())
        self.weights = [w for _, w in quantized_weights(self.model)]
        self.reference: list[Tensor] = []
        self.optimizer.register_step_pre_hook(lambda *_: self._correct())

    def _extra(self) -> tuple[Tensor, Tensor]:
        for _ in range(2):
            for x, y in self._extra_batches:
                return x.to(self.device), y.to(self.device)
            self._extra_batches = self.extra_loader.epoch(self._extra_epoch)
            self._extra_epoch += 1
        raise RuntimeError("the reference loader yields no batch")

    def train_step(self, x: Tensor, y: Tensor, global_size: int) -> tuple[float, int] | None:
        batches = [(x, y), *(self._extra() for _ in range(self.reference_batches - 1))]
        with untouched(self.model), full_precision_backward(self.model):
            self.model.zero_grad(set_to_none=True)
            for bx, by in batches:
                with torch.autocast(self.device.type, self.amp or torch.float32, bool(self.amp)):
                    out = self.model(bx)
                (self.task.loss(out, by) / len(batches)).backward()
            self.reference = [w.grad.detach().clone() for w in self.weights]
            self.model.zero_grad(set_to_none=True)
        return super().train_step(x, y, global_size)

    @torch.no_grad()
    def _correct(self) -> None:
        before, after = [], []
        for weight, target in zip(self.weights, self.reference, strict=True):
            if weight.grad is None:
                continue
            corrected = oracle_correction(weight.grad, weight, target, self.norm)
            before.append(_cosine(weight.grad, target))
            after.append(_cosine(corrected, target))
            if self.apply:
                weight.grad.copy_(corrected)
        if before:
            self.cosines.append((statistics.fmean(before), statistics.fmean(after)))

    def fit(self) -> dict[str, Any]:
        """Train, then write the cosines (:data:`COSINES`, means over 20 spans of steps)."""
        summary = super().fit()
        steps, spans = self.cosines, 20
        every = max(1, -(-len(steps) // spans))
        curve = [
            {
                "step": min(i + every, len(steps)),
                "quantized": statistics.fmean(s[0] for s in steps[i : i + every]),
                "oracle": statistics.fmean(s[1] for s in steps[i : i + every]),
            }
            for i in range(0, len(steps), every)
        ]
        (self.out / COSINES).write_text(json.dumps(curve, indent=1) + "\n")
        return summary


def arm_record(arm: str, record: dict[str, Any], out: Path) -> dict[str, Any]:
    """A run's record with its arm and, for an oracle arm, the mean cosines to the reference."""
    record = {"arm": arm, **record}
    if (out / COSINES).is_file():
        curve = json.loads((out / COSINES).read_text())
        record["cosine_to_reference"] = {
            k: statistics.fmean(c[k] for c in curve) for k in ("quantized", "oracle")
        }
    return record


def comparisons(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each oracle arm minus plain, paired by seed."""
    by_arm: dict[str, dict[int, float]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["final_test_acc"]
    out = {}
    for arm in ("oracle", "oracle-ls"):
        if arm in by_arm and "plain" in by_arm:
            out[f"{arm} - plain"] = stats.paired(by_arm[arm], by_arm["plain"]).to_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default="runs/metagrad-oracle")
    parser.add_argument("--output", default="benchmarks/results/metagrad-oracle.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["plain", "oracle"])
    parser.add_argument("--grad-quant", default=BASE["grad_quant"], help="a preset or spec")
    parser.add_argument("--epochs", type=int, default=BASE["epochs"])
    parser.add_argument("--reference-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each run early (smoke)")
    args = parser.parse_args()
    base = {**BASE, "grad_quant": args.grad_quant, "epochs": args.epochs, "data": args.data}
    base.update(threads=args.threads, progress=False, max_steps=args.max_steps)
    records: list[dict[str, Any]] = []

    def write() -> None:
        result = {
            "benchmark": "metagrad-oracle",
            "command": command_line(),
            "settings": {**base, "reference_batches": args.reference_batches},
            "comparisons": comparisons(records),
            "runs": sorted(records, key=lambda r: (r["seed"], ARMS.index(r["arm"]))),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    jobs = [
        Job(
            f"{arm}-s{seed}",
            {**base, "seed": seed, "out": f"{args.runs_dir}/{arm}-s{seed}"},
            Trainer if arm == "plain" else OracleTrainer,
            {}
            if arm == "plain"
            else {"reference_batches": args.reference_batches, "norm": arm == "oracle"},
        )
        for seed in args.seeds
        for arm in args.arms
    ]

    def add(job: Job, record: dict[str, Any]) -> None:
        records.append(arm_record(job.name.rsplit("-s", 1)[0], record, Path(job.settings["out"])))
        write()

    fit_all(jobs, args.parallel, add)
    for name, c in comparisons(records).items():
        print(f"{name}: {c['words']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
