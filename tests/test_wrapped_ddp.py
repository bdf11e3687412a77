"""MetaGrad given the inner module of a DDP wrapper (what Lightning's DDP strategy arranges).

Two gloo processes under torchrun (tests/ddp_wrapped_worker.py): the closure calls the wrapper,
MetaGrad adopts it at the first step and trains exactly as ``MetaGrad(ddp_model)`` does; the
cases it cannot adopt are refused with one line saying what to pass instead.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import torch
from test_distributed import _env, _torchrun

from metagrad.meta.wrapped import PASS_INSTEAD

WORKER = Path(__file__).with_name("ddp_wrapped_worker.py")


def test_inner_module_of_ddp_trains_bit_identically_to_the_wrapper(tmp_path):
    cmd = _torchrun(2, str(WORKER), str(tmp_path))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        inner, ddp = rank["inner"], rank["ddp"]
        assert inner["adopted"] and ddp["adopted"]
        assert len(inner["losses"]) == 3 and all(math.isfinite(v) for v in inner["losses"])
        assert inner["losses"] == ddp["losses"]
        for part in ("model", "hypernet"):
            for key, value in inner[part].items():
                assert torch.equal(value, ddp[part][key]), f"inner and ddp differ in {key}"
                assert torch.equal(value, ranks[1]["inner"][part][key]), f"ranks differ: {key}"
        # Refused, at the step where the wrapper is first met, with one line.
        for mode, step, why in (("foreign", 0, "are not MetaGrad's"), ("late", 1, "first step")):
            error = rank[mode]["error"]
            assert rank[mode]["step"] == step and "\n" not in error
            assert why in error and PASS_INSTEAD in error
    assert ranks[0]["inner"]["losses"] != ranks[1]["inner"]["losses"]  # each rank its own data
