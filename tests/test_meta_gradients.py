"""The signal benchmark's meta-gradient tests: the sign-flip null keeps the parameters'
correlation, and agrees with a brute-force enumeration."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.meta_gradients import (
    batch_means,
    correlation_summary,
    meta_gradient_stats,
    sign_flip_null,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _brute_force(values: np.ndarray, groups: int) -> tuple[float, float]:
    """p of the median |t| and of the count |t| > 2, every sign pattern by itertools, each t
    from numpy's own standard deviation."""
    means = batch_means(values, groups)

    def stats(m: np.ndarray) -> tuple[float, int]:
        t = np.abs(m.mean(0) / (m.std(0, ddof=1) / np.sqrt(groups)))
        return float(np.sort(t)[(t.size - 1) // 2]), int((t > 2).sum())

    median, count = stats(means)
    hits_median = hits_count = 0
    patterns = list(itertools.product((1, -1), repeat=groups))
    for signs in patterns:
        m, c = stats(np.asarray(signs)[:, None] * means)
        hits_median += m >= median - 1e-12
        hits_count += c >= count
    return hits_median / len(patterns), hits_count / len(patterns)


@pytest.mark.parametrize("seed", range(4))
def test_sign_flip_null_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(64, 1))
    values = 0.8 * shared + 0.6 * rng.normal(size=(64, 7)) + 0.15 * seed
    null = sign_flip_null(values, groups=8)
    assert null["exact"] and null["patterns"] == 256
    p_median, p_count = _brute_force(values, 8)
    assert null["p_median_abs_t"] == pytest.approx(p_median, abs=1e-12)
    assert null["p_count_abs_t_above_2"] == pytest.approx(p_count, abs=1e-12)


def test_perfectly_correlated_parameters_count_as_one():
    """Nine copies of one parameter: the count of |t| > 2 is 9 or 0 together, so its sign-flip
    p is the one parameter's, while the binomial reference for independent parameters calls
    the count overwhelming."""
    rng = np.random.default_rng(1)
    one = rng.normal(0.35, 1.0, size=(200, 1))
    values = np.repeat(one, 9, axis=1)
    stats = meta_gradient_stats(torch.from_numpy(values), [f"p{i}" for i in range(9)], 20)
    null = stats["sign_flip_null"]
    assert stats["count_abs_t_above_2"] == 9
    single = sign_flip_null(one, groups=20)
    assert null["p_count_abs_t_above_2"] == single["p_count_abs_t_above_2"] > 1e-4
    assert stats["noise_reference"]["binomial_p_count_at_least_observed"] < 1e-9
    assert stats["correlation"]["effective_parameters"] == pytest.approx(1.0)
    assert stats["correlation"]["median_abs_r"] == pytest.approx(1.0)


def test_the_observed_statistics_are_the_batch_means_t():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(400, 10)) + np.linspace(-0.2, 0.2, 10)
    values[:, 3] = 0.0  # never varies: not tested
    stats = meta_gradient_stats(torch.from_numpy(values), [f"p{i}" for i in range(10)], 20)
    null = stats["sign_flip_null"]
    assert stats["parameters_tested"] == 9
    assert null["median_abs_t"] == pytest.approx(stats["median_abs_t"], rel=1e-9)
    assert null["count_abs_t_above_2"] == stats["count_abs_t_above_2"]
    assert 0 < null["p_median_abs_t"] <= 1 and null["patterns"] == 2**20


def test_independent_parameters_have_about_as_many_effective_ones():
    rng = np.random.default_rng(3)
    summary = correlation_summary(rng.normal(size=(5000, 6)))
    assert summary["effective_parameters"] == pytest.approx(6, rel=0.02)
    assert summary["median_abs_r"] < 0.05


def test_more_groups_than_can_be_enumerated_draw_patterns():
    rng = np.random.default_rng(4)
    null = sign_flip_null(rng.normal(size=(44, 3)), groups=22)
    assert not null["exact"] and 0 < null["p_median_abs_t"] <= 1


def test_the_committed_reanalysis_is_what_the_recorded_steps_give():
    """metagrad-signal.json's sign-flip null of INT4 stochastic per tensor at the identity,
    recomputed from the per-step meta-gradients it was reanalysed from."""
    results = json.loads((RESULTS / "metagrad-signal.json").read_text())
    steps = json.loads((RESULTS / "metagrad-signal-steps.json").read_text())
    name, phase = "int4-stochastic-tensor", "identity"
    committed = results["meta_gradients"][name][phase]
    values = np.asarray(steps["runs"][name][phase]["values"])
    null = sign_flip_null(values, results["settings"]["groups"])
    for key in ("p_median_abs_t", "p_count_abs_t_above_2", "median_abs_t"):
        assert null[key] == pytest.approx(committed["sign_flip_null"][key], rel=1e-5)
    assert null["median_abs_t"] == pytest.approx(committed["median_abs_t"], rel=1e-4)
    assert committed["sign_flip_null"]["p_median_abs_t"] > 0.05  # not significant
    assert committed["noise_reference"]["binomial_p_count_at_least_observed"] < 0.05


@pytest.mark.slow
def test_recorded_phases_go_through_the_tests():
    """A few MetaGrad steps on random batches, recorded and tested as the benchmark does."""
    from benchmarks.meta_gradients import meta_gradient_phases
    from benchmarks.metagrad_signal import BASE
    from benchmarks.runner import synthetic_data

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)

    settings = {**BASE, "model": "small_cnn", "batch_size": 8, "grad_bits": 4}
    run = meta_gradient_phases(
        settings, synthetic_data(8), batches(), 1, 8, 1, 1e-3, trained=True, momentum_check=True
    )
    assert set(run.phases) == {"identity", "trained", "trained-momentum0"}
    stats = meta_gradient_stats(run.phases["trained"], run.columns, 4)
    assert stats["sign_flip_null"]["patterns"] == 16 and stats["sign_flip_null"]["exact"]
    assert 1 <= stats["correlation"]["effective_parameters"] <= stats["parameters_tested"]
