"""examples/ run and train: Hugging Face models in a loop of your own, the HF Trainer, Lightning.

They need the ``integrations`` extra: without its packages these tests skip, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import metagrad as mg
from metagrad.nn.layers import quantized_layers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        reason = f"needs {', '.join(missing)}: pip install -e '.[integrations]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true requires the integrations extra)")
        pytest.skip(reason)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated():
    """The frameworks seed every generator and may set variables: put both back afterwards."""
    environ, states = dict(os.environ), (random.getstate(), np.random.get_state())
    with torch.random.fork_rng():
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    os.environ.clear()
    os.environ.update(environ)


def _trains(losses: list[float], steps: int) -> None:
    assert len(losses) == steps
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses


def _has_meta_weights(opt: mg.MetaGrad) -> None:
    assert isinstance(opt, mg.MetaGrad)
    assert opt.meta_params
    assert len(opt.pending_gradients()) == len(opt.meta_params)  # every one took its g_t


def test_hand_written_loop_trains_quantized_with_adamw_and_metagrad(capsys):
    _require("transformers")
    example = _load("hand_written_loop")
    runs = example.main()
    assert "9 converted, 0 unconverted" in capsys.readouterr().out
    for run in runs.values():
        _trains(run["losses"], example.STEPS)
        assert len(quantized_layers(run["model"])) == len(run["report"].converted) == 9
    _has_meta_weights(runs["metagrad"]["optimizer"])


def test_hf_trainer_trains_converted_gpt2_and_bert(capsys):
    _require("transformers", "accelerate")
    example = _load("hf_trainer")
    runs = example.main()
    out = capsys.readouterr().out
    for name, run in runs.items():
        _trains(run["losses"], example.STEPS)
        assert f"{name}: {len(run['report'].converted)} converted" in out
        assert {n for n, _ in quantized_layers(run["model"])} <= set(run["report"].converted)
    # GPT-2's lm_head is an nn.Linear (tied to the embedding); its other layers are HF's Conv1D,
    # converted only where a handler for it is registered.
    assert "lm_head" in dict(quantized_layers(runs["gpt2"]["model"]))
    bert = runs["bert"]
    assert len(quantized_layers(bert["model"])) == len(bert["report"].converted) == 14


def test_hf_trainer_calls_step_without_the_closure_metagrad_needs(tmp_path):
    """What the docs say: the Trainer's loop calls ``optimizer.step()``, MetaGrad refuses."""
    _require("transformers", "accelerate")
    from transformers import Trainer, TrainingArguments

    example = _load("hf_trainer")
    model, data = example.bert()
    mg.quantize_(model, example.CONFIG)
    opt = mg.MetaGrad(model, lr=1e-3)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], save_strategy="no", use_cpu=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    with pytest.raises(TypeError, match="requires a closure"):
        trainer.train()


def test_lightning_runs_metagrad_under_automatic_optimization():
    _require("lightning")
    example = _load("lightning_metagrad")
    run = example.main([])
    _trains(run["losses"], example.STEPS)
    _has_meta_weights(run["optimizer"])
    assert len(quantized_layers(run["module"])) == 7


def test_lightning_clipping_in_on_before_optimizer_step_clips_what_metagrad_keeps():
    _require("lightning")
    opt = _load("lightning_metagrad").fit(steps=2, clip=1e-3)["optimizer"]
    grads = [*opt.pending_gradients().values()]
    grads += [p.grad for g in opt.param_groups if not g["meta"] for p in g["params"]]
    assert torch.cat([g.reshape(-1) for g in grads]).norm() <= 1e-3 * (1 + 1e-5)


@pytest.mark.slow
def test_lightning_ddp_two_processes_keep_ranks_identical(tmp_path):
    """``strategy="ddp"``: MetaGrad, given the bare module, adopts Lightning's DDP wrapper."""
    _require("lightning")
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(EXAMPLES / "lightning_metagrad.py"), "--ddp", "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ranks_identical"] is True
    assert summary["meta_weights"] == 9 and summary["quantized_layers"] == 7
    assert all(math.isfinite(v) for v in summary["losses"])
