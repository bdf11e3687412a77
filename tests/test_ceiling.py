"""Tests for the coordinate-wise correction ceiling and the SNR profile (benchmarks.ceiling)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.ceiling import (
    FAMILIES,
    GRAD_LEVELS,
    Family,
    LayerBatch,
    coordinatewise_ceiling,
    snr_profile,
)
from metagrad import QuantConfig, QuantSpec, quantize
from metagrad.meta.diagnostics import gradient_draws
from metagrad.models import create_model

GAINS = (0.1, 0.5, 1.0)
NOISE = (1.2, 1.0, 0.8)
THRESHOLDS = (1.0, 2.5)


def _laplace(n: int, gen: torch.Generator) -> torch.Tensor:
    """Laplace(0, 1) samples: an exponential magnitude with a random sign."""
    magnitude = -torch.rand(n, generator=gen, dtype=torch.float64).log()
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return magnitude * sign


def _binned_gain_layer(n: int, gen: torch.Generator) -> LayerBatch:
    """``g_q`` Laplace; ``g = k_b g_q + s_b * N(0, 1)`` with ``b`` the bin of ``|g_q|``."""
    q = _laplace(n, gen)
    b = (q.abs() >= THRESHOLDS[0]).long() + (q.abs() >= THRESHOLDS[1]).long()
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    full = torch.tensor(GAINS, dtype=torch.float64)[b] * q
    full = full + torch.tensor(NOISE, dtype=torch.float64)[b] * noise
    return q, full, torch.randn(n, generator=gen, dtype=torch.float64)


def _known_optimum() -> tuple[float, float, tuple[float, float]]:
    """``(best cosine, identity's cosine, quantile levels of the thresholds)``, in closed form.

    With ``q = g_q ~ Laplace(0, 1)``, ``|q| ~ Exp(1)``; bin ``b`` is ``lo_b <= |q| < hi_b`` and
    ``g = k_b q + s_b e``, ``e ~ N(0, 1)`` independent. Per bin:
    ``P_b = e^-lo - e^-hi`` and ``Q_b = E[q^2; b] = [-(x^2 + 2x + 2) e^-x]_lo^hi``.
    For any correction ``c(q)``, ``E[c g] = E[c E[g|q]] <= sqrt(E c^2) sqrt(E E[g|q]^2)``
    (Cauchy-Schwarz), with equality iff ``c`` is proportional to ``E[g|q] = k_b q``. So the
    best cosine is ``sqrt(sum k_b^2 Q_b / sum (k_b^2 Q_b + s_b^2 P_b))``, reached by the
    per-bin gains ``m_b = k_b`` (their least-squares scale, ``E[q g; b] / E[q^2; b]``). The
    identity's cosine is ``sum k_b Q_b / sqrt(E[q^2] sum (k_b^2 Q_b + s_b^2 P_b))``,
    ``E[q^2] = 2``; the thresholds sit at quantile levels ``1 - e^-t`` of ``|q|``.
    """
    bounds = (0.0, *THRESHOLDS, math.inf)

    def second_moment(x: float) -> float:
        return 0.0 if math.isinf(x) else -(x * x + 2 * x + 2) * math.exp(-x)

    signal = noise = cross = 0.0
    for k, s, lo, hi in zip(GAINS, NOISE, bounds, bounds[1:], strict=False):
        p = math.exp(-lo) - (0.0 if math.isinf(hi) else math.exp(-hi))
        q2 = second_moment(hi) - second_moment(lo)
        signal += k * k * q2
        noise += s * s * p
        cross += k * q2
    best = math.sqrt(signal / (signal + noise))
    identity = cross / math.sqrt(2 * (signal + noise))
    levels = tuple(1 - math.exp(-t) for t in THRESHOLDS)
    return best, identity, levels


def test_recovers_the_known_best_cosine_and_gains() -> None:
    gen = torch.Generator().manual_seed(0)
    best, identity, levels = _known_optimum()
    assert best - identity > 0.03  # the case has something to recover
    fit = {"a": [_binned_gain_layer(400_000, gen)], "b": [_binned_gain_layer(400_000, gen)]}
    held = {"a": [_binned_gain_layer(400_000, gen)], "b": [_binned_gain_layer(400_000, gen)]}
    ceiling = coordinatewise_ceiling(fit, held, [Family("gain")], grad_levels=levels)
    assert ceiling.pooled_identity.held_out == pytest.approx(identity, abs=0.005)
    family = ceiling.families["gain"]
    for name in ("a", "b"):
        assert family.per_layer[name].held_out == pytest.approx(best, abs=0.005)
        assert family.shared[name].held_out == pytest.approx(best, abs=0.005)
        gains = family.layer_corrections[name].gain.flatten()
        assert gains.tolist() == pytest.approx(GAINS, abs=0.03)
    assert family.shared_correction.gain.flatten().tolist() == pytest.approx(GAINS, abs=0.02)
    assert family.pooled_shared.held_out == pytest.approx(best, abs=0.005)


def test_fine_default_bins_and_richer_families_also_reach_the_best_cosine() -> None:
    gen = torch.Generator().manual_seed(1)
    best, _, levels = _known_optimum()
    fit = {"a": [_binned_gain_layer(400_000, gen)]}
    held = {"a": [_binned_gain_layer(400_000, gen)]}
    ceiling = coordinatewise_ceiling(fit, held, grad_levels=sorted({*GRAD_LEVELS, *levels}))
    for family in ceiling.families.values():
        assert family.pooled_per_layer.held_out == pytest.approx(best, abs=0.005)


def _proportional_noise(n: int, gen: torch.Generator) -> LayerBatch:
    """``g = g_q + 0.9 |g_q| e``: ``E[g | g_q] = g_q``, the identity is the best correction."""
    q = _laplace(n, gen)
    full = q + 0.9 * q.abs() * torch.randn(n, generator=gen, dtype=torch.float64)
    return q, full, torch.randn(n, generator=gen, dtype=torch.float64)


def _pure_noise(n: int, gen: torch.Generator) -> LayerBatch:
    """``g`` independent of ``g_q``: nothing to recover."""
    return _laplace(n, gen), _laplace(n, gen), torch.randn(n, generator=gen, dtype=torch.float64)


def _forward_heavy_tailed(n: int, gen: torch.Generator) -> LayerBatch:
    """``g`` Student-t (3 dof), ``g_q = g + 0.935 |g| e``: noise proportional to the signal."""
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(3, n, generator=gen, dtype=torch.float64).square().sum(0)
    full = normal / (chi2 / 3).sqrt()
    q = full + 0.935 * full.abs() * torch.randn(n, generator=gen, dtype=torch.float64)
    return q, full, torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_below_the_identity_on_fit_data(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    makers = {
        "proportional": (_proportional_noise, 3000),
        "pure_noise": (_pure_noise, 2000),
        "heavy": (_forward_heavy_tailed, 5000),
        "tiny1": (_pure_noise, 1),
        "tiny3": (_proportional_noise, 3),
        "tiny9": (_binned_gain_layer, 9),
    }
    fit = {name: [make(n, gen) for _ in range(3)] for name, (make, n) in makers.items()}
    held = {name: [make(n, gen) for _ in range(2)] for name, (make, n) in makers.items()}
    ceiling = coordinatewise_ceiling(fit, held)
    assert not ceiling.excluded
    for family in ceiling.families.values():
        for name, identity in ceiling.identity.items():
            assert family.per_layer[name].fit >= identity.fit - 1e-12, (family.family, name)
            assert math.isfinite(family.per_layer[name].held_out)
        assert family.pooled_shared.fit >= ceiling.pooled_identity.fit - 1e-12
        assert family.pooled_per_layer.fit >= ceiling.pooled_identity.fit - 1e-12


def test_all_zero_layers_and_batches_are_skipped_and_counted() -> None:
    gen = torch.Generator().manual_seed(3)
    zero = torch.zeros(500, dtype=torch.float64)
    good = [_proportional_noise(500, gen) for _ in range(4)]
    fit = {
        "zero_quantized": [(zero, _laplace(500, gen), zero)] * 2,
        "zero_full": [(_laplace(500, gen), zero, zero)] * 2,
        "one_zero_batch": [good[0], (zero, good[1][1], good[1][2])],
        "good": good[2:],
    }
    held = {
        "zero_quantized": [(zero, _laplace(500, gen), zero)],
        "zero_full": [(_laplace(500, gen), zero, zero)],
        "one_zero_batch": [_proportional_noise(500, gen)],
        "good": [_proportional_noise(500, gen)],
    }
    ceiling = coordinatewise_ceiling(fit, held)
    assert ceiling.excluded == ["zero_quantized", "zero_full"]
    assert ceiling.skipped == {"zero_quantized": 3, "zero_full": 3, "one_zero_batch": 1, "good": 0}
    assert set(ceiling.identity) == {"one_zero_batch", "good"}
    record = ceiling.to_dict(corrections=True)
    values = [ceiling.pooled_identity.fit, ceiling.pooled_identity.held_out]
    for family in ceiling.families.values():
        values += [family.pooled_shared.fit, family.pooled_shared.held_out]
        values += [family.pooled_per_layer.fit, family.pooled_per_layer.held_out]
        assert torch.isfinite(family.shared_correction.gain).all()
    assert all(math.isfinite(v) and abs(v) <= 1 for v in values)
    assert record["excluded_layers"] == ["zero_quantized", "zero_full"]


def _old_additive_table(fit: list[LayerBatch], held: list[LayerBatch]) -> float:
    """The review's estimator: an additive 64 x 8 table of mean residuals, by pooled error."""

    def normalised(batch: LayerBatch) -> tuple[torch.Tensor, ...]:
        q, full, w = batch
        scale = q.square().mean().sqrt()
        return q / scale, w / w.square().mean().sqrt(), full / scale

    g, w, target = (torch.cat(parts) for parts in zip(*map(normalised, fit), strict=True))
    levels = torch.linspace(0, 1, 65, dtype=torch.float64)[1:-1]
    g_edges, w_edges = torch.quantile(g, levels), torch.quantile(w, levels[7::8])

    def cells(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(g, g_edges) * 9 + torch.bucketize(w, w_edges)

    index = cells(g, w)
    sums = torch.zeros(65 * 9, dtype=torch.float64).index_add_(0, index, target - g)
    table = sums / torch.bincount(index, minlength=65 * 9).clamp_min(1)
    scores = []
    for batch in held:
        u, w, t = normalised(batch)
        scores.append(float(F.cosine_similarity(u + table[cells(u, w)], t, dim=0)))
    return sum(scores) / len(scores)


def test_the_old_additive_estimators_shortfall_is_gone() -> None:
    """Heavy-tailed gradients, noise proportional to the signal: the old table lost 0.03."""
    gen = torch.Generator().manual_seed(4)
    fit = [_forward_heavy_tailed(200_000, gen) for _ in range(2)]
    held = [_forward_heavy_tailed(200_000, gen) for _ in range(2)]
    ceiling = coordinatewise_ceiling({"a": fit}, {"a": held})
    identity = ceiling.pooled_identity.held_out
    assert _old_additive_table(fit, held) < identity - 0.02
    for family in ceiling.families.values():
        assert family.pooled_per_layer.held_out > identity - 0.003, family.family
        assert family.pooled_shared.held_out > identity - 0.003, family.family


def test_the_shared_fit_weighs_layers_equally() -> None:
    """A large layer where the identity is best and a small one where shrinkage pays."""
    gen = torch.Generator().manual_seed(5)
    fit = {
        "large": [_proportional_noise(200_000, gen)],
        "small": [_binned_gain_layer(20_000, gen) for _ in range(4)],
    }
    held = {
        "large": [_proportional_noise(200_000, gen)],
        "small": [_binned_gain_layer(20_000, gen) for _ in range(4)],
    }
    ceiling = coordinatewise_ceiling(fit, held, [Family("gain")])
    family = ceiling.families["gain"]
    shared = family.shared
    mean = (shared["large"].fit + shared["small"].fit) / 2
    assert family.pooled_shared.fit == pytest.approx(mean, abs=1e-12)
    small_gain = shared["small"].held_out - ceiling.identity["small"].held_out
    assert small_gain > 0.5 * (
        family.per_layer["small"].held_out - ceiling.identity["small"].held_out
    )
    assert family.pooled_shared.held_out > ceiling.pooled_identity.held_out


def test_default_families_contain_the_identity_and_are_named_uniquely() -> None:
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    with pytest.raises(ValueError):
        Family("bad", cross="sideways")


# ------------------------------------------------------------------------------------------
# SNR profile
# ------------------------------------------------------------------------------------------


def test_snr_is_flat_when_the_noise_is_proportional_to_the_signal() -> None:
    gen = torch.Generator().manual_seed(6)
    g = _laplace(200_000, gen)
    draws = g + 0.5 * g.abs() * torch.randn(8, g.numel(), generator=gen, dtype=torch.float64)
    profile = snr_profile(g, draws)
    assert profile.snr_variance == pytest.approx([4.0] * len(profile.snr_variance), rel=0.05)
    assert profile.snr_mse == pytest.approx([4.0] * len(profile.snr_mse), rel=0.05)
    assert abs(profile.slope_variance) < 0.05
    assert abs(profile.slope_mse) < 0.05
    assert profile.overall_variance == pytest.approx(4.0, rel=0.02)


def test_snr_rises_with_size_when_the_noise_has_one_variance() -> None:
    """``g_q = g + 0.3 e``: per bin ``snr = mean(g^2) / 0.09 = size^2 rms(g)^2 / 0.09``."""
    gen = torch.Generator().manual_seed(7)
    g = _laplace(200_000, gen)
    g[:1000] = 0  # zeros are left out
    draws = g + 0.3 * torch.randn(8, g.numel(), generator=gen, dtype=torch.float64)
    profile = snr_profile(g, draws)
    assert profile.zeros == 1000
    rms = g[g != 0].square().mean().sqrt()
    expected = [float((s * rms) ** 2 / 0.09) for s in profile.size]
    assert profile.snr_variance == pytest.approx(expected, rel=0.05)
    assert profile.slope_variance == pytest.approx(2.0, abs=0.05)
    assert profile.slope_mse == pytest.approx(2.0, abs=0.05)
    assert len(profile.count) == len(profile.edges) + 1
    assert sum(profile.count) == g.numel() - 1000


def test_snr_of_one_draw_has_only_the_error_version() -> None:
    gen = torch.Generator().manual_seed(8)
    g = _laplace(10_000, gen)
    profile = snr_profile(g, (g + 0.1 * g.sign()).unsqueeze(0))  # a bias: zero variance
    assert profile.snr_variance is None and profile.slope_variance is None
    assert all(math.isfinite(v) for v in profile.snr_mse)
    with pytest.raises(ValueError):
        snr_profile(g, g)


# ------------------------------------------------------------------------------------------
# Repeated quantized backward passes
# ------------------------------------------------------------------------------------------


def _model(rounding: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = QuantConfig(grad=QuantSpec(bits=4, rounding=rounding))
    return quantize(create_model("small_cnn", width=0.5), config).train()


def test_gradient_draws_differ_only_by_the_rounding_draws() -> None:
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    model = _model("stochastic")
    state = torch.get_rng_state()
    draws = gradient_draws(model, x, y, repeats=32)
    assert torch.equal(torch.get_rng_state(), state)
    for full, stacked in draws.values():
        assert stacked.shape == (32, *full.shape)
        assert not torch.equal(stacked[0], stacked[1])
        single = (stacked[0] - full).norm()
        mean = (stacked.mean(0) - full).norm()
        assert mean < 0.5 * single  # unbiased: averaging draws approaches the gradient
    nearest = gradient_draws(_model("nearest"), x, y, repeats=3)
    for _, stacked in nearest.values():
        assert torch.equal(stacked[0], stacked[1]) and torch.equal(stacked[1], stacked[2])
