"""MetaGrad on an FSDP2-sharded model (2 gloo processes) against one unsharded process.

The sharded run must take the same steps as the unsharded one (float tolerance: the shards'
statistics are summed in another order), resume bit-identically from its own DCP checkpoint,
and resume from the other's checkpoint (another number of processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_metagrad_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
CASES = [
    {"name": "sgd", "base": "sgd", "lr": 0.05, "horizon": 1},
    {"name": "adam", "base": "adam", "lr": 0.01, "horizon": 1},
    {"name": "sgd-k2", "base": "sgd", "lr": 0.05, "horizon": 2},
    {"name": "lstm", "base": "sgd", "lr": 0.05, "horizon": 1, "hypernet": "lstm"},
    {"name": "bf16", "base": "adam", "lr": 0.01, "horizon": 2, "bf16": True},
]
for _case in CASES:
    _case.update(steps=8, resume_at=4)
RTOL, ATOL = 1e-3, 1e-5  # Adam divides by the root of tiny second moments
TOLERANCE = {"bf16": (0.02, 2e-3)}
"""bf16: FSDP's policy casts the weights to bf16 and autocast the products' inputs; the two
round differently (bf16 keeps 8 bits: a relative step of 2**-8)."""


def _launch(out: Path, nproc: int, cases: list[dict]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(WORKER), str(out), json.dumps(cases)]
    if nproc > 1:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*run, f"--nproc_per_node={nproc}", *cmd[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-metagrad")
    _launch(out, 2, CASES)  # sharded first: the unsharded run then resumes from its checkpoint
    _launch(out, 1, [{**c, "resume_from": "sharded"} for c in CASES])
    _launch(out, 2, [{**c, "resume_from": "whole"} for c in CASES])  # and the other way
    return out


def _load(out: Path, case: str, kind: str, rank: int = 0) -> dict:
    return torch.load(out / f"{case}-{kind}-rank{rank}.pt")


def _assert_same_run(a: dict, b: dict, exact: bool, case: str = "") -> None:
    rtol, atol = TOLERANCE.get(case, (RTOL, ATOL))
    if exact:
        assert a["losses"] == b["losses"]
    else:
        torch.testing.assert_close(a["losses"], b["losses"], rtol=rtol, atol=atol)
    for part in ("model", "hypernet"):
        for key, value in a[part].items():
            if exact:
                assert torch.equal(value, b[part][key]), f"{part} {key} differs"
            else:
                torch.testing.assert_close(value, b[part][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_sharded_steps_match_one_unsharded_process(runs, case):
    ranks = [_load(runs, case, "sharded", r) for r in (0, 1)]
    whole = _load(runs, case, "whole")
    learned = whole["straight"]["hypernet"]
    assert any(not torch.equal(v, whole["initial_hypernet"][k]) for k, v in learned.items())
    _assert_same_run(ranks[0]["straight"], ranks[1]["straight"], exact=True)
    _assert_same_run(ranks[0]["straight"], whole["straight"], exact=False, case=case)


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_sharded_run_resumes_exactly_and_across_process_counts(runs, case):
    sharded = _load(runs, case, "sharded")
    _assert_same_run(sharded["resumed"], sharded["straight"], exact=True)
    whole = _load(runs, case, "whole")
    _assert_same_run(whole["resumed"], whole["straight"], exact=True)
    _assert_same_run(whole["crossed"], whole["straight"], exact=False, case=case)  # from 2
    _assert_same_run(sharded["crossed"], sharded["straight"], exact=False, case=case)  # from 1


def test_refusals_name_the_combination(runs):
    messages = torch.load(runs / "refusals-rank0.pt")
    assert "comm_bits=8 applies to DDP" in messages["comm_bits"]
    assert "needs every trainable parameter sharded" in messages["partial"]


@pytest.mark.parametrize(
    "hypernet_state", [torch.arange(12.0).reshape(4, 3), torch.arange(24.0).reshape(2, 12)]
)
def test_state_conversion_round_trips_without_sharding(hypernet_state):
    from metagrad.meta.sharded import to_local_state

    weight = torch.zeros(4, 3)
    assert to_local_state(weight, hypernet_state) is hypernet_state
    stacked = hypernet_state.reshape(-1, 4 * 3).t().reshape(4, 3, -1)  # (*shape, k)
    if hypernet_state.shape[1] == 12:
        assert torch.equal(to_local_state(weight, stacked), hypernet_state)
