"""Tests for metagrad.training.config: numeric settings out of range, NaN or infinite are named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metagrad.training.config import ConfigError, build_config, read_config_file


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 2**64),
        ("warmup_epochs", math.inf),
        ("warmup_epochs", math.nan),
        ("weight_decay", math.nan),
        ("weight_decay", math.inf),
        ("hyper_lr", math.inf),
        ("hyper_lr", math.nan),
        ("momentum", math.nan),
        ("lr", math.inf),
        ("lr", math.nan),
        ("width", 1e300),
        ("width", math.inf),
        ("width", math.nan),
        ("threads", 2**31),
        ("hyper_hidden", 10**9),
    ],
)
def test_out_of_range_numbers_are_rejected_by_name(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        build_config({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("seed", 0), ("seed", 2**32 - 1), ("width", 16.0), ("warmup_epochs", 0.0), ("threads", 64)],
)
def test_numbers_at_the_edges_of_their_range_are_accepted(name: str, value: float) -> None:
    assert getattr(build_config({name: value}), name) == value


def test_a_config_file_with_nan_or_inf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for text, name in [
        ("warmup-epochs: .inf\n", "warmup_epochs"),
        ("weight_decay: .nan\n", "weight_decay"),
        ("seed: -1\n", "seed"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            build_config({}, read_config_file(path))


def test_the_attention_kernel_is_one_of_the_named_ones_and_math_runs_the_math_kernel() -> None:
    from torch.profiler import ProfilerActivity, profile

    from metagrad.training.setup import attention_kernel

    with pytest.raises(ConfigError, match=r"^attention_kernel must be one of default, math"):
        build_config({"attention_kernel": "flash"})
    assert build_config({"attention_kernel": "math"}).attention_kernel == "math"
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    outputs, names = {}, {}
    for kernel in ("default", "math"):
        with profile(activities=[ProfilerActivity.CPU]) as prof, attention_kernel(kernel):
            outputs[kernel] = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        names[kernel] = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_attention_math" in names["math"]
    assert "aten::_scaled_dot_product_attention_math" not in names["default"]
    torch.testing.assert_close(outputs["math"], outputs["default"])
