"""Sharded training (FSDP2, metagrad.parallel.fsdp) of quantized models on 2 gloo processes.

One ``torchrun`` launch (tests/fsdp_worker.py) trains every case, each model converted with
``quantize_`` and then sharded with ``shard_model``. References:

- DDP on the same local batches with the same per-rank seeds: the same local quantization, so
  the same numbers (averaging two gradients is exact in either order); every backend, every
  preset it runs.
- One unsharded process with the whole batch, under nearest rounding with one scale per sample,
  where a batch split changes no quantized number. That holds for ``simulate``; ``int8`` also
  quantizes the layer input of ``dL/dW`` with scales taken over the local batch (the per-sample
  error scales folded in), so its reference is DDP only.

The unit tests at the end need no torchrun.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_distributed import _env, _torchrun
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import metagrad as mg
from metagrad.backward import list_backends
from metagrad.parallel.fsdp import default_units, is_sharded, shard_group, shard_model

WORKER = Path(__file__).with_name("fsdp_worker.py")
MODELS = ("mlp", "gpt")
DETERMINISTIC = {"grad": "int8:sample"}
"""Nearest rounding, one scale per sample: under ``simulate`` a batch split changes nothing."""
SPLIT_INVARIANT = ("simulate",)
BACKENDS = list_backends()
RTOL, ATOL = 1e-4, 1e-5
"""Float rounding only (the gradients reach the weights summed in another order)."""
COMPILED = [("gpt", "units")]
"""(model, what is compiled): ``"model"``, ``torch.compile`` of the sharded model, or
``"units"``, ``unit.compile()`` of each FSDP unit after sharding."""
COMPILED_EXHAUSTIVE = [("gpt", "model"), ("gpt", "units"), ("mlp", "model")]


def _runs_on(preset: str, backend: str) -> bool:
    try:
        mg.preset_config(preset, mg.QuantConfig(backend=backend))
    except ValueError:  # int8 takes integer gradient specs only
        return False
    return True


PRESETS = [(p, b) for b in BACKENDS for p in mg.list_presets() if _runs_on(p, b)]
MIXED = {
    "autocast": None,
    "bf16-params": ["bfloat16", "float32"],
    "bf16-reduce": ["bfloat16", "bfloat16"],
}
"""FSDP's ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``, each under bf16 autocast."""


def _case(name: str, mode: str, model: str, config: dict[str, Any], **extra: Any) -> dict:
    name = f"{model}-{name}-{mode}"
    return {"name": name, "mode": mode, "model": model, "config": config, **extra}


def _cases(
    compiled: list[tuple[str, str]] = COMPILED, compiler: str = "aot_eager"
) -> list[dict[str, Any]]:
    cases = []
    for model in MODELS:
        for backend in BACKENDS:
            config = {**DETERMINISTIC, "backend": backend}
            modes = ("fsdp", "ddp", "single") if backend in SPLIT_INVARIANT else ("fsdp", "ddp")
            cases += [_case(backend, mode, model, config) for mode in modes]
        for preset, backend in PRESETS:
            config = {"preset": preset, "backend": backend}
            cases += [_case(f"{preset}-{backend}", mode, model, config) for mode in ("fsdp", "ddp")]
        cases.append(_case("bf16", "single", model, DETERMINISTIC, autocast=True))
        for name, mp in MIXED.items():
            cases.append(_case(name, "fsdp", model, DETERMINISTIC, autocast=True, mp=mp))
    for model, how in compiled:
        name = f"{how}-{compiler}"
        cases.append(_case(name, "fsdp", model, DETERMINISTIC, compile=how, compiler=compiler))
    return cases


def _launch(out: Path, cases: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Case name -> the result of each rank that ran it."""
    cmd = _torchrun(2, str(WORKER), str(out), json.dumps(cases))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    merged: dict[str, list[dict[str, Any]]] = {}
    for rank in range(2):
        for name, result in torch.load(out / f"rank{rank}.pt").items():
            assert "error" not in result, f"{name} on rank {rank}:\n{result['error']}"
            merged.setdefault(name, []).append(result)
    return merged


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    return _launch(tmp_path_factory.mktemp("fsdp"), _cases())


def _close(a: dict[str, Any], b: dict[str, Any], rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(
        torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=rtol, atol=atol
    )
    assert a["weights"].keys() == b["weights"].keys()
    for key, value in a["weights"].items():
        torch.testing.assert_close(value, b["weights"][key], rtol=rtol, atol=atol, msg=key)


def _sharded(results: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
    """Rank 0's result of an FSDP case, after checking that the ranks agree and were sharded."""
    first, second = results[name]
    assert first["losses"] == second["losses"]
    for key, value in first["weights"].items():
        assert torch.equal(value, second["weights"][key]), f"ranks differ in {key}"
    assert first["sharded"] and first["group_size"] == 2 and first["still_quantized"]
    assert first["local_numel"] < first["numel"]
    assert first["report"]["converted"] and not first["report"]["unconverted"]
    return first


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_training_matches_ddp_and_one_process(results, model, backend):
    fsdp = _sharded(results, f"{model}-{backend}-fsdp")
    ddp = results[f"{model}-{backend}-ddp"][0]
    _close(fsdp, ddp, rtol=0, atol=0)
    if backend in SPLIT_INVARIANT:
        (single,) = results[f"{model}-{backend}-single"]
        assert fsdp["report"] == single["report"]
        _close(fsdp, single)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("preset", "backend"), PRESETS)
def test_sharded_training_matches_ddp_with_the_same_dither(results, model, preset, backend):
    fsdp = _sharded(results, f"{model}-{preset}-{backend}-fsdp")
    ddp = results[f"{model}-{preset}-{backend}-ddp"][0]
    _close(fsdp, ddp, rtol=0, atol=0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("policy", list(MIXED))
def test_mixed_precision_policies_under_bf16_autocast(results, model, policy):
    """Against one process under the same autocast: each rank's gradients are rounded to bf16
    before they are averaged (not after), and bf16 parameters round the embeddings, norms and
    biases too, so the weights agree within about one bf16 step of weights below 0.5."""
    fsdp = _sharded(results, f"{model}-{policy}-fsdp")
    (single,) = results[f"{model}-bf16-single"]
    param_dtype = "torch.float32" if MIXED[policy] is None else f"torch.{MIXED[policy][0]}"
    assert fsdp["forward_dtype"] == param_dtype  # what the quantized layers were given
    torch.testing.assert_close(
        torch.tensor(fsdp["losses"]), torch.tensor(single["losses"]), rtol=1e-3, atol=0
    )
    for key, value in fsdp["weights"].items():
        assert value.dtype == torch.float32  # the sharded parameters stay in float32
        torch.testing.assert_close(value, single["weights"][key], rtol=0, atol=2e-3, msg=key)


def _check_compiled(
    results: dict[str, list[dict[str, Any]]], model: str, how: str, compiler: str
) -> None:
    fsdp = _sharded(results, f"{model}-{how}-{compiler}-fsdp")
    (single,) = results[f"{model}-simulate-single"]
    assert fsdp["graphs"] >= 1
    if how == "units":
        assert fsdp["graph_breaks"] == 0
    _close(fsdp, single)


@pytest.mark.parametrize(("model", "how"), COMPILED)
def test_compiled_sharded_model_matches_one_process(results, model, how):
    """Each FSDP unit compiled after sharding, traced by dynamo and AOT autograd (``aot_eager``:
    inductor's code generation, and ``torch.compile`` of the whole sharded model, run with
    ``-m exhaustive``). FSDP2's hooks are never traced: a compiled whole model breaks its graph
    at each unit (``fullgraph=True`` fails), and runs a loop over its units eagerly."""
    _check_compiled(results, model, how, "aot_eager")


@pytest.mark.exhaustive
def test_sharded_models_compile_with_inductor(tmp_path):
    cases = _cases(COMPILED_EXHAUSTIVE, "inductor")
    cases = [c for c in cases if c.get("compile") or c["name"].endswith("simulate-single")]
    results = _launch(tmp_path, cases)
    for model, how in COMPILED_EXHAUSTIVE:
        _check_compiled(results, model, how, "inductor")


# Without torchrun -------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_default_units_are_the_outermost_blocks_else_the_weight_layers():
    mlp = _mlp()
    assert default_units(mlp) == [mlp[0], mlp[2]]
    gpt = mg.create_model("gpt_char", width=0.25)
    assert default_units(gpt) == list(gpt.blocks)
    nested = nn.Module()
    nested.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([_mlp()])])
    nested.frozen = nn.ModuleList([nn.Linear(2, 2).requires_grad_(False)])
    assert default_units(nested) == list(nested.layers)


def test_a_plain_model_is_not_sharded():
    model = _mlp()
    assert not is_sharded(model) and shard_group(model) is None


def test_sharding_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a process group: launch with torchrun"):
        shard_model(_mlp())


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_names_its_group_and_is_not_sharded_again(one_process_group):
    model = _mlp()
    mg.quantize_(model, mg.QuantConfig())
    assert shard_model(model) is model
    assert is_sharded(model)
    assert dist.get_process_group_ranks(shard_group(model)) == [0]
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(model)
    for convert in (mg.quantize_, mg.unquantize_):  # FSDP would not follow a replaced module
        with pytest.raises(ValueError, match="FSDP2 does not follow"):
            convert(model)
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_only_one_dimensional_sharding_names_a_group(one_process_group):
    model = _mlp()
    shard_model(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "shard")))
    with pytest.raises(ValueError, match="only 1-D sharding is supported"):
        shard_group(model)
