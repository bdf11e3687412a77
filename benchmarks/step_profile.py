"""Where a training step's time goes: its operators' time under ``torch.profiler``, by kind.

    python -m benchmarks.step_profile     # -> results/step-profile-cpu-<cpu model>.json

For each model (``--models``) at each width (``--widths``), each setting (``--settings``, names
of the step matrix's settings) runs ``--warmup`` steps, then ``--steps`` steps under the
profiler, as ``metagrad train`` runs them (a model with attention under the attention kernel
the step matrix would choose: ``--attention-kernel``). Every operator's own (self) CPU time is
put in one phase (the backward pass, whose operators run inside autograd's
``evaluate_function``, or the rest: the forward pass and the optimizer's step, which may run
the whole step as its closure) and one kind:

- ``attention``: whatever ``scaled_dot_product_attention`` runs, and its backward;
- ``products``: matrix products (``mm``, ``addmm``, ``bmm``, ``_int_mm``, ...);
- ``convolutions``: the convolutions' own kernels, forward and backward;
- ``compiled kernels``: calls of code ``torch.compile`` generated, and their dispatch;
- ``other``: the rest (normalization, activations, copies, autograd's own functions, ...).

The backward pass's products and convolutions are all that an integer backend replaces (it
quantizes and multiplies the backward products of Linear and Conv2d layers): the rest of a
step, whatever the backend, bounds from below what its step can cost. The file records that
share of each step (``backward products``). Profiled times include the profiler's own cost per
operator, so the shares describe the operators, not the step's wall time.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.runner import step_batches, synthetic_data, training_step
from benchmarks.speed import cpu_record, write_record
from benchmarks.step_matrix import MODELS, SETTINGS, choose_attention, has_attention
from metagrad.data.corpus import load_char_corpus
from metagrad.training.config import ATTENTION_KERNELS

KINDS = ("attention", "products", "convolutions", "compiled kernels", "other")
PHASES = ("backward", "forward and optimizer")
PRODUCTS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_int_mm",
    "aten::_scaled_mm",
    "aten::linear",
    "aten::matmul",
}
COMPILED = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo", "Pregraph bytecode")
COMPILED_WRAPPERS = ("AOTDispatcher", "CompiledFunction")
ATTENTION = "aten::scaled_dot_product_attention"
EVALUATE = "autograd::engine::evaluate_function"


def kind_of(name: str) -> str:
    """The kind of the operator ``name`` (one of :data:`KINDS`)."""
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if name in PRODUCTS:
        return "products"
    if "convolution" in name:
        return "convolutions"
    if name.startswith(COMPILED) or name.startswith(COMPILED_WRAPPERS):
        return "compiled kernels"
    return "other"


def _ancestors(event: Any) -> Iterator[Any]:
    """``event`` and the events it ran inside, innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _autograd_node(event: Any) -> Any | None:
    """The backward function (``autograd::engine::evaluate_function``) ``event`` ran in."""
    return next((a for a in _ancestors(event) if a.name.startswith(EVALUATE)), None)


def classify(events: list[Any]) -> Iterator[tuple[str, str, Any]]:
    """``(phase, kind, event)`` of each operator event (:data:`PHASES`, :data:`KINDS`).

    Attention counts whatever ``scaled_dot_product_attention`` ran, whichever its kernel (its
    math kernel is matrix products and a softmax), and the backward functions of those
    operators: autograd numbers each forward operator and the function of its backward alike.
    """
    inside = [any(a.name == ATTENTION for a in _ancestors(e)) for e in events]
    pairs = list(zip(events, inside, strict=True))
    attention_numbers = {e.sequence_nr for e, i in pairs if i and e.sequence_nr >= 0}
    for event, in_attention in pairs:
        node = _autograd_node(event)
        if node is not None:
            phase, in_attention = "backward", node.sequence_nr in attention_numbers
        else:
            phase = "forward and optimizer"
        yield phase, "attention" if in_attention else kind_of(event.name), event


def profile_steps(settings: dict[str, Any], data: Any, base: dict[str, Any], steps: int,
                  warmup: int) -> dict[str, Any]:  # fmt: skip
    """Milliseconds per step of each phase and kind, their total and the backward products'
    share."""
    batches = step_batches(data, base, warmup + steps)
    step = training_step({**base, **settings}, data)
    for x, y in batches[:warmup]:
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches[warmup:]:
            step(x, y)
    ms: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PHASES}
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    for phase, kind, event in classify(events):
        ms[phase][kind] += event.self_cpu_time_total / 1e3 / steps
    rows = {p: {k: round(ms[p][k], 3) for k in KINDS} for p in PHASES}
    total = sum(sum(r.values()) for r in rows.values())
    replaced = rows["backward"]["products"] + rows["backward"]["convolutions"]
    return {
        "ms": rows,
        "total_ms": round(total, 3),
        "backward_products_share": round(replaced / total, 4) if total else None,
        "steps": steps,
        "warmup": warmup,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gpt_char", "vgg16"], choices=MODELS)
    parser.add_argument("--widths", type=float, nargs="*", default=[1.0, 0.25])
    parser.add_argument(
        "--settings", nargs="*", default=["bf16", "int8 backend"], choices=list(SETTINGS)
    )
    parser.add_argument(
        "--attention-kernel", default="fastest", choices=["fastest", *ATTENTION_KERNELS]
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, head = cpu_record("step_profile", args.out)
    record: dict[str, Any] = {**head, "runs": []}
    for model in args.models:
        gpt = model.startswith("gpt")
        data = load_char_corpus() if gpt else synthetic_data(MODELS[model]["batch_size"] * 16)
        for width in args.widths:
            base = {**MODELS[model], "width": width, "device": "cpu"}
            attention: dict[str, Any] = {}
            if has_attention(base, data):  # the step matrix's baseline: the faster kernel
                attention = choose_attention(base, data, args.attention_kernel, args.warmup)
                base["attention_kernel"] = attention["attention_kernel"]
            run: dict[str, Any] = {
                "model": model,
                "width": width,
                "base": base,
                **attention,
                "profiles": {},
            }
            record["runs"].append(run)
            for name in args.settings:
                result = profile_steps(SETTINGS[name], data, base, args.steps, args.warmup)
                run["profiles"][name] = {"setting": SETTINGS[name], **result}
                print(
                    f"{model} width {width:g} {name}: {result['total_ms']:.1f} ms of operators "
                    f"a step, backward products {result['backward_products_share']:.1%}",
                    flush=True,
                )
    return write_record(out, record)


if __name__ == "__main__":
    main()
