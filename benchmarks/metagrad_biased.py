"""MetaGrad where a correction has the most to correct: a biased quantizer that still trains.

    python -m benchmarks.metagrad_biased --stage candidates --parallel 2
    python -m benchmarks.metagrad_biased --stage sweep --parallel 2
    python -m benchmarks.metagrad_biased --stage primary --parallel 2
    python -m benchmarks.metagrad_biased --stage diagnose --parallel 2

Stochastic rounding makes a quantized gradient unbiased, which leaves a correction little but
noise to remove; rounding to nearest biases it (small elements vanish, large ones shrink or
grow), a systematic error a learned map could undo. Three stages, each fixed here in advance,
on vgg16 at width 0.25 (CIFAR-10, bf16 autocast, SGD as ``benchmarks.methods``):

1. ``candidates`` (3 epochs, seed 0): full precision and plain training with each of
   :data:`CANDIDATES`. The chosen quantizer is the candidate whose plain run loses the most to
   full precision within 2-10 points (it must still train, and leave room to recover). The
   first five candidates all lost 55 points or more (rounding to nearest at 3-5 bits stops
   training here); the next four, finer ones, were added after that, and the last two when
   none of those lost 2-10 points either (``int6`` lost 11.6, ``int8`` 0.2, the block formats
   50 or more). When no candidate loses 2-10 points, the one losing least among those losing
   more (and still above chance by :data:`TRAINS` points) is chosen: a rule added when the
   eleven candidates fell on both sides of the window (``int7`` lost 0.5, ``int6`` 11.6).
2. ``sweep`` (3 epochs, seed 0) on the chosen quantizer: plain; MetaGrad with its default
   hypernetwork (``grad+weight``) and with the LSTM form, each at hyper-lr 1e-4, 3e-4 and 1e-3;
   and the learned per-layer gradient scale of :mod:`benchmarks.layer_scale` at the same three.
   The best setting is the MetaGrad run with the highest final accuracy. A control, added after
   every MetaGrad setting fell to chance on ``int6``: MetaGrad with its hypernetwork frozen at
   its initialisation (:data:`CONTROLS`; hyper-lr 0, the identity map), which tells a harm the
   hypernetwork learns from one its update scheme causes.
3. ``primary`` (6 epochs, seeds 0-4): MetaGrad at the sweep's best setting minus its base, for
   the chosen quantizer and for the two best 4-bit presets of ``methods.json`` (``rht-nvfp4``,
   ``rht-mxfp4``), and the best 4-bit preset minus full precision; each paired by seed
   (:mod:`metagrad.stats`: mean, 95% CI, sign-flip p over the 5 seeds). The runs go one
   comparison at a time, cheapest first, so that a stage stopped early has whole comparisons.
   A run that diverged counts at chance (:data:`CHANCE`, the accuracy of a model whose weights
   are not finite), not as missing: a rule added when MetaGrad's first runs on ``int6``
   diverged, since leaving them out would favour the method that diverges.

Two stages were added after the primary one, when MetaGrad broke training on the chosen
quantizer and beat ``rht-mxfp4`` on all five seeds:

4. ``control`` (6 epochs, seeds 0-4), on each of :data:`CONTROL_PRESETS`: MetaGrad with its
   hypernetwork frozen at the identity (:data:`CONTROLS`), which tells whether MetaGrad's gain
   there is learned by the hypernetwork or comes from its delayed-update scheme; and plain
   training on the preset's gradients pre-scaled by 3/4 (:data:`PRESCALE`, Tseng et al.'s fix of
   the bias that the OCP scale rule's clipping gives stochastic rounding, which the preset leaves
   out), which tells whether MetaGrad's gain is more than that fixed de-biasing. Each is paired
   by seed with plain training, with MetaGrad and with full precision.
5. ``diagnose`` (3 epochs, seed 0; deciding nothing): on the chosen quantizer and on each of
   :data:`CONTROL_PRESETS`, plain, MetaGrad at the sweep's best setting, and the same with the
   correction in its gain form (zero where the quantized gradient is zero), each with gradient
   diagnostics every :data:`DIAGNOSE_EVERY` steps (``--diag-every``: cosine of the quantized
   and of the used gradient with the full-precision one, and the correction's size
   ``|H(g) - g| / |g|``, :mod:`benchmarks.metagrad_ablations`) and, for MetaGrad, what its
   trained hypernetwork does to one element.

Writes ``benchmarks/results/metagrad-biased.json`` after every run, all stages in one file
(``--output``); every stage is resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.custom_runs import Job, fit_all
from benchmarks.goals import GOAL_4BIT
from benchmarks.layer_scale import LayerScaleTrainer
from benchmarks.metagrad_ablations import diagnostics, learned_response, steps_per_epoch
from benchmarks.methods import BASE as METHODS_BASE
from benchmarks.runner import command_line
from metagrad import stats
from metagrad.quant.presets import list_presets, preset_config
from metagrad.training.trainer import Trainer

BASE: dict[str, Any] = {**METHODS_BASE, "progress": False}
"""The methods benchmark's vgg16 setting (each stage sets its epochs)."""
CANDIDATES = (
    "int4:channel",  # INT4, one scale per output channel, to nearest
    "int4:sample",  # INT4, one scale per sample, to nearest
    "int3",  # INT3, one scale per tensor, to nearest
    "int5",  # INT5, one scale per tensor, to nearest
    "fp4_e2m1:block32:e8m0",  # MXFP4 without stochastic rounding
    # added when none of the above trained (each lost 55 points or more):
    "int6",  # INT6, one scale per tensor, to nearest
    "int8",  # INT8, one scale per tensor, to nearest
    "int4:block32",  # INT4, one scale per block of 32, to nearest
    "fp4_e2m1:block16:e4m3",  # NVFP4's format without stochastic rounding
    # added when none of the nine above lost 2-10 points:
    "int7",  # INT7, one scale per tensor, to nearest
    "int6:block32",  # INT6, one scale per block of 32, to nearest
)
GAP = (2.0, 10.0)
"""Points plain may lose to full precision for a candidate to be chosen."""
CHANCE = 10.0
"""Test accuracy (%) of a CIFAR-10 model that predicts one class: where a diverged run counts."""
TRAINS = 20.0
"""Points above :data:`CHANCE` a candidate must reach to count as training."""
HYPER_LRS = (1e-4, 3e-4, 1e-3)
SWEEP_EPOCHS, PRIMARY_EPOCHS = 3, 6
PRIMARY_SEEDS = (0, 1, 2, 3, 4)
PRESETS = ("rht-nvfp4", "rht-mxfp4")
"""The two best 4-bit presets of ``benchmarks/results/methods.json``, best first."""


DIAGNOSE_EVERY = 50
DIAGNOSE: dict[str, dict[str, Any]] = {
    "plain": {},
    "metagrad": {},
    "metagrad-gain": {"hyper_form": "gain"},
}
"""The diagnose stage's runs: ``plain`` or MetaGrad at the sweep's best setting, with these
settings on top."""
CONTROL_PRESETS = ("rht-mxfp4",)
"""The presets of the control stage (and diagnosed besides the chosen quantizer)."""
FROZEN = "frozen"
"""The control stage's label: MetaGrad with its hypernetwork frozen at the identity."""
PRESCALE = 0.75
"""The control stage's pre-scale of the preset's gradients (``pre0.75`` in a spec)."""
PRESCALED = f"pre{PRESCALE:g}"
"""The control stage's label: plain training on the pre-scaled preset."""


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


CONTROLS = ("metagrad-grad+weight-lr0",)
"""Sweep settings outside the choice of the best one: MetaGrad whose hypernetwork never learns."""


def sweep_names() -> list[str]:
    """The sweep's settings besides plain: ``metagrad-<kind>-lr<lr>`` and ``scale-lr<lr>``."""
    kinds = ("grad+weight", "lstm")
    names = [f"metagrad-{k}-lr{_lr_text(lr)}" for k in kinds for lr in HYPER_LRS]
    return names + [f"scale-lr{_lr_text(lr)}" for lr in HYPER_LRS]


def job(name: str, grad: str, seed: int, epochs: int, out: str) -> Job:
    """The run of setting ``name`` (``fp32``, ``plain``, a sweep name) on gradients ``grad``,
    in the folder ``out`` (whose name names the job)."""
    settings: dict[str, Any] = {**BASE, "epochs": epochs, "seed": seed, "out": out}
    if name != "fp32":  # a preset's name, or a spec string
        settings["grad_quant" if grad in list_presets() else "grad_spec"] = grad
    head, _, lr = name.partition("-lr")
    if head == "scale":
        return Job(Path(out).name, settings, LayerScaleTrainer, {"hyper_lr": float(lr)})
    if head.startswith("metagrad-"):
        settings.update(method="metagrad", hyper=head.removeprefix("metagrad-"))
        settings["hyper_lr"] = float(lr)
    return Job(Path(out).name, settings, Trainer)


def load(output: Path) -> dict[str, Any]:
    return json.loads(output.read_text()) if output.is_file() else {"runs": []}


def chosen_quantizer(runs: list[dict[str, Any]]) -> str | None:
    """The candidate whose plain run loses most within :data:`GAP`; if none does, the one losing
    least beyond it among those that train (None: not yet decided, or none trains)."""
    acc = {r["setting"]: r["final_test_acc"] for r in runs if r["stage"] == "candidates"}
    if "fp32" not in acc or any(c not in acc for c in CANDIDATES):
        return None
    gaps = {c: acc["fp32"] - acc[c] for c in CANDIDATES if acc[c] is not None}
    inside = {c: g for c, g in gaps.items() if GAP[0] <= g <= GAP[1]}
    if inside:
        return max(inside, key=inside.__getitem__)
    beyond = {c: g for c, g in gaps.items() if g > GAP[1] and acc[c] >= CHANCE + TRAINS}
    return min(beyond, key=beyond.__getitem__) if beyond else None


def best_setting(runs: list[dict[str, Any]]) -> str | None:
    """The sweep's MetaGrad setting with the highest final accuracy (None: not yet decided)."""
    sweep = {r["setting"]: r["final_test_acc"] for r in runs if r["stage"] == "sweep"}
    metagrad = [n for n in sweep_names() if n.startswith("metagrad-")]
    if any(n not in sweep for n in metagrad):
        return None
    return max(metagrad, key=lambda n: -1.0 if sweep[n] is None else sweep[n])


def final_accuracy(run: dict[str, Any]) -> float | None:
    """A run's final test accuracy; :data:`CHANCE` if it diverged (None: not finished)."""
    if run.get("diverged_at_step") is not None:
        return CHANCE
    return run["final_test_acc"]


def accuracies(
    runs: list[dict[str, Any]], stages: tuple[str, ...]
) -> dict[str, dict[int, float | None]]:
    """Each setting's final accuracy (:func:`final_accuracy`) by seed, over the runs of
    ``stages``."""
    by: dict[str, dict[int, float | None]] = {}
    for r in runs:
        if r["stage"] in stages:
            by.setdefault(r["setting"], {})[r["seed"]] = final_accuracy(r)
    return by


def primary_comparisons(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The primary comparisons, paired by seed."""
    by = accuracies(runs, ("primary",))
    pairs = [(f"metagrad+{q}", q) for q in by if f"metagrad+{q}" in by]
    if PRESETS[0] in by and "fp32" in by:
        pairs.append((PRESETS[0], "fp32"))
    return _compare(by, pairs)


def control_comparisons(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The control stage's comparisons, paired by seed, on each preset: the frozen hypernetwork
    and the pre-scaled preset against plain training, MetaGrad against each of them, and plain,
    pre-scaled and MetaGrad training against full precision."""
    by = accuracies(runs, ("primary", "control"))
    pairs = []
    for q in CONTROL_PRESETS:
        frozen, prescaled, metagrad = f"{FROZEN}+{q}", f"{PRESCALED}+{q}", f"metagrad+{q}"
        pairs += [(frozen, q), (metagrad, frozen), (prescaled, q), (metagrad, prescaled)]
        pairs += [(q, "fp32"), (prescaled, "fp32"), (metagrad, "fp32")]
    return _compare(by, [(a, b) for a, b in pairs if a in by and b in by])


def _compare(
    by: dict[str, dict[int, float | None]], pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """``a - b`` for each pair of settings, paired by seed (the goal where ``b`` is fp32)."""
    out = {}
    for a, b in pairs:
        goal = GOAL_4BIT if b == "fp32" else None
        out[f"{a} - {b}"] = stats.paired(by[a], by[b]).to_dict(goal)
    return out


def plan(stage: str, runs: list[dict[str, Any]], runs_dir: str) -> list[tuple[Job, str]]:
    """Every run of ``stage``: (job, setting), the setting naming what the comparisons pair."""
    planned: list[tuple[Job, str]] = []

    def add(name: str, grad: str, seed: int, epochs: int, label: str, folder: str = "") -> None:
        out = f"{runs_dir}/{stage}/{folder or name}-s{seed}"
        planned.append((job(name, grad, seed, epochs, out), label))

    def tag(q: str) -> str:
        return q.replace(":", "_")

    if stage == "candidates":
        add("fp32", "fp32", 0, SWEEP_EPOCHS, "fp32")
        for c in CANDIDATES:
            add("plain", c, 0, SWEEP_EPOCHS, c, f"plain-{tag(c)}")
        return planned
    quantizer = chosen_quantizer(runs)
    if quantizer is None:
        raise SystemExit(
            "no quantizer chosen: run --stage candidates first (or none of "
            f"{', '.join(CANDIDATES)} lost {GAP[0]:g}-{GAP[1]:g} points, or more and trained)"
        )
    if stage == "sweep":
        for name in ["plain", *sweep_names(), *CONTROLS]:
            add(name, quantizer, 0, SWEEP_EPOCHS, name)
        return planned
    best = best_setting(runs)
    if best is None:
        raise SystemExit("no best MetaGrad setting: run --stage sweep first")
    if stage == "diagnose":
        for q in (quantizer, *CONTROL_PRESETS):
            for label, extra in DIAGNOSE.items():
                name = label if q == quantizer else f"{label}+{q}"
                add("plain" if label == "plain" else best, q, 0, SWEEP_EPOCHS, name, name)
                planned[-1][0].settings.update(extra, diag_every=DIAGNOSE_EVERY)
        return planned
    if stage == "control":
        for q in CONTROL_PRESETS:
            for seed in PRIMARY_SEEDS:
                add(CONTROLS[0], q, seed, PRIMARY_EPOCHS, f"{FROZEN}+{q}", f"{FROZEN}-{tag(q)}")
            prescaled = str(dataclasses.replace(preset_config(q).grad, prescale=PRESCALE))
            for seed in PRIMARY_SEEDS:
                label = f"{PRESCALED}+{q}"
                add("plain", prescaled, seed, PRIMARY_EPOCHS, label, f"{PRESCALED}-{tag(q)}")
        return planned
    # one comparison's runs over all seeds before the next one's, cheapest first
    for seed in PRIMARY_SEEDS:
        add("plain", quantizer, seed, PRIMARY_EPOCHS, quantizer, f"plain-{tag(quantizer)}")
        add(
            best,
            quantizer,
            seed,
            PRIMARY_EPOCHS,
            f"metagrad+{quantizer}",
            f"metagrad-{tag(quantizer)}",
        )
    for seed in PRIMARY_SEEDS:
        add("fp32", "fp32", seed, PRIMARY_EPOCHS, "fp32")
        add("plain", PRESETS[0], seed, PRIMARY_EPOCHS, PRESETS[0], f"plain-{tag(PRESETS[0])}")
    for q in PRESETS:
        for seed in PRIMARY_SEEDS:
            if q != PRESETS[0]:
                add("plain", q, seed, PRIMARY_EPOCHS, q, f"plain-{tag(q)}")
            add(best, q, seed, PRIMARY_EPOCHS, f"metagrad+{q}", f"metagrad-{tag(q)}")
    return planned


def with_diagnostics(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """A diagnose run's record plus its gradient diagnostics per epoch and, for MetaGrad, what
    its trained hypernetwork does to one element."""
    gradients = out / "gradients.jsonl"  # absent if the run diverged before its first report
    if gradients.is_file():
        record = {**record, "gradients": diagnostics(gradients, steps_per_epoch(record, out))}
    if record["method"] == "metagrad":
        record["learned_response"] = learned_response(out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", choices=["candidates", "sweep", "primary", "control", "diagnose"], required=True
    )
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--runs-dir", default="runs/metagrad-biased")
    parser.add_argument("--output", default="benchmarks/results/metagrad-biased.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each run early (smoke)")
    args = parser.parse_args()
    output = Path(args.output)
    result = load(output)
    runs: list[dict[str, Any]] = result["runs"]
    planned = plan(args.stage, runs, args.runs_dir)
    for j, _ in planned:
        j.settings.update(data=args.data, threads=args.threads, max_steps=args.max_steps)
    labels = {id(j): label for j, label in planned}

    def add(j: Job, record: dict[str, Any]) -> None:
        label = labels[id(j)]
        if args.stage == "diagnose":
            record = with_diagnostics(record, Path(j.settings["out"]))
        key = (args.stage, label, record["seed"])
        runs[:] = [r for r in runs if (r["stage"], r["setting"], r["seed"]) != key]
        runs.append({**record, "stage": args.stage, "setting": label})
        result.update(
            benchmark="metagrad-biased",
            command=command_line(),
            settings={**BASE, "threads": args.threads},
            chosen_quantizer=chosen_quantizer(runs),
            best_setting=best_setting(runs),
            comparisons=primary_comparisons(runs),
            control_comparisons=control_comparisons(runs),
            runs=runs,
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")

    fit_all([j for j, _ in planned], args.parallel, add)
    print(f"chosen quantizer: {chosen_quantizer(runs)}")
    print(f"best MetaGrad setting: {best_setting(runs)}")
    for name, c in {**primary_comparisons(runs), **control_comparisons(runs)}.items():
        print(f"{name}: {c['words']}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
