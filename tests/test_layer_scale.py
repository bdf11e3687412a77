"""Tests for the learned per-layer gradient scale (benchmarks.layer_scale)."""

from __future__ import annotations

import json

import digits_run
import pytest
import torch

from benchmarks.layer_scale import SCALES, LayerScaleTrainer
from metagrad.training.config import build_config
from metagrad.training.trainer import Trainer

DIGITS = {**digits_run.DIGITS, "grad_quant": "plain", "epochs": 1}


def test_the_first_step_is_plain_trainings(tmp_path):
    """No hypergradient before a second gradient: the scales start at 1."""
    settings = {**DIGITS, "max_steps": 1}
    plain = Trainer(build_config({**settings, "out": str(tmp_path / "plain")}))
    plain.fit()
    scaled = LayerScaleTrainer(build_config({**settings, "out": str(tmp_path / "scaled")}))
    scaled.fit()
    states = plain.model.state_dict().values(), scaled.model.state_dict().values()
    assert all(map(torch.equal, *states))
    assert set(scaled.scales().values()) == {1.0}


def test_aligned_gradients_grow_the_scales(tmp_path):
    """At a learning rate far too small, successive gradients point the same way: the one-step
    hypergradient asks for a larger step in every layer."""
    cfg = build_config({**DIGITS, "lr": 1e-4, "max_steps": 8, "out": str(tmp_path / "r")})
    trainer = LayerScaleTrainer(cfg, hyper_lr=0.05)
    trainer.fit()
    scales = json.loads((tmp_path / "r" / SCALES).read_text())
    assert set(scales) == set(trainer.scales()) and len(scales) >= 3
    assert all(s > 1.2 for s in scales.values())


def test_a_bad_hyper_lr_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hyper_lr must be > 0"):
        LayerScaleTrainer(build_config({**DIGITS, "out": str(tmp_path)}), hyper_lr=0.0)
