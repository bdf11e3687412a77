"""The ``metagrad train`` flags: one per :class:`TrainConfig` setting, with help texts that name
the choices of each setting's registry."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from metagrad.backward.backend import list_backends
from metagrad.meta.forms import HYPERNET_FORMS
from metagrad.meta.hyper import HYPERNET_KINDS
from metagrad.meta.updates import BASE_RULES
from metagrad.models import list_models
from metagrad.parallel.comm import COMM_BITS
from metagrad.quant.formats import list_formats
from metagrad.quant.presets import list_presets
from metagrad.quant.recipes import list_recipes
from metagrad.quant.scaling import list_scale_formats
from metagrad.quant.transforms import list_transforms
from metagrad.training.config import SPEC_KEYS, TrainConfig


def help_texts() -> dict[str, str]:
    """Each setting's flag help, naming the choices its registry holds now."""
    spec = (
        "in the spec syntax: a number format ({formats}), then any of a granularity (tensor, "
        "channel, sample, block<N>, tile<N>), a scale format ({scales}; -floor or -nearest: "
        "its scale rounding), a rounding (nearest, stochastic), dither<bits>, pre<factor> and "
        "a transform ({transforms}), joined by ':' (left out: tensor, float32, nearest, no "
        "transform), e.g. "
    ).format(
        formats=", ".join(["fp32", *list_formats()]),
        scales=", ".join(list_scale_formats()),
        transforms=", ".join(f"{t}<N>" for t in list_transforms()),
    )
    comm = ", ".join(map(str, COMM_BITS))
    return {
        "model": f"model name from the registry ({', '.join(list_models())}; gpt_char: a "
        "character language model)",
        "width": "width multiplier of the model's channels",
        "data": "CIFAR-10 (python release .tar.gz or folder, image-folder dir or .zip) or "
        "'digits'; for gpt_char a UTF-8 text file or 'pydoc' (the default: Python's "
        "documentation)",
        "download": "download the CIFAR-10 python release into --data if it is not there",
        "optimizer": f"base update rule ({', '.join(BASE_RULES)})",
        "warmup_epochs": "linear learning-rate warm-up, then cosine decay to zero",
        "grad_bits": "bits of the backward error (2..8, or 32 for full precision)",
        "grad_quant": f"a published gradient quantizer by name ({', '.join(list_presets())}); "
        "replaces --grad-bits/--grad-rounding/--grad-granularity; --weight-spec-dgrad and "
        "--input-spec-wgrad may add quantized operands",
        "grad_spec": "quantizer of the backward error dL/dy in both backward products, "
        f"{spec}int4:sample:stochastic or fp4_e2m1:block32:e8m0:stochastic:rht32; replaces "
        "--grad-bits/--grad-rounding/--grad-granularity",
        "grad_spec_wgrad": "quantizer of the error in the weight-gradient product dL/dW only "
        "(spec syntax, as --grad-spec); default: the same as in dL/dx",
        "weight_spec_dgrad": "quantizer of the weight in the input-gradient product dL/dx "
        "(spec syntax, as --grad-spec); default: full precision",
        "input_spec_wgrad": "quantizer of the layer input in the weight-gradient product dL/dW "
        "(spec syntax, as --grad-spec); default: full precision",
        "weight_bits": "forward (QAT) bits of weights, 32 = off",
        "weight_spec": "forward (QAT) quantizer of weights (e.g. int8:channel, "
        "fp4_e2m1:tile16:e4m3-nearest; integer specs under --backend int8); replaces "
        "--weight-bits",
        "act_bits": "forward (QAT) bits of activations, 32 = off",
        "act_spec": "forward (QAT) quantizer of activations (e.g. int8; integer specs under "
        "--backend int8); replaces --act-bits",
        "recipe": "with --grad-quant: its paper's whole training recipe "
        f"({', '.join(list_recipes())}): the forward pass, both backward operands, the layers "
        "kept in full precision (docs/quantizers.md)",
        "backend": f"a registered backend ({', '.join(list_backends())}): simulate computes "
        "the products in float, int8 on integers, fp8 as FP8 GEMMs (Linear layers, FP8 grad specs)",
        "fp_first_last": "keep the first conv and the classifier unquantized",
        "method": "plain quantized gradients or MetaGrad's hypernetwork correction",
        "hyper": f"hypernetwork kind ({', '.join(HYPERNET_KINDS)}; MetaGrad)",
        "hyper_form": f"form of the correction ({', '.join(HYPERNET_FORMS)}): residual, or a "
        "gain per element (odd in g, keeps zeros) seeing |g| (gain) or g * sign(W) "
        "(signed-gain)",
        "hyper_hidden": "hypernetwork hidden width (MetaGrad)",
        "hyper_lr": "hypernetwork learning rate, Adam (MetaGrad)",
        "hyper_horizon": "updates the hypernetwork is trained through: 1 (the one-step method) "
        "or K (the loss after its last K updates, recomputed each step; MetaGrad)",
        "diag_every": "every N steps, compare used and full-precision gradients (gradients.jsonl)",
        "amp": "mixed precision: off, bf16 or fp16 (fp16 with loss scaling); auto: bf16 on "
        "CUDA, off on CPU",
        "compile": "torch.compile: off, kernels (fused quantizer and hypernetwork), model "
        "(kernels and the model's training forward, method plain); auto: kernels where "
        "torch.compile works",
        "routes": "backend int8: how each layer's backward products choose between integer "
        "products and bf16 products of the same 8-bit codes: measured (timed once per shape and "
        "machine, cached in ~/.cache/metagrad; summary.json: int8_routes) or fixed (integer, "
        "except convolutions on CUDA; reproducible timing); auto: $METAGRAD_INT8_ROUTES if set, "
        "else measured",
        "attention_kernel": "the kernel of scaled_dot_product_attention in the model's "
        "attention layers, training and evaluation: default (PyTorch's choice; on CPU its flash "
        "kernel) or math (matrix products and a softmax: the same arithmetic, faster in bf16 on "
        "some CPUs at small head sizes; docs/results.md, attention kernels)",
        "threads": "torch CPU threads (0: torch's default)",
        "cpu_memory": "what the process does with the CPU memory it frees (Linux, glibc): "
        "retain (kept for reuse, so that large temporaries are not page-faulted in afresh at "
        "every step; resident memory stays at its peak) or release (the C library's default: "
        "glibc returns large blocks to the system)",
        "nonfinite": "a step with a non-finite loss or gradient: stop the run before applying "
        "it, or skip it and count it (summary.json: nonfinite_steps)",
        "comm_bits": f"under torchrun: bits of the gradient all-reduce ({comm}; 16: bfloat16; "
        "8 or 4: stochastically rounded integers with block scales)",
        "shard": "under torchrun: ddp (every rank holds the model, DistributedDataParallel) or "
        "fsdp (parameters, gradients and optimizer state sharded over the ranks with FSDP2, "
        "checkpoints in shards; one process trains unsharded); fsdp takes method plain, "
        "comm-bits 32",
        "dist_timeout": "under torchrun: seconds a collective waits for the other ranks; then "
        "every rank stops with one line naming the ranks that did not answer",
        "max_steps": "stop after this many steps in total (0: no limit)",
        "out": "run directory (metrics.jsonl, summary.json, checkpoint.pt)",
        "resume": "continue the run in --out with its saved settings (plugins included); only "
        "epochs, max-steps, data, threads, cpu-memory, progress, compile, routes, "
        "attention-kernel, nonfinite and dist-timeout may be given again",
        "progress": "show a progress bar",
        "plugins": "a module to import before the settings are checked, so that what it "
        "registers (formats, scale formats, transforms, presets, backends, models, "
        "hypernetworks, base rules) is usable by name; repeatable (config files: a list)",
    }


FLAGS = {"plugins": "--plugin"}
"""Flags not spelled as their setting (``--plugin MODULE``, given once per module)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are suppressed so that only given flags override a file."""
    parser.add_argument(
        "--config",
        help="YAML or TOML file with the same keys as the flags (plugins: a list of modules)",
    )
    texts = help_texts()
    defaults = TrainConfig.defaults()
    for f in fields(TrainConfig):
        flag = FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": texts.get(f.name, "")}
        default = defaults[f.name]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(action="append", dest=f.name, metavar="MODULE")
        else:
            kwargs["type"] = type(default) if default is not None else str
            kwargs["metavar"] = "SPEC" if f.name in SPEC_KEYS else f.name.upper()
        if default not in (None, []):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)
