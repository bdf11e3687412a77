"""MetaGrad's meta-gradients, recorded per step (:func:`meta_gradient_phases`), and whether they
are more than noise (:func:`meta_gradient_stats`); used by :mod:`benchmarks.metagrad_signal`.

``values`` holds one row per step and one column per hypernetwork parameter. Per parameter, the
``t`` of the mean uses batch means (``groups`` contiguous groups of steps), so that correlated
successive steps do not fake or hide a signal. Two references for "pure noise":

- :func:`null_reference` (the original one): ``parameters`` *independent* ``t`` values, and a
  binomial p for the count above 2. The parameters' meta-gradients are correlated (they share
  every step's batch), so it overstates the evidence.
- :func:`sign_flip_null`: every sign pattern of the batch means, one sign per group for all the
  parameters at once (exact over ``2**groups`` patterns up to 20 groups). It keeps the
  correlation between parameters and needs only that each group's mean vector be symmetric
  about zero under the null; with it come the parameters' correlation and their effective
  number (:func:`correlation_summary`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.data import ImageDataset
from metagrad.stats import MAX_EXACT, sign_patterns
from metagrad.training.config import build_config
from metagrad.training.setup import build_model, build_optimizer

NULL_SIMULATIONS = 20_000
SIGN_FLIP_DRAWS = 2**20
"""Random sign patterns when ``2**groups`` is too many to enumerate."""
CHUNK = 2**15


def _set_groups(optimizer: Any, **values: Any) -> None:
    for group in optimizer.param_groups:
        group.update(values)


@dataclasses.dataclass
class MetaRun:
    """One setting's MetaGrad run.

    ``phases``: per phase the hypernetwork's flattened parameter gradients, ``(steps,
    parameters)``, named by ``columns``; ``correction``: per phase the mean relative size of the
    hypernetwork's correction (``|H(g) - g| / |g|`` over the layers, at the phase's end);
    ``at_identity``: what ``measure_identity`` returned at the end of the identity phase.
    """

    phases: dict[str, Tensor]
    columns: list[str]
    correction: dict[str, float]
    at_identity: Any = None


def meta_gradient_phases(
    settings: dict[str, Any],
    data: ImageDataset,
    batches: Iterator[tuple[Tensor, Tensor]],
    warm: int,
    record: int,
    train: int,
    hyper_lr: float,
    trained: bool,
    momentum_check: bool,
    measure_identity: Callable[[nn.Module], Any] | None = None,
) -> MetaRun:
    """Run MetaGrad with ``settings`` on ``batches`` through its phases (the docs of
    :mod:`benchmarks.metagrad_signal`), recording meta-gradients."""
    cfg = build_config({**settings, "method": "metagrad", "hyper_lr": 0.0, "out": "x"})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    hypernet = optimizer.hypernet
    columns = [f"{name}[{i}]" for name, p in hypernet.named_parameters() for i in range(p.numel())]

    def run(steps: int, keep: bool) -> Tensor | None:
        rows = []
        for _ in range(steps):
            x, y = next(batches)

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)}")
            if keep:
                grads = [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                    for p in hypernet.parameters()
                ]
                rows.append(torch.cat(grads).double())
        return torch.stack(rows) if keep else None

    phases: dict[str, Tensor] = {}
    correction: dict[str, float] = {}
    run(warm, keep=False)
    phases["identity"] = run(record, keep=True)
    correction["identity"] = _correction_size(optimizer)
    at_identity = measure_identity(model) if measure_identity is not None else None
    if trained:
        _set_groups(optimizer.hyper_optimizer, lr=hyper_lr)
        run(train, keep=False)
        _set_groups(optimizer.hyper_optimizer, lr=0.0)
        phases["trained"] = run(record, keep=True)
        correction["trained"] = _correction_size(optimizer)
        if momentum_check:
            _set_groups(optimizer, momentum=0.0, nesterov=False)
            phases["trained-momentum0"] = run(record, keep=True)
            correction["trained-momentum0"] = _correction_size(optimizer)
    return MetaRun(phases, columns, correction, at_identity)


def _correction_size(optimizer: Any) -> float:
    pending = optimizer.pending_gradients()
    corrected = optimizer.corrected_gradients(pending)
    sizes = [
        float((corrected[p] - g).norm() / g.norm()) for p, g in pending.items() if g.norm() > 0
    ]
    return statistics.fmean(sizes) if sizes else math.nan


def t_tail(x: float, df: int) -> float:
    """``P(|T| > x)`` for Student's t with ``df`` degrees of freedom (Simpson's rule)."""
    n = 20_000
    t = torch.linspace(0.0, x, n + 1, dtype=torch.float64)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(t * t / df))
    weights = torch.ones(n + 1, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float(1 - 2 * (pdf * weights).sum() * (x / n) / 3)


def binomial_upper(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    if k <= 0:
        return 1.0
    if p <= 0 or p >= 1:
        return float(p >= 1)

    def log_term(j: int) -> float:
        log_comb = math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
        return log_comb + j * math.log(p) + (n - j) * math.log1p(-p)

    return min(1.0, sum(math.exp(log_term(j)) for j in range(k, n + 1)))


def null_reference(parameters: int, df: int, observed_count: int) -> dict[str, Any]:
    """Median ``|t|`` and count of ``|t| > 2`` for ``parameters`` independent ``t_df`` values."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t = torch.distributions.StudentT(float(df)).sample((NULL_SIMULATIONS, parameters))
    t = t.abs().double()
    levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    medians = t.median(dim=1).values
    counts = (t > 2).sum(1).double()
    p_single = t_tail(2.0, df)
    return {
        "parameters": parameters,
        "df": df,
        "median_abs_t_quantiles_5_50_95": torch.quantile(medians, levels).tolist(),
        "count_above_2_quantiles_5_50_95": torch.quantile(counts, levels).tolist(),
        "p_single_above_2": p_single,
        "binomial_p_count_at_least_observed": binomial_upper(observed_count, parameters, p_single),
    }


def meta_gradient_stats(values: Tensor, columns: list[str], groups: int) -> dict[str, Any]:
    """Batch-means ``t`` per parameter, naive ``t``, autocorrelation, sign test, noise reference.

    Parameters whose meta-gradient never varies (hidden layers behind the zero-initialised head
    at the identity, dead hidden units) are not tested.
    """
    tested = values.std(0) > 0
    names = [c for c, keep in zip(columns, tested.tolist(), strict=True) if keep]
    x = values[:, tested]
    steps = x.shape[0] - x.shape[0] % groups
    x = x[:steps]
    means = x.reshape(groups, steps // groups, -1).mean(1)
    se_batch = means.std(0) / groups**0.5
    se_naive = x.std(0) / steps**0.5
    mean = x.mean(0)
    t = mean / se_batch
    t_naive = mean / se_naive
    centred = x - mean
    lag1 = (centred[1:] * centred[:-1]).mean(0) / centred.square().mean(0)
    count = int((t.abs() > 2).sum())
    lags = range(1, steps // groups)
    acf_sum = sum((centred[k:] * centred[:-k]).mean(0) for k in lags) / centred.square().mean(0)
    positive = (x > 0).double().mean(0)
    sign_z = (positive - 0.5) / (0.5 / steps**0.5)
    half = steps // 2
    agree = x[:half].mean(0).sign() == x[half:].mean(0).sign()
    return {
        "steps": steps,
        "groups": groups,
        "parameters_tested": len(names),
        "parameters_zero": len(columns) - len(names),
        "median_abs_t": float(t.abs().median()),
        "count_abs_t_above_2": count,
        "max_abs_t": float(t.abs().max()),
        "median_abs_t_naive": float(t_naive.abs().median()),
        "count_abs_t_naive_above_2": int((t_naive.abs() > 2).sum()),
        "median_se_ratio_batch_over_naive": float((se_batch / se_naive).median()),
        "lag1_autocorrelation_median": float(lag1.median()),
        "lag1_autocorrelation_range": [float(lag1.min()), float(lag1.max())],
        "autocorrelation_sum_within_group_median": float(acf_sum.median()),
        "sign_test_median_abs_z": float(sign_z.abs().median()),
        "sign_test_count_abs_z_above_2": int((sign_z.abs() > 2).sum()),
        "halves_same_sign": int(agree.sum()),
        "t": dict(zip(names, t.tolist(), strict=True)),
        "noise_reference": null_reference(len(names), groups - 1, count),
        "sign_flip_null": sign_flip_null(values.numpy(), groups),
        "correlation": correlation_summary(values.numpy()),
    }


def batch_means(values: np.ndarray, groups: int) -> np.ndarray:
    """``(groups, parameters)`` means of contiguous groups of steps, over the parameters whose
    meta-gradient varies (the ones :func:`meta_gradient_stats` tests); the last
    ``steps % groups`` steps are left out."""
    x = values[:, values.std(0) > 0]
    steps = x.shape[0] - x.shape[0] % groups
    return x[:steps].reshape(groups, steps // groups, -1).mean(1)


def _abs_t(totals: np.ndarray, squares: np.ndarray, groups: int) -> np.ndarray:
    """``|t|`` of each parameter's batch means from their (sign-flipped) sum; the sum of squares
    does not change under sign flips."""
    mean = totals / groups
    variance = np.maximum(squares - groups * mean**2, 0.0) / (groups - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(mean) / np.sqrt(variance / groups)


def _lower_median(x: np.ndarray) -> np.ndarray:
    """The lower of the two middle values for an even count (``torch.median``'s rule)."""
    return np.partition(x, (x.shape[-1] - 1) // 2, axis=-1)[..., (x.shape[-1] - 1) // 2]


def sign_flip_null(values: np.ndarray, groups: int, seed: int = 0) -> dict[str, Any]:
    """The median ``|t|`` and the count of ``|t| > 2`` over the parameters, against the same
    statistics under every sign pattern of the batch means (one sign per group, shared by all
    parameters: their correlation is kept). ``p``: the share of patterns whose statistic is at
    least the observed one (the observed pattern included). Exact up to
    :data:`~metagrad.stats.MAX_EXACT` groups, else :data:`SIGN_FLIP_DRAWS` random patterns."""
    means = batch_means(np.asarray(values, dtype=np.float64), groups)
    squares = (means**2).sum(0)
    observed = _abs_t(means.sum(0), squares, groups)
    median, count = float(_lower_median(observed)), int((observed > 2).sum())
    exact = groups <= MAX_EXACT
    if exact:
        patterns = sign_patterns(groups)
    else:
        rng = np.random.default_rng(seed)
        patterns = rng.choice(np.array([-1, 1], dtype=np.int8), (SIGN_FLIP_DRAWS, groups))
    tolerance = 1e-9 * max(median, 1.0)
    at_least_median = at_least_count = 0
    quantiles_median, quantiles_count = [], []
    for start in range(0, len(patterns), CHUNK):
        t = _abs_t(patterns[start : start + CHUNK] @ means, squares, groups)
        medians, counts = _lower_median(t), (t > 2).sum(1)
        at_least_median += int((medians >= median - tolerance).sum())
        at_least_count += int((counts >= count).sum())
        quantiles_median.append(medians)
        quantiles_count.append(counts)
    levels = [0.05, 0.5, 0.95]
    return {
        "patterns": len(patterns),
        "exact": exact,
        "median_abs_t": median,
        "count_abs_t_above_2": count,
        "p_median_abs_t": at_least_median / len(patterns),
        "p_count_abs_t_above_2": at_least_count / len(patterns),
        "median_abs_t_quantiles_5_50_95": np.quantile(
            np.concatenate(quantiles_median), levels
        ).tolist(),
        "count_above_2_quantiles_5_50_95": np.quantile(
            np.concatenate(quantiles_count), levels
        ).tolist(),
    }


def correlation_summary(values: np.ndarray) -> dict[str, Any]:
    """How correlated the parameters' per-step meta-gradients are: the median and range of
    ``|r|`` over pairs, and the effective number of parameters ``(sum λ)² / sum λ²`` of their
    correlation matrix (``P`` for uncorrelated parameters, 1 for perfectly correlated ones)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[:, x.std(0) > 0]
    r = np.corrcoef(x, rowvar=False)
    pairs = np.abs(r[np.triu_indices_from(r, k=1)])
    return {
        "median_abs_r": float(np.median(pairs)),
        "abs_r_range": [float(pairs.min()), float(pairs.max())],
        "effective_parameters": float(r.shape[0] ** 2 / np.square(r).sum()),
    }


def reanalyse(steps: dict[str, Any], results: dict[str, Any], groups: int) -> list[str]:
    """Add :func:`sign_flip_null` and :func:`correlation_summary` to every phase of
    ``results["meta_gradients"]`` from the per-step meta-gradients ``steps["runs"]`` (the
    ``--steps-output`` file); the phases it updated."""
    done = []
    for name, phases in steps["runs"].items():
        for phase, recorded in phases.items():
            values = np.asarray(recorded["values"], dtype=np.float64)
            target = results["meta_gradients"][name][phase]
            target["sign_flip_null"] = sign_flip_null(values, groups)
            target["correlation"] = correlation_summary(values)
            done.append(f"{name} {phase}")
    return done
