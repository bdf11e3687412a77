"""MetaGrad's learning signal, and what any coordinate-wise correction could recover at best.

    python -m benchmarks.metagrad_signal --data ../shared/data/cifar10-jpeg.zip --threads 1

vgg16 at width 0.25, batch 128, SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4), seed 0.

1. Ceiling and signal-to-noise ratio. Plain SGD with full-precision gradients runs; after each
   of ``--points`` and ``--ceiling-points`` steps, for each gradient quantizer
   (:data:`QUANTIZERS`), fixed probe batches give, per quantized layer, the full-precision and
   quantized weight gradients at the current weights. At ``--ceiling-points``,
   :func:`benchmarks.ceiling.coordinatewise_ceiling` fits each family of corrections on ``--fit``
   batches and scores it on ``--held-out`` others; at every point
   :func:`benchmarks.ceiling.snr_profile` bins the elements of one batch's gradient by ``|g|`` and
   gives the signal-to-noise ratio per bin, from ``--repeats`` quantized backward passes
   (stochastic rounding: the variance over the rounding draws) and from the squared error.
2. Meta-gradients. For each setting (:data:`META_SETTINGS`) MetaGrad runs ``--warm`` steps with
   a frozen identity hypernetwork (hypernetwork lr 0: plain quantized training), then records the
   gradient of every hypernetwork parameter for ``--record`` steps ("identity"). There, for the
   quantized settings, the ceiling and SNR profiles of the setting's own quantizer are measured
   again, on these weights trained with quantized gradients. For the trained settings the
   hypernetwork then trains at lr ``--hyper-lr`` for ``--train`` steps and is frozen again for
   ``--record`` recorded steps ("trained"), and for INT4 stochastic per tensor once more with the
   base rule's momentum at 0 ("trained-momentum0"). Per parameter, the ``t`` of the mean
   meta-gradient uses batch means (``--groups`` contiguous groups of steps, so that correlated
   successive meta-gradients do not fake or hide a signal). Two noise references
   (:mod:`benchmarks.meta_gradients`): the sign flips of the batch means, every pattern,
   one sign per group shared by all parameters, which keeps the parameters' correlation (the
   test to read), and the original one, simulated for as many *independent* parameters, with
   its binomial p (which overstates the evidence: the parameters' meta-gradients are strongly
   correlated; their correlation and effective number are recorded too). Also recorded: the
   naive ``t`` (steps taken as independent), autocorrelations, a sign test (share of steps with a
   positive meta-gradient, as ``z``) and how many parameters keep their sign across halves.

Writes ``benchmarks/results/metagrad-signal.json`` and the per-step meta-gradients to
``benchmarks/results/metagrad-signal-steps.json``. ``--reanalyse`` trains nothing: it adds the
sign-flip null and the correlations to ``--output`` from the per-step file (the committed results
were made before the sign-flip null existed and were reanalysed so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.ceiling import SNRProfile, coordinatewise_ceiling, snr_profile
from benchmarks.meta_gradients import meta_gradient_phases, meta_gradient_stats, reanalyse
from benchmarks.runner import command_line
from metagrad.data import BatchLoader, ImageDataset, load_cifar10
from metagrad.meta.diagnostics import gradient_draws, paired_gradients
from metagrad.nn.layers import quantized_layers
from metagrad.quant.spec import QuantSpec
from metagrad.training.config import build_config
from metagrad.training.setup import build_model, build_optimizer

BASE: dict[str, Any] = {
    "model": "vgg16",
    "width": 0.25,
    "batch_size": 128,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "hyper": "grad+weight",
    "hyper_hidden": 8,
    "seed": 0,
}
QUANTIZERS: dict[str, QuantSpec] = {
    "int4-stochastic-tensor": QuantSpec(4, "stochastic", "tensor"),
    "int4-stochastic-sample": QuantSpec(4, "stochastic", "sample"),
    "int4-nearest-tensor": QuantSpec(4, "nearest", "tensor"),
    "int4-nearest-sample": QuantSpec(4, "nearest", "sample"),
    "int8-nearest-tensor": QuantSpec(8, "nearest", "tensor"),
}
META_SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"grad_bits": 32},
    "int4-stochastic-tensor": {"grad_bits": 4, "grad_rounding": "stochastic"},
    "int4-stochastic-sample": {
        "grad_bits": 4,
        "grad_rounding": "stochastic",
        "grad_granularity": "sample",
    },
    "int4-nearest-sample": {
        "grad_bits": 4,
        "grad_rounding": "nearest",
        "grad_granularity": "sample",
    },
}
TRAINED = ("int4-stochastic-tensor", "int4-nearest-sample")
MOMENTUM_CHECK = "int4-stochastic-tensor"
SMALL_FAMILIES = ("gain", "gain|sign(gW)")
"""Families whose shared correction (gains per bin) is written out."""


def _loader(data: ImageDataset, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    loader = BatchLoader(
        data.train_images,
        data.train_labels,
        BASE["batch_size"],
        mean=data.mean,
        std=data.std,
        shuffle=True,
        augment=True,
        seed=seed,
    )
    return (batch for epoch in range(10**6) for batch in loader.epoch(epoch))


# ------------------------------------------------------------------------------------------
# 1. Ceiling and signal-to-noise ratio along plain training
# ------------------------------------------------------------------------------------------


@contextmanager
def gradient_quantizer(model: nn.Module, spec: QuantSpec) -> Iterator[None]:
    """Quantize the backward errors of every quantized layer with ``spec`` inside the block."""
    layers = [layer for _, layer in quantized_layers(model)]
    configs = [layer.config for layer in layers]
    for layer, config in zip(layers, configs, strict=True):
        layer.config = dataclasses.replace(config, grad=spec)
    try:
        yield
    finally:
        for layer, config in zip(layers, configs, strict=True):
            layer.config = config


def measure(
    model: nn.Module,
    probes: list[tuple[Tensor, Tensor]],
    spec: QuantSpec,
    fit: int,
    repeats: int,
    with_ceiling: bool = True,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The ceiling (if ``with_ceiling``) and SNR profiles of quantizer ``spec`` at these weights.

    The first ``fit`` probe batches fit the corrections, the others score them; the SNR comes
    from the first probe batch.
    """
    weights = {name: layer.weight.detach().clone() for name, layer in quantized_layers(model)}
    ceiling = None
    with gradient_quantizer(model, spec):
        if with_ceiling:
            pairs = [paired_gradients(model, x, y) for x, y in probes]
            batches = {
                layer: [(p[layer][1], p[layer][0], w) for p in pairs]
                for layer, w in weights.items()
            }
            ceiling = coordinatewise_ceiling(
                {k: v[:fit] for k, v in batches.items()},
                {k: v[fit:] for k, v in batches.items()},
            )
        draws = gradient_draws(model, *probes[0], repeats if spec.rounding == "stochastic" else 1)
    record = None
    if ceiling is not None:
        record = ceiling.to_dict(corrections=True)
        for family, result in record["families"].items():
            if family not in SMALL_FAMILIES:
                result["shared"].pop("correction", None)
    profiles = {
        layer: snr_profile(full, stacked)
        for layer, (full, stacked) in draws.items()
        if full.ne(0).any()
    }
    snr = {
        "summary": _snr_summary(profiles),
        "layers": {layer: p.to_dict() for layer, p in profiles.items()},
    }
    return record, snr


def measure_point(
    model: nn.Module,
    probes: list[tuple[Tensor, Tensor]],
    fit: int,
    repeats: int,
    with_ceiling: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SNR profiles (and with ``with_ceiling`` the ceiling) per quantizer at the current weights."""
    ceilings, snrs = {}, {}
    for name, spec in QUANTIZERS.items():
        ceiling, snrs[name] = measure(model, probes, spec, fit, repeats, with_ceiling)
        if ceiling is not None:
            ceilings[name] = ceiling
        _print_point(name, ceiling, snrs[name]["summary"])
    return ceilings, snrs


def _snr_summary(profiles: dict[str, SNRProfile]) -> dict[str, Any]:
    """Slopes of log SNR on log size over the layers, and the pooled profile.

    The pooled profile is, per bin, the geometric mean over layers of the bin's ratio relative to
    the layer's overall ratio (every layer has the same quantile levels; layers with fewer bins,
    from tied edges, or with a bin without noise are left out of it).
    """
    out: dict[str, Any] = {"layers": len(profiles)}
    bins = max(len(p.size) for p in profiles.values())
    for kind in ("variance", "mse"):
        slopes = [getattr(p, f"slope_{kind}") for p in profiles.values()]
        slopes = [s for s in slopes if s is not None and math.isfinite(s)]
        if not slopes:
            continue
        out[f"slope_{kind}"] = {
            "median": statistics.median(slopes),
            "min": min(slopes),
            "max": max(slopes),
        }
        relative = []
        for p in profiles.values():
            ratios, overall = getattr(p, f"snr_{kind}"), getattr(p, f"overall_{kind}")
            if len(ratios) == bins and all(0 < v < math.inf for v in [*ratios, overall]):
                relative.append([math.log(v / overall) for v in ratios])
        if relative:
            out[f"relative_snr_{kind}"] = [
                math.exp(statistics.fmean(column)) for column in zip(*relative, strict=True)
            ]
            out[f"relative_snr_{kind}_layers"] = len(relative)
        out[f"overall_{kind}_median"] = statistics.median(
            getattr(p, f"overall_{kind}") for p in profiles.values()
        )
    out["kurtosis_median"] = statistics.median(p.kurtosis for p in profiles.values())
    return out


def _print_point(name: str, ceiling: dict[str, Any] | None, snr: dict[str, Any]) -> None:
    slope = snr.get("slope_variance", snr.get("slope_mse", {})).get("median", math.nan)
    line = f"  {name}: SNR slope median {slope:.2f}"
    if ceiling is not None:
        best_name, best = max(
            ceiling["families"].items(), key=lambda f: f[1]["shared"]["pooled"]["held_out"]
        )
        pooled = best["shared"]["pooled"]
        line += (
            f"; identity {ceiling['identity']['pooled']['held_out']:.4f} held out, best shared "
            f"{best_name} {pooled['fit']:.4f} fit / {pooled['held_out']:.4f} held out; "
            f"{len(ceiling['excluded_layers'])} layers excluded"
        )
    print(line, flush=True)


def probe_batches(data: ImageDataset, count: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed training batches (another shuffle than training's) that every measurement uses."""
    stream = _loader(data, BASE["seed"] + 1)
    return [next(stream) for _ in range(count)]


def ceiling_and_snr(
    data: ImageDataset,
    probes: list[tuple[Tensor, Tensor]],
    points: list[int],
    ceiling_points: list[int],
    fit: int,
    repeats: int,
) -> dict[str, Any]:
    """Plain full-precision SGD, measured at each of ``points`` (steps done)."""
    cfg = build_config({**BASE, "method": "plain", "grad_bits": 32, "out": "unused"})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    batches = _loader(data, cfg.seed)
    ceilings, snrs, losses = {}, {}, []
    last = max(points + ceiling_points)
    for step in range(last + 1):
        if step in points or step in ceiling_points:
            print(f"step {step}:", flush=True)
            ceiling, snrs[str(step)] = measure_point(
                model, probes, fit, repeats, step in ceiling_points
            )
            if ceiling:
                ceilings[str(step)] = ceiling
        if step == last:
            break
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    recent = losses[-50:] or [math.nan]
    return {"ceiling": ceilings, "snr": snrs, "final_train_loss_mean50": statistics.fmean(recent)}


# ------------------------------------------------------------------------------------------
# 2. Meta-gradients
# ------------------------------------------------------------------------------------------


def meta_gradients(
    data: ImageDataset, probes: list[tuple[Tensor, Tensor]], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Meta-gradient statistics and per-step values per setting and phase.

    Also, for each quantized setting, the ceiling and SNR profiles of its own quantizer at the
    end of the identity phase: on weights trained with those quantized gradients.
    """
    results, steps, quantized_training = {}, {}, {}
    for name, settings in META_SETTINGS.items():
        spec = QUANTIZERS.get(name)

        def at_identity(model: nn.Module, spec: QuantSpec | None = spec) -> Any:
            if spec is None:
                return None
            return measure(model, probes, spec, args.fit, args.repeats)

        run = meta_gradient_phases(
            {**BASE, **settings},
            data,
            _loader(data, BASE["seed"]),
            args.warm,
            args.record,
            args.train,
            args.hyper_lr,
            trained=name in TRAINED,
            momentum_check=name == MOMENTUM_CHECK,
            measure_identity=at_identity,
        )
        if run.at_identity is not None:
            ceiling, snr = run.at_identity
            quantized_training[name] = {
                "steps": args.warm + args.record,
                "ceiling": ceiling,
                "snr": snr,
            }
            _print_point(
                f"{name} after {args.warm + args.record} quantized steps", ceiling, snr["summary"]
            )
        results[name], steps[name] = {}, {}
        for phase, values in run.phases.items():
            stats = meta_gradient_stats(values, run.columns, args.groups)
            stats["correction_size"] = run.correction[phase]
            results[name][phase] = stats
            steps[name][phase] = {
                "columns": run.columns,
                "values": [[float(f"{v:.6g}") for v in row] for row in values.tolist()],
            }
            _print_meta(name, phase, stats)
    return results, steps, quantized_training


def _print_meta(name: str, phase: str, stats: dict[str, Any]) -> None:
    ref, flips = stats["noise_reference"], stats["sign_flip_null"]
    low, _, high = ref["median_abs_t_quantiles_5_50_95"]
    print(
        f"{name} {phase}: median |t| {stats['median_abs_t']:.2f} (noise 5-95%: {low:.2f}-"
        f"{high:.2f}), |t| > 2 for {stats['count_abs_t_above_2']} of "
        f"{stats['parameters_tested']} (binomial p "
        f"{ref['binomial_p_count_at_least_observed']:.3g}, sign flips p "
        f"{flips['p_median_abs_t']:.3g} / {flips['p_count_abs_t_above_2']:.3g}); naive median |t| "
        f"{stats['median_abs_t_naive']:.2f}; sign test median |z| "
        f"{stats['sign_test_median_abs_z']:.2f}; correction {stats['correction_size']:.4f}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------


def _significant(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (for the JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_significant(v, digits) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--output", default="benchmarks/results/metagrad-signal.json")
    parser.add_argument("--steps-output", default="benchmarks/results/metagrad-signal-steps.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--points", default="0,300,1000", help="plain SGD steps: SNR")
    parser.add_argument("--ceiling-points", default="300,1000", help="plain SGD steps: ceiling")
    parser.add_argument("--fit", type=int, default=4, help="probe batches to fit on")
    parser.add_argument("--held-out", type=int, default=4, help="probe batches to score on")
    parser.add_argument("--repeats", type=int, default=16, help="stochastic backward passes")
    parser.add_argument("--warm", type=int, default=200, help="MetaGrad steps before recording")
    parser.add_argument("--record", type=int, default=400, help="steps recorded per phase")
    parser.add_argument("--train", type=int, default=300, help="hypernetwork training steps")
    parser.add_argument("--hyper-lr", type=float, default=1e-3, help="hypernetwork lr (Adam)")
    parser.add_argument("--groups", type=int, default=20, help="batch means per t statistic")
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="train nothing: add the sign-flip null to --output from --steps-output",
    )
    args = parser.parse_args()
    if args.reanalyse:
        output = Path(args.output)
        results = json.loads(output.read_text())
        steps = json.loads(Path(args.steps_output).read_text())
        done = reanalyse(steps, results, results["settings"]["groups"])
        results["reanalysed"] = {
            "command": command_line(),
            "what": "sign_flip_null and correlation of every meta-gradient phase, "
            "from the per-step meta-gradients of " + str(args.steps_output),
        }
        output.write_text(json.dumps(_significant(results), indent=1) + "\n")
        print(f"reanalysed {len(done)} phases into {output}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    points = sorted({int(p) for p in args.points.split(",")})
    ceiling_points = sorted({int(p) for p in args.ceiling_points.split(",")})
    data = load_cifar10(args.data)
    wall: dict[str, float] = {}
    start = time.perf_counter()
    probes = probe_batches(data, args.fit + args.held_out)
    along = ceiling_and_snr(data, probes, points, ceiling_points, args.fit, args.repeats)
    wall["ceiling_and_snr"] = time.perf_counter() - start
    start = time.perf_counter()
    meta, steps, quantized_training = meta_gradients(data, probes, args)
    wall["meta_gradients"] = time.perf_counter() - start
    record = {
        "benchmark": "metagrad-signal",
        "command": command_line(),
        "settings": {
            **BASE,
            "points": points,
            "ceiling_points": ceiling_points,
            "fit_batches": args.fit,
            "held_out_batches": args.held_out,
            "repeats": args.repeats,
            "quantizers": {n: dataclasses.asdict(s) for n, s in QUANTIZERS.items()},
            "warm_steps": args.warm,
            "recorded_steps": args.record,
            "hyper_train_steps": args.train,
            "hyper_lr_trained": args.hyper_lr,
            "groups": args.groups,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_seconds": wall,
        **along,
        "quantized_training": quantized_training,
        "meta_gradients": meta,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(_significant(record), indent=1) + "\n")
    steps_output = Path(args.steps_output)
    steps_output.write_text(json.dumps({"command": record["command"], "runs": steps}) + "\n")
    print(f"wrote {output} and {steps_output} in {sum(wall.values()):.0f} s")


if __name__ == "__main__":
    main()
