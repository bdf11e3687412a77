"""Training trajectories and layer gradients bit-identical to the recorded ones (tests/golden.py).

The recorded values are keyed by CPU model, torch build and Python version: float results are
bit-reproducible only there, so on another machine the test skips and says how to record; so
does a case whose entry was dropped because its numerics may have changed on a CPU that was not
at hand to record it again.
"""

from __future__ import annotations

import golden
import pytest

EXPECTED = golden.load().get(golden.fingerprint())
pytestmark = pytest.mark.skipif(
    EXPECTED is None,
    reason=f"no golden values for {golden.fingerprint()!r}; record them on a known-good "
    "commit with `python tests/golden.py --record`",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.slow
@pytest.mark.parametrize("name", [*golden.TRAINING_CASES, *golden.TORCHRUN_CASES])
def test_training_trajectory_is_bit_identical(name, workdir):
    if name not in EXPECTED["training"]:
        pytest.skip(
            f"{name} is not recorded for {golden.fingerprint()!r} (its entry was dropped when "
            "a change may have altered its numerics on this CPU); record it on a known-good "
            f"commit with `python tests/golden.py --record --case {name}`"
        )
    assert golden.run_training(name, workdir) == EXPECTED["training"][name]


def test_layer_gradients_are_bit_identical():
    assert golden.run_layers() == EXPECTED["layers"]
