"""Golden training trajectories: short runs whose final state must not change bit for bit.

Each case trains through the command line (``python -m metagrad train``, or ``torchrun`` for the
two-process case), so that the same cases run on any version of the package's internals, and
records a SHA-256 of the final checkpoint's model and optimizer tensors. A second set of cases
hashes one forward and backward pass of quantized layers under every kind of ``QuantConfig``.

Float results are bit-reproducible on one CPU model with one torch build and one thread, not
across them, so the recorded values are keyed by that fingerprint; ``tests/test_golden.py``
compares against the entry of the machine it runs on.

Record (only where a change of numerics is intended): ``python tests/golden.py --record``, or
``--record --case NAME ...`` for the cases a change is meant for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

GOLDEN_FILE = Path(__file__).with_name("golden.json")
ROOT = Path(__file__).resolve().parents[1]

COMMON = (
    "--data digits --model small_cnn --batch-size 32 --epochs 1 --max-steps 6 --threads 1 "
    "--compile off --no-progress --seed 3"
)
GPT = (
    "--model gpt_char --batch-size 8 --epochs 1 --max-steps 3 --threads 1 --compile off "
    "--no-progress --seed 3"
)
PRESETS = ("plain", "psq", "bhq", "luq", "rht-mxfp4", "rht-nvfp4", "fp8-e5m2")

TRAINING_CASES: dict[str, str] = {
    "fp32": COMMON,
    "int4-stochastic": f"{COMMON} --grad-bits 4",
    "int4-nearest-sample": f"{COMMON} --grad-bits 4 --grad-rounding nearest "
    "--grad-granularity sample",
    **{f"preset-{name}": f"{COMMON} --grad-quant {name}" for name in PRESETS},
    "int8-backend": f"{COMMON} --grad-bits 8 --backend int8",
    "int8-backend-qat": f"{COMMON} --grad-bits 4 --backend int8 --weight-bits 8 --act-bits 8",
    "metagrad-k1": f"{COMMON} --grad-bits 4 --method metagrad",
    "metagrad-k2": f"{COMMON} --grad-bits 4 --method metagrad --hyper-horizon 2 --hyper lstm",
    "metagrad-adam-gain": f"{COMMON} --grad-quant rht-nvfp4 --method metagrad --optimizer adam "
    "--lr 0.003 --hyper-form gain",
    "amp-bf16": f"{COMMON} --grad-bits 4 --amp bf16",
    "amp-bf16-preset": f"{COMMON} --grad-quant rht-mxfp4 --amp bf16",
    "amp-bf16-metagrad": f"{COMMON} --grad-bits 4 --amp bf16 --method metagrad",
    "gpt-rht-nvfp4": f"{GPT} --grad-quant rht-nvfp4 --amp bf16",
    "gpt-metagrad": f"{GPT} --grad-bits 4 --method metagrad",
}
TORCHRUN_CASES: dict[str, str] = {
    "torchrun-2-int4-comm8": f"{COMMON} --grad-bits 4 --comm-bits 8",
    "torchrun-2-metagrad": f"{COMMON} --grad-bits 4 --method metagrad",
}


def fingerprint() -> str:
    """What bit-reproducibility depends on: CPU model, torch build, Python."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | torch {torch.__version__} | python {platform.python_version()}"


def digest(tensors: dict[str, Any]) -> str:
    """SHA-256 over the named tensors (sorted by name), their dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    elif isinstance(value, (torch.Tensor, int, float, bool, str)) or value is None:
        out[prefix] = value


def checkpoint_digest(path: Path) -> dict[str, str]:
    """Digests of a checkpoint's model and optimizer state."""
    from metagrad.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    model: dict[str, Any] = {}
    _flatten("model", state["model"], model)
    optimizer: dict[str, Any] = {}
    _flatten("optimizer", state["optimizer"], optimizer)
    return {"model": digest(model), "optimizer": digest(optimizer)}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # The int8 cases take the backend's fixed routes: routes chosen by timing could round bf16
    # products differently from one machine load to the next (older versions ignore it).
    env["METAGRAD_INT8_ROUTES"] = "fixed"
    return env


def run_training(name: str, workdir: Path) -> dict[str, str]:
    """Train case ``name`` in ``workdir`` and return its checkpoint's digests."""
    out = workdir / name
    if name in TORCHRUN_CASES:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "metagrad", "train", *TORCHRUN_CASES[name].split(),
        ]  # fmt: skip
    else:
        command = [sys.executable, "-m", "metagrad", "train", *TRAINING_CASES[name].split()]
    command += ["--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return checkpoint_digest(out / "checkpoint.pt")


def layer_cases() -> dict[str, Any]:
    """``name -> QuantConfig``: every kind of config a quantized layer takes."""
    import metagrad as mg

    spec = mg.QuantSpec
    fp4 = spec(format="fp4_e2m1", rounding="stochastic", granularity="block", block_size=16)
    configs = {
        "int8-default": mg.QuantConfig(),
        "int4-nearest-channel": mg.QuantConfig(grad=spec(4, "nearest", "channel")),
        "int4-stochastic-sample": mg.QuantConfig(grad=spec(4, "stochastic", "sample")),
        "int4-operands8": mg.QuantConfig(grad=spec(4, "stochastic"), backward_operand_bits=8),
        "int8-backend": mg.QuantConfig(grad=spec(8, "stochastic"), backend="int8"),
        "int8-backend-qat": mg.QuantConfig(
            grad=spec(4, "stochastic"),
            weight=spec(8, "nearest", "channel"),
            activation=spec(8),
            backend="int8",
        ),
        "qat-simulate": mg.QuantConfig(
            grad=spec(6, "stochastic"), weight=spec(4, "nearest", "channel"), activation=spec(4)
        ),
        "fp8-e4m3-tensor": mg.QuantConfig(grad=spec(format="fp8_e4m3", rounding="stochastic")),
        "fp4-block-e4m3": mg.QuantConfig(grad=replace(fp4, scale_format="e4m3")),
        "fp4-block-e8m0-rht": mg.QuantConfig(
            grad=replace(fp4, scale_format="e8m0", transform="rht", transform_block=16)
        ),
        "bhq-sample": mg.QuantConfig(
            grad=spec(4, "stochastic", "sample", transform="bhq", transform_block=4)
        ),
        "per-product": mg.QuantConfig(
            grad=spec(format="fp8_e5m2"),
            grad_for_weight_grad=fp4,
            weight_for_input_grad=spec(format="fp8_e4m3"),
            input_for_weight_grad=spec(format="fp8_e4m3", granularity="block", block_size=16),
        ),
    }
    return configs


def run_layers() -> dict[str, str]:
    """Digests of gradients through a conv, a linear and an attention layer per config."""
    import metagrad as mg

    torch.set_num_threads(1)
    results = {}
    for name, config in layer_cases().items():
        for dtype in (None, torch.bfloat16):
            torch.manual_seed(11)
            model = torch.nn.Sequential(
                torch.nn.Conv2d(4, 8, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Flatten(),
                torch.nn.Linear(8 * 6 * 6, 16),
            )
            attention = torch.nn.ModuleDict(
                {"mha": torch.nn.MultiheadAttention(16, 2, batch_first=True)}
            )
            mg.quantize_(model, config)
            mg.quantize_(attention, config)
            x = torch.randn(8, 4, 6, 6, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                h = model(x).view(8, 4, 4).repeat(1, 1, 4)
                out, _ = attention.mha(h, h, h)
                loss = out.float().square().mean()
            loss.backward()
            grads = {f"x.{name}": x.grad}
            for module in (model, attention):
                for pname, p in module.named_parameters():
                    grads[f"{module.__class__.__name__}.{pname}"] = p.grad
            results[f"{name}/{'bf16' if dtype else 'fp32'}"] = digest(grads)
    return results


def compute(names: list[str] | None = None) -> dict[str, Any]:
    cases = [*TRAINING_CASES, *TORCHRUN_CASES]
    workdir = Path(tempfile.mkdtemp(prefix="metagrad-golden-"))
    try:
        training = {name: run_training(name, workdir) for name in (names or cases)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"training": training, "layers": run_layers()}


def load() -> dict[str, Any]:
    return json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write this machine's entry")
    parser.add_argument(
        "--case",
        nargs="+",
        help="training cases to run (and, with --record, to re-record: a change of numerics "
        "intended for these cases only); default all, and the layer cases",
    )
    args = parser.parse_args()
    key = fingerprint()
    if args.case:
        workdir = Path(tempfile.mkdtemp(prefix="metagrad-golden-"))
        try:
            results = {"training": {name: run_training(name, workdir) for name in args.case}}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    else:
        results = compute()
    if args.record:
        golden = load()
        entry = golden.setdefault(key, {"training": {}, "layers": {}})
        for kind, values in results.items():
            entry[kind].update(values)
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        print(f"recorded {', '.join(f'{len(v)} {k}' for k, v in results.items())} cases")
        return
    expected = load().get(key)
    if expected is None:
        sys.exit(f"no golden entry for {key}")
    differ = [
        f"{kind}/{name}"
        for kind, values in results.items()
        for name in values
        if values[name] != expected[kind].get(name)
    ]
    print("identical" if not differ else "differ: " + ", ".join(differ))


if __name__ == "__main__":
    main()
