"""Compiled kernels against their eager references, inside whole training steps.

    python -m benchmarks.kernel_ab            # -> results/kernel-ab-cpu-<cpu model>.json

Each case builds two copies of one training step (as ``metagrad train`` runs it: bf16 autocast,
compiled kernels) and times them alternately, step by step on the same batches, after
``--warmup`` steps: one with a kernel compiled (new), one with that kernel's eager reference in
its place (old), which computes the same numbers as the code before the kernel existed. The
ratio new/old is the geometric mean of the per-step ratios with its 95% interval
(``metagrad.stats.paired_ratio``). ``--cases`` reruns some cases and keeps the others of the
results file (each case records its command). Cases:

- ``bias sums``: the full-width character GPT under ``plain``; the bias gradient's float32 sum
  of the error's bf16 codes (``metagrad.backward.products.summed``).
- ``transposed copy``: the full-width character GPT under ``rht-mxfp4``; the copy of the
  error's rows along the tokens (``metagrad.quant.transformed._contiguous``).
- ``fewer calls per layer, <model>, width <w>``: the character GPT and VGG-16 under ``plain`` at
  widths 1 and 0.25; on the error's integer codes, a linear layer's whole backward compiled as
  one kernel, a convolution's dither, codes and bias sum as one (``metagrad.backward.simulate``),
  against their eager references, whose parts are compiled kernels of their own (several calls
  per layer), as before. ``bias sums`` runs both of its steps with the backward so split
  (``both``), as when it was first measured: inside one compiled kernel, the sums' eager
  reference is traced and compiled with the rest.
- ``folded scales, vgg16, width <w>``: VGG-16 under ``psq`` at widths 1 and 0.25; a per-sample
  error scale folded into a convolution's layer input before the weight-gradient product, as
  one compiled pass (``metagrad.backward.products.folded``).
- ``finiteness``: full-width VGG-16 under MetaGrad (``plain``); its check that the loss and
  every gradient are finite (``metagrad.kernels.all_finite``: compiled calls of 8 tensors each).
- ``hypernet passes``: full-width VGG-16 under MetaGrad (``plain``); the fused hypernetwork
  (``metagrad.meta.fused``) against its code at commit ``HYPERNET_BEFORE``, read from the git
  history, whose kernels evaluated the network twice in the forward pass and four times in the
  backward (now once and twice) and recomputed the root mean squares; the same numbers.
- ``int8 codes``: full-width VGG-16 under the ``int8`` backend; its operand quantizer (absmax
  and rounding to int8 codes written into the product's buffer) and the rescaling of the
  integer products to float gradients (``metagrad.backward.int8.codes``).
- ``int32 conversions``: full-width VGG-16 under the ``int8`` backend; its rescaling kernels
  compiled with the per-vector int32 conversion of ``metagrad.vector_casts`` against the same
  kernels compiled with inductor's own (a scalar loop where a kernel writes bf16).

A case's ``both`` context, where it has one, holds for both steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import metagrad.backward.emulated as emulated
import metagrad.backward.int8.codes as int8_codes
import metagrad.backward.int8.conv as int8_conv
import metagrad.backward.int8.linear as int8_linear
import metagrad.backward.products as products
import metagrad.backward.simulate as simulate
import metagrad.meta.hyper as hyper
import metagrad.quant.transformed as transformed
from benchmarks.runner import step_batches, synthetic_data, training_step
from benchmarks.speed import cpu_record, machine
from benchmarks.step_matrix import MODELS, SETTINGS
from metagrad import kernels
from metagrad.data.corpus import load_char_corpus
from metagrad.stats import paired_ratio


@contextmanager
def _replaced(module: Any, name: str, value: Callable) -> Iterator[None]:
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


@contextmanager
def _eager_bias_sums() -> Iterator[None]:
    eager = products.summed.eager
    with _replaced(products, "summed", eager), _replaced(emulated, "summed", eager):
        yield


@contextmanager
def _eager_copy() -> Iterator[None]:
    with _replaced(transformed, "_contiguous", transformed._contiguous.eager):
        yield


@contextmanager
def _unfused_layers() -> Iterator[None]:
    """Each layer's backward as its eager reference, whose parts (quantizer, dither, bias sums,
    rescaling) are compiled kernels of their own: several calls of compiled code per layer."""
    with (
        _replaced(simulate, "_linear_from_codes", simulate._linear_from_codes.eager),
        _replaced(simulate, "_conv_codes", simulate._conv_codes.eager),
    ):
        yield


@contextmanager
def _eager_fold() -> Iterator[None]:
    with _replaced(products, "folded", products.folded.eager):
        yield


@contextmanager
def _eager_finite() -> Iterator[None]:
    with _replaced(kernels, "_all_finite", kernels._all_finite.eager):
        yield


@contextmanager
def _eager_int8_codes() -> Iterator[None]:
    eager_rescale = int8_codes._rescale.eager
    with (
        _replaced(int8_codes, "_operand_codes", int8_codes._operand_codes.eager),
        _replaced(int8_codes, "_nearest_codes", int8_codes._nearest_codes.eager),
        _replaced(int8_conv, "_rescale", eager_rescale),
        _replaced(int8_linear, "_rescale", eager_rescale),
        _replaced(int8_conv, "_rescale_flipped_taps", int8_conv._rescale_flipped_taps.eager),
    ):
        yield


@functools.cache
def _rescale_kernels() -> dict[str, Callable]:
    """The ``int8`` backend's rescaling kernels registered afresh (compiled on first use)."""
    return {
        "rescale": kernels.kernel(int8_codes._rescale.eager),
        "taps": kernels.kernel(int8_conv._rescale_flipped_taps.eager),
    }


@contextmanager
def _scalar_int32_conversions() -> Iterator[None]:
    from torch._inductor import config
    from torch._inductor.codegen import cpp

    old = _rescale_kernels()  # compiled here, without the cache, by inductor's own conversion
    ours = cpp.CppVecKernel.get_to_dtype_expr
    with (
        _replaced(cpp.CppVecKernel, "get_to_dtype_expr", getattr(ours, "__wrapped__", ours)),
        config.patch(force_disable_caches=True),
        _replaced(int8_conv, "_rescale", old["rescale"]),
        _replaced(int8_linear, "_rescale", old["rescale"]),
        _replaced(int8_conv, "_rescale_flipped_taps", old["taps"]),
    ):
        yield


HYPERNET_BEFORE = "24983e8"
"""The last commit with the fused hypernetwork's earlier kernels."""

_OLD_OPTIONS = {k: v for k, v in kernels.RECOMPUTE.items() if k != "cpp.max_horizontal_fusion_size"}


def _module_at(commit: str, path: str, name: str) -> ModuleType:
    """The module in file ``path`` as it was at ``commit`` (from the git history)."""
    root = Path(__file__).resolve().parents[1]
    try:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True
        )
    except OSError as err:  # no git
        shown = subprocess.CompletedProcess([], 1, "", str(err))
    if shown.returncode != 0:
        raise RuntimeError(
            f"this case needs {path} as it was at commit {commit}, from the git history of a "
            f"clone ({shown.stderr.strip() or 'git show failed'}); leave it out with --cases"
        )
    source = shown.stdout
    module = ModuleType(name)
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


@functools.cache
def _fused_before() -> ModuleType:
    return _module_at(HYPERNET_BEFORE, "src/metagrad/meta/fused.py", "fused_before")


@contextmanager
def _hypernet_before() -> Iterator[None]:
    old = _fused_before().FusedMLP
    # its kernels compile on their first call, here: with the inductor settings of that commit
    with _replaced(hyper, "FusedMLP", old), _replaced(kernels, "RECOMPUTE", _OLD_OPTIONS):
        yield


CASES: dict[str, dict[str, Any]] = {
    "bias sums": {
        "model": "gpt_char",
        "setting": "plain",
        "old": _eager_bias_sums,
        "both": _unfused_layers,
    },
    "transposed copy": {"model": "gpt_char", "setting": "rht-mxfp4", "old": _eager_copy},
    **{
        f"fewer calls per layer, {model}, width {width:g}": {
            "model": model,
            "setting": "plain",
            "width": width,
            "old": _unfused_layers,
        }
        for model in ("gpt_char", "vgg16")
        for width in (1.0, 0.25)
    },
    **{
        f"folded scales, vgg16, width {width:g}": {
            "model": "vgg16",
            "setting": "psq",
            "width": width,
            "old": _eager_fold,
        }
        for width in (1.0, 0.25)
    },
    "finiteness": {"model": "vgg16", "setting": "metagrad plain", "old": _eager_finite},
    "hypernet passes": {"model": "vgg16", "setting": "metagrad plain", "old": _hypernet_before},
    "int8 codes": {"model": "vgg16", "setting": "int8 backend", "old": _eager_int8_codes},
    "int32 conversions": {
        "model": "vgg16",
        "setting": "int8 backend",
        "old": _scalar_int32_conversions,
    },
}


def run_case(case: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """Median step seconds of new and old, and the paired ratio new/old."""
    base = {**MODELS[case["model"]], "width": case.get("width", 1.0), "device": "cpu"}
    gpt = case["model"].startswith("gpt")
    data = load_char_corpus() if gpt else synthetic_data(base["batch_size"] * (warmup + steps))
    batches = step_batches(data, base, warmup + steps)
    settings = {**base, **SETTINGS[case["setting"]]}
    runs = {"new": training_step(settings, data), "old": training_step(settings, data)}
    times: dict[str, list[float]] = {"new": [], "old": []}
    both = case.get("both", nullcontext)
    for i, (x, y) in enumerate(batches):
        for name, step in runs.items():
            with both(), case["old"]() if name == "old" else nullcontext():
                t0 = time.perf_counter()
                step(x, y)
                seconds = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(seconds)
    return {
        "model": case["model"],
        "setting": case["setting"],
        "width": base["width"],
        "median_seconds": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
        "step_seconds": times,
        "new_over_old": paired_ratio(times["new"], times["old"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, head = cpu_record("kernel_ab", args.out)
    record: dict[str, Any] = {**head, "cases": _kept_cases(out, args.cases)}
    for name in args.cases:
        case = run_case(CASES[name], args.steps, args.warmup)
        record["cases"][name] = {**case, "command": record["command"]}
        r = case["new_over_old"]
        print(f"{name:16s} new/old {r['ratio']:.3f} {r.get('ci95')} (n = {r['n']})", flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")


def _kept_cases(out: Path, rerun: list[str]) -> dict[str, Any]:
    """The cases of an earlier record in ``out`` that this run leaves as they are: those not
    rerun, still defined, from a run on this machine (each keeps the command that made it)."""
    if not out.exists():
        return {}
    try:
        earlier = json.loads(out.read_text())
    except json.JSONDecodeError:
        return {}
    if earlier.get("machine") != machine(torch.device("cpu")):
        return {}
    return {
        name: {"command": earlier.get("command", ""), **case}
        for name, case in earlier.get("cases", {}).items()
        if name in CASES and name not in rerun
    }


if __name__ == "__main__":
    main()
