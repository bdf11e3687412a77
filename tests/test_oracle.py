"""Tests for the oracle bound of coordinate-wise corrections (benchmarks.metagrad_oracle)."""

from __future__ import annotations

import pytest
import torch
from digits_run import DIGITS

from benchmarks.metagrad_oracle import MIN_CELL, OracleTrainer, oracle_correction
from metagrad import QuantSpec
from metagrad.quant.quantize import fake_quantize
from metagrad.training.config import build_config
from metagrad.training.trainer import Trainer


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _layer(seed: int, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized gradient, full-precision gradient, weight) of a heavy-tailed layer."""
    torch.manual_seed(seed)
    full = torch.distributions.StudentT(3.0).sample((n // 64, 64)) * 1e-3
    weight = torch.randn(n // 64, 64)
    quantized = fake_quantize(full, QuantSpec(bits=4, rounding="stochastic"))
    return quantized, full, weight


@pytest.mark.parametrize("norm", [True, False])
def test_the_identity_is_recovered_when_the_target_is_the_gradient(norm):
    quantized, _, weight = _layer(0)
    out = oracle_correction(quantized, weight, quantized, norm=norm)
    assert out.dtype == quantized.dtype and out.shape == quantized.shape
    torch.testing.assert_close(out, quantized, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fit_is_at_least_as_close_to_the_target_as_the_quantized_gradient(seed):
    quantized, full, weight = _layer(seed)
    fitted = oracle_correction(quantized, weight, full, norm=False)
    assert _cos(fitted, full) >= _cos(quantized, full) - 1e-9
    # no further from the target than the identity at its least-squares scale
    q, f = quantized.double(), full.double()
    identity = q * (q.flatten() @ f.flatten()) / (q.flatten() @ q.flatten())
    assert (f - fitted.double()).norm() <= (f - identity).norm() * (1 + 1e-6)
    normed = oracle_correction(quantized, weight, full, norm=True)
    assert _cos(normed, fitted) == pytest.approx(1.0, abs=1e-6)
    assert float(normed.double().norm()) == pytest.approx(
        float(quantized.double().norm()), rel=1e-5
    )


def test_a_binned_gain_is_recovered_exactly():
    quantized, _, weight = _layer(3, n=64 * MIN_CELL * 8)
    target = torch.where(quantized.abs() > quantized.abs().median(), 0.5 * quantized, quantized)
    fitted = oracle_correction(quantized, weight, target, norm=False)
    torch.testing.assert_close(fitted, target, rtol=1e-5, atol=1e-9)


def test_zero_gradients_stay_zero():
    zero = torch.zeros(8, 8)
    assert torch.equal(oracle_correction(zero, torch.randn(8, 8), torch.randn(8, 8)), zero)


def test_the_oracle_switched_off_trains_bit_for_bit_as_plain(tmp_path):
    settings = {**DIGITS, "grad_quant": "plain", "max_steps": 6, "epochs": 1}
    plain = Trainer(build_config({**settings, "out": str(tmp_path / "plain")}))
    plain.fit()
    off = OracleTrainer(build_config({**settings, "out": str(tmp_path / "off")}), apply=False)
    off.fit()
    for a, b in zip(
        plain.model.state_dict().values(), off.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert len(off.cosines) == 6
    assert all(after >= before - 1e-9 for before, after in off.cosines)
    on = OracleTrainer(build_config({**settings, "out": str(tmp_path / "on")}))
    on.fit()
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(
            plain.model.state_dict().values(), on.model.state_dict().values(), strict=True
        )
    )
    assert changed
