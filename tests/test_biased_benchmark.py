"""The rules fixed in advance by benchmarks.metagrad_biased: which quantizer, which setting."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.layer_scale import LayerScaleTrainer
from benchmarks.metagrad_biased import (
    CANDIDATES,
    CHANCE,
    CONTROL_PRESETS,
    CONTROLS,
    DIAGNOSE,
    DIAGNOSE_EVERY,
    FROZEN,
    PRESCALED,
    PRESETS,
    PRIMARY_SEEDS,
    best_setting,
    chosen_quantizer,
    control_comparisons,
    plan,
    primary_comparisons,
    sweep_names,
)
from benchmarks.tables_training import biased_table
from metagrad.quant.presets import preset_config
from metagrad.quant.spec import QuantSpec


def _candidates(gaps: dict[str, float]) -> list[dict]:
    runs = [{"stage": "candidates", "setting": "fp32", "final_test_acc": 70.0}]
    for c in CANDIDATES:
        runs.append({"stage": "candidates", "setting": c, "final_test_acc": 70.0 - gaps[c]})
    return runs


def test_the_quantizer_losing_most_within_2_to_10_points_is_chosen():
    losses = [1.0, 4.0, 12.0, 7.5, 60.0, 0.3, 0.1, 6.0, 2.5, 0.5, 1.5]
    gaps = dict(zip(CANDIDATES, losses, strict=True))
    assert chosen_quantizer(_candidates(gaps)) == CANDIDATES[3]
    assert chosen_quantizer(_candidates(dict.fromkeys(CANDIDATES, 0.5))) is None
    losses = [0.5, 60.0, 11.6, 1.0, 30.0, 0.2, 25.0, 55.0, 0.1, 0.3, 0.7]
    beyond = dict(zip(CANDIDATES, losses, strict=True))
    assert chosen_quantizer(_candidates(beyond)) == CANDIDATES[2]  # the least beyond 10 points
    beyond[CANDIDATES[2]] = 45.0  # at 25%: under chance + 20 points, it does not train
    assert chosen_quantizer(_candidates(beyond)) == CANDIDATES[6]
    assert chosen_quantizer(_candidates(gaps)[:-1]) is None  # not all candidates ran


def test_the_best_metagrad_setting_is_the_highest_final_accuracy():
    runs = _candidates(dict.fromkeys(CANDIDATES, 5.0))
    names = [n for n in sweep_names() if n.startswith("metagrad-")]
    for i, name in enumerate(names):
        acc = None if i == 0 else 60.0 + i % 3  # a diverged run never wins
        runs.append({"stage": "sweep", "setting": name, "final_test_acc": acc})
    assert best_setting(runs) == names[2]
    assert best_setting(runs[:-1]) is None


def test_the_plans_train_what_the_docstring_fixes(tmp_path):
    runs = _candidates(dict.fromkeys(CANDIDATES, 5.0))
    assert len(plan("candidates", [], str(tmp_path))) == 1 + len(CANDIDATES)
    sweep = plan("sweep", runs, str(tmp_path))
    assert [s for _, s in sweep] == ["plain", *sweep_names(), *CONTROLS]
    frozen = next(j for j, s in sweep if s == CONTROLS[0])
    assert (frozen.settings["method"], frozen.settings["hyper_lr"]) == ("metagrad", 0.0)
    scale = [j for j, s in sweep if s.startswith("scale-")]
    assert all(j.trainer is LayerScaleTrainer for j in scale)
    assert {j.options["hyper_lr"] for j in scale} == {1e-4, 3e-4, 1e-3}
    lstm = next(j for j, s in sweep if s == "metagrad-lstm-lr3e-4")
    assert (lstm.settings["method"], lstm.settings["hyper"], lstm.settings["hyper_lr"]) == (
        "metagrad",
        "lstm",
        3e-4,
    )
    with pytest.raises(SystemExit, match="run --stage sweep first"):
        plan("primary", runs, str(tmp_path))
    runs += [{"stage": "sweep", "setting": n, "final_test_acc": 60.0} for n in sweep_names()]
    primary = plan("primary", runs, str(tmp_path))
    assert len(primary) == len(PRIMARY_SEEDS) * (1 + 2 * (1 + len(PRESETS)))
    assert len({j.settings["out"] for j, _ in primary}) == len(primary)
    assert all(j.settings["epochs"] == 6 for j, _ in primary)
    diagnose = plan("diagnose", runs, str(tmp_path))
    assert [s for _, s in diagnose][: len(DIAGNOSE)] == list(DIAGNOSE)
    assert len(diagnose) == len(DIAGNOSE) * (1 + len(CONTROL_PRESETS))
    assert all(j.settings["diag_every"] == DIAGNOSE_EVERY for j, _ in diagnose)
    assert len({j.settings["out"] for j, _ in diagnose}) == len(diagnose)
    assert diagnose[-1][0].settings["grad_quant"] == CONTROL_PRESETS[-1]
    plain, metagrad, gain = (j.settings for j, _ in diagnose[: len(DIAGNOSE)])
    assert plain.get("method", "plain") == "plain" and metagrad["method"] == "metagrad"
    assert (gain["hyper_form"], gain["hyper_lr"]) == ("gain", metagrad["hyper_lr"])
    assert "hyper_form" not in metagrad  # the best setting's own form: the default
    control = plan("control", runs, str(tmp_path))
    assert len(control) == 2 * len(CONTROL_PRESETS) * len(PRIMARY_SEEDS)
    assert len({j.settings["out"] for j, _ in control}) == len(control)
    assert all(j.settings["epochs"] == 6 for j, _ in control)
    frozen = [j.settings for j, s in control if s.startswith(FROZEN)]
    assert len(frozen) == len(PRIMARY_SEEDS) and all(f["hyper_lr"] == 0.0 for f in frozen)
    prescaled = [j.settings for j, s in control if s.startswith(PRESCALED)]
    spec = QuantSpec.parse(prescaled[0]["grad_spec"])
    assert spec == dataclasses.replace(preset_config(CONTROL_PRESETS[0]).grad, prescale=0.75)
    assert all(p.get("method", "plain") == "plain" for p in prescaled)


def test_the_control_pairs_the_frozen_hypernetwork_with_plain_and_with_metagrad():
    q = CONTROL_PRESETS[0]
    runs = []
    for seed in PRIMARY_SEEDS:
        for stage, setting, acc in [
            ("primary", q, 75.0),
            ("primary", f"metagrad+{q}", 78.0),
            ("control", f"{FROZEN}+{q}", 75.5 + 0.1 * seed),
            ("control", f"{PRESCALED}+{q}", 77.0),
            ("primary", "fp32", 79.0),
        ]:
            runs.append({"stage": stage, "setting": setting, "seed": seed, "final_test_acc": acc})
    out = control_comparisons(runs)
    assert list(out)[:4] == [
        f"{FROZEN}+{q} - {q}",
        f"metagrad+{q} - {FROZEN}+{q}",
        f"{PRESCALED}+{q} - {q}",
        f"metagrad+{q} - {PRESCALED}+{q}",
    ]
    assert out[f"metagrad+{q} - {PRESCALED}+{q}"]["mean"] == pytest.approx(1.0)
    assert out[f"{PRESCALED}+{q} - fp32"]["mean"] == pytest.approx(-2.0)
    assert out[f"{FROZEN}+{q} - {q}"]["mean"] == pytest.approx(0.7)
    assert out[f"metagrad+{q} - {FROZEN}+{q}"]["n"] == len(PRIMARY_SEEDS)
    table = biased_table({"runs": runs, "control_comparisons": out})
    assert "Controls (6 epochs" in table and f"| {FROZEN}+{q} - {q} |" in table
    assert "counts at chance" not in table  # no run of these comparisons diverged


def test_primary_comparisons_pair_metagrad_with_its_base_and_the_best_preset_with_fp32():
    runs = []
    for seed in PRIMARY_SEEDS:
        for setting, acc in [("fp32", 80.0), (PRESETS[0], 79.0), (f"metagrad+{PRESETS[0]}", 79.5)]:
            runs.append(
                {
                    "stage": "primary",
                    "setting": setting,
                    "seed": seed,
                    "final_test_acc": acc + 0.1 * seed * (setting == "fp32"),
                }
            )
    out = primary_comparisons(runs)
    assert set(out) == {f"metagrad+{PRESETS[0]} - {PRESETS[0]}", f"{PRESETS[0]} - fp32"}
    assert out[f"metagrad+{PRESETS[0]} - {PRESETS[0]}"]["mean"] == pytest.approx(0.5)
    assert out[f"{PRESETS[0]} - fp32"]["n"] == len(PRIMARY_SEEDS)


def test_a_diverged_run_counts_at_chance_not_as_missing():
    runs = []
    for seed in PRIMARY_SEEDS:
        runs.append({"stage": "primary", "setting": "int6", "seed": seed, "final_test_acc": 60.0})
        diverged = seed % 2 == 1
        runs.append(
            {
                "stage": "primary",
                "setting": "metagrad+int6",
                "seed": seed,
                "final_test_acc": None if diverged else 61.0,
                "diverged_at_step": 100 if diverged else None,
            }
        )
    out = primary_comparisons(runs)["metagrad+int6 - int6"]
    assert out["n"] == len(PRIMARY_SEEDS)
    assert out["mean"] == pytest.approx((3 * 1.0 + 2 * (CHANCE - 60.0)) / 5)
    table = biased_table({"runs": runs, "comparisons": {"metagrad+int6 - int6": out}})
    assert table.count("(diverged)") == 2 and "counts at chance" in table
