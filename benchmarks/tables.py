"""Markdown tables of the committed benchmark results, written into the documentation.

    python -m benchmarks.tables            # print every table
    python -m benchmarks.tables --write    # rewrite the tables in README.md and docs/results.md
    python -m benchmarks.tables --check    # exit 1 if a document's tables differ from the JSON

A document holds a generated table between two markers, ``<!-- tables:NAME -->`` and
``<!-- /tables:NAME -->``, with ``NAME`` a key of :data:`TABLES`; ``--write`` replaces what lies
between them and leaves every other line (headings, the hand-written analysis) as it is. Each
table is rendered from files in ``benchmarks/results/`` and followed by the command that wrote
each file (``commands``: every such command, as one block). ``tests/test_tables.py`` checks that
the committed documents are what ``--write`` makes of the committed files.

The renderers live beside this module: :mod:`benchmarks.tables_training` (training runs; methods
compared by their differences paired by seed, with 95% confidence intervals and sign-flip p),
:mod:`benchmarks.tables_measures` (memory, gradient statistics, communication),
:mod:`benchmarks.tables_speed` (the speed benchmark, one results file per machine side by side) and
:mod:`benchmarks.findings` (the findings' sentences, every number in them computed here from the
result files, so that prose and files cannot disagree).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import findings
from benchmarks.tables_measures import (
    ceiling_rerun_table,
    comm_table,
    compile_step_table,
    demo_table,
    fsdp_table,
    horizon_cost_table,
    inference_table,
    integrations_table,
    meta_gradient_table,
    overhead_table,
    signal_table,
    snr_table,
    step_ratio_table,
    transformers_table,
)
from benchmarks.tables_speed import (
    kernel_ab_table,
    layer_overhead_table,
    speed_goals_table,
    speed_table,
    step_matrix_runs_table,
    step_matrix_table,
    step_profile_table,
)
from benchmarks.tables_training import (
    ablation_table,
    biased_table,
    comm_training_table,
    headline_table,
    horizon_table,
    methods_table,
    oracle_table,
    paired_table,
    reproduce_table,
    stopped_table,
    training_table,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
"""The files ``--write`` and ``--check`` work on."""
BLOCK = re.compile(
    r"^<!-- tables:(?P<name>[\w-]+) -->\n.*?^<!-- /tables:(?P=name) -->$", re.S | re.M
)
"""A generated block: the markers stand alone on their lines."""
START = re.compile(r"^<!-- tables:([\w-]+) -->$", re.M)


def commands_block() -> str:
    """Every command that wrote a committed result file, once, with the files it writes."""
    files: dict[str, list[str]] = {}
    for table in TABLES.values():
        for f, recorded in zip(table.files, table.commands, strict=True):
            commands = [recorded] if isinstance(recorded, str) else [c for _, c in recorded]
            for command in commands:
                if (RESULTS / f).is_file() and f not in files.setdefault(command, []):
                    files[command].append(f)
    lines = [f"{c}\n    # -> {', '.join(fs)}" for c, fs in files.items() if fs]
    return "```bash\n" + "\n".join(lines) + "\n```"


@dataclass(frozen=True)
class Table:
    """A generated table: the result files it reads, how it renders them, and the command that
    writes each file (run from the repository root)."""

    files: tuple[str, ...]
    render: Callable[..., str]
    commands: tuple[str | tuple[tuple[str, str], ...], ...]
    text: bool = False  # the files are plain text, not JSON


def _table(files: str | tuple[str, ...], render: Callable[..., str], *commands: str) -> Table:
    files = files if isinstance(files, tuple) else (files,)
    return Table(files, render, commands)


METHODS = "python -m benchmarks.methods --parallel 2 --threads 1 --timing-width 1.0"
RECIPES = "psq bhq luq rht-mxfp4 rht-nvfp4 fp8-e5m2"
METHODS_GPT = (
    "python -m benchmarks.methods --task gpt --epochs 3 --parallel 2 --threads 1 --diag-every 25 "
    f"--metagrad fp8-e5m2 rht-nvfp4 --recipes {RECIPES}"
)
METHODS_GPT7 = (
    "python -m benchmarks.methods --task gpt --seeds 0 1 2 3 4 5 6 7 "
    "--presets plain rht-nvfp4 fp8-e5m2 --metagrad plain rht-nvfp4 fp8-e5m2 --hyper-lr 1e-4 "
    "--parallel 2 --threads 1 --timing-steps 0 "
    "--skip fp32-s0 fp32-s1 fp32-s2 fp32-s3 fp32-s4 fp32-s5 fp32-s6 fp32-s7 "
    "--runs-dir runs/methods-gpt7 --output benchmarks/results/methods-gpt7.json"
)
METHODS_RECIPES = (
    f"python -m benchmarks.methods --epochs 3 --presets {RECIPES} --recipes {RECIPES} "
    "--metagrad "
    "--skip fp32-s0 fp32-s1 fp32-s2 --timing-steps 0 --parallel 2 --threads 1 "
    "--output benchmarks/results/methods-recipes.json"
)
ORACLE = (
    "python -m benchmarks.metagrad_oracle --arms plain oracle oracle-ls --seeds 0 1 2 3 4 "
    "--parallel 2"
)
BIASED = (
    "python -m benchmarks.metagrad_biased --parallel 2 "
    "--stage STAGE (candidates, sweep, primary, control, diagnose)"
)
CEILING = "python -m benchmarks.metagrad_ceiling --threads 2"
REPRODUCE = (
    "metagrad reproduce --profile cpu --seeds 0 1 --parallel 2 --threads 1 "
    "--out benchmarks/results/reproduce-cpu"
)
ABLATIONS = "python -m benchmarks.metagrad_ablations --threads 2"
SPEED = "python -m benchmarks.speed"
SPEED_CPU = tuple(sorted(p.name for p in RESULTS.glob("speed-cpu-*.json"))) or (
    "speed-cpu-amd-epyc.json",
)
"""The speed benchmark's CPU results, one file per CPU model (``speed-cpu-<model>.json``)."""
STEP_MATRIX_CPU = tuple(
    sorted(
        (p.name for p in RESULTS.glob("step-matrix-cpu-*.json")),
        key=lambda name: (re.search(r"-w[\d.]+\.json$", name) is not None, name),
    )
) or ("step-matrix-cpu-intel-xeon-processor.json",)
"""The step matrix's CPU results (``step-matrix-cpu-<model>[-w<width>].json``)."""


def _recorded_command(name: str, default: str) -> str | tuple[tuple[str, str], ...]:
    """The command a result file records it was written by (``default`` where it records none);
    where some of its models kept the command of an earlier run (``--keep-models``), each
    model's command, by model."""
    try:
        data = json.loads((RESULTS / name).read_text())
        command = data.get("command")
    except (OSError, ValueError, AttributeError):
        return default
    command = command if isinstance(command, str) and command else default
    models = [k for k, v in data.items() if isinstance(v, dict) and "steps" in v]
    kept = {k: data[k]["command"] for k in models if data[k].get("command")}
    if not kept:
        return command
    return tuple((k, kept.get(k, command)) for k in models)


def _written_by(command: str | tuple[tuple[str, str], ...]) -> str:
    if isinstance(command, str):
        return f"`{command}`"
    return ", ".join(f"`{c}` ({label})" for label, c in command)


def _step_matrix_commands(files: tuple[str, ...]) -> tuple:
    """The command that wrote each step-matrix file (a repeat names its ``--out``)."""
    return tuple(
        _recorded_command(
            f,
            "python -m benchmarks.step_matrix --models vgg16 gpt_char --parts steps --threads 2"
            + "".join(f" --width {w}" for w in re.findall(r"-w([\d.]+)\.json$", f))
            + (f" --out benchmarks/results/{f}" if "repeat" in f else ""),
        )
        for f in files
    )


STEP_MATRIX_COMMANDS = _step_matrix_commands(STEP_MATRIX_CPU)
STEP_MATRIX_GOALS = tuple(
    f
    for name in STEP_MATRIX_CPU
    for f in (name, name.replace("step-matrix-cpu", "step-matrix-repeat-cpu"))
    if f == name or (RESULTS / f).is_file()
)
"""The step matrix's CPU results, each followed by its repeat where there is one."""
STEP_MATRIX_RUNS = tuple(
    f
    for f in STEP_MATRIX_GOALS
    if "repeat" in f or f.replace("step-matrix-cpu", "step-matrix-repeat-cpu") in STEP_MATRIX_GOALS
)
"""The step-matrix runs that have a repeat, each followed by it (``step-matrix-repeat-cpu-*``)."""
STEP_MATRIX_RUNS_COMMANDS = _step_matrix_commands(STEP_MATRIX_RUNS)
STEP_MATRIX_GOALS_COMMANDS = _step_matrix_commands(STEP_MATRIX_GOALS)
STEP_RECIPES = tuple(
    f"step-recipes{when}-cpu-amd-epyc{width}.json"
    for width in ("", "-w0.25")
    for when in ("-before", "")
)
"""The papers' whole recipes timed beside their presets, at full width and at width 0.25: on the
code before their products ran on the transformed operands (93f73d2), then after."""
STEP_RECIPES_COMMANDS = tuple(
    ("PYTHONPATH=<a checkout of 93f73d2>/src " if "before" in f else "")
    + "python -m benchmarks.step_matrix --models vgg16 gpt_char --parts steps --threads 2 "
    + "".join(f"--width {w} " for w in re.findall(r"-w([\d.]+)\.json$", f))
    + "--settings bf16 plain rht-mxfp4 rht-nvfp4 'rht-mxfp4 recipe' 'rht-nvfp4 recipe' "
    + f"--out benchmarks/results/{f}"
    for f in STEP_RECIPES
)
SIGNAL = "python -m benchmarks.metagrad_signal --threads 1"
HORIZON = "python -m benchmarks.metagrad_horizon --threads 1 --parallel 2"
TABLES: dict[str, Table] = {
    "headline": _table(("methods.json", "methods-gpt.json"), headline_table, METHODS, METHODS_GPT),
    "demo": Table(
        ("demo.txt",), demo_table, ("metagrad demo > benchmarks/results/demo.txt",), text=True
    ),
    "commands": Table((), commands_block, ()),
    "methods": _table("methods.json", methods_table, METHODS),
    "methods-gpt": _table("methods-gpt.json", methods_table, METHODS_GPT),
    "methods-recipes": _table("methods-recipes.json", methods_table, METHODS_RECIPES),
    "methods-gpt7": _table("methods-gpt7.json", methods_table, METHODS_GPT7),
    "oracle": _table("metagrad-oracle.json", oracle_table, ORACLE),
    "biased": _table("metagrad-biased.json", biased_table, BIASED),
    "ceiling-rerun": _table("metagrad-ceiling.json", ceiling_rerun_table, CEILING),
    "baselines": _table(
        "quantized-baselines.json",
        training_table,
        "python -m benchmarks.quantized_baselines",
    ),
    "baselines-step-time": _table(
        "quantized-baselines.json",
        step_ratio_table,
        "python -m benchmarks.quantized_baselines",
    ),
    "metagrad-cifar10": _table(
        "metagrad-cifar10.json", training_table, "python -m benchmarks.metagrad_cifar10 --threads 1"
    ),
    "metagrad-paired": _table(
        "metagrad-cifar10.json", paired_table, "python -m benchmarks.metagrad_cifar10 --threads 1"
    ),
    "metagrad-stopped": _table(
        "metagrad-cifar10-stopped.json",
        stopped_table,
        "python -m benchmarks.metagrad_cifar10 --threads 1",
    ),
    "reproduce-cpu": _table(
        "reproduce-cpu/results.json",
        reproduce_table,
        REPRODUCE,
    ),
    "ablations": _table(
        "metagrad-ablations.json",
        ablation_table,
        ABLATIONS,
    ),
    "ceiling": _table("metagrad-signal.json", signal_table, SIGNAL),
    "snr": _table("metagrad-signal.json", snr_table, SIGNAL),
    "meta-gradient": _table(
        "metagrad-signal.json",
        meta_gradient_table,
        SIGNAL,
    ),
    "horizon": _table(
        "metagrad-horizon.json",
        horizon_table,
        HORIZON,
    ),
    "horizon-cost": _table(
        "metagrad-horizon-cost.json",
        horizon_cost_table,
        "python -m benchmarks.metagrad_horizon --cost",
    ),
    "overhead": _table(
        "metagrad-overhead.json", overhead_table, "python -m benchmarks.metagrad_overhead"
    ),
    "speed-cpu": _table(SPEED_CPU, speed_table, *[SPEED] * len(SPEED_CPU)),
    "step-matrix-cpu": _table(STEP_MATRIX_CPU, step_matrix_table, *STEP_MATRIX_COMMANDS),
    "speed-goals": _table(
        STEP_MATRIX_GOALS,
        functools.partial(
            speed_goals_table, repeats=tuple("repeat" in f for f in STEP_MATRIX_GOALS)
        ),
        *STEP_MATRIX_GOALS_COMMANDS,
    ),
    "step-matrix-runs": _table(
        STEP_MATRIX_RUNS, step_matrix_runs_table, *STEP_MATRIX_RUNS_COMMANDS
    ),
    "step-recipes": _table(STEP_RECIPES, step_matrix_table, *STEP_RECIPES_COMMANDS),
    "kernel-ab": _table(
        "kernel-ab-cpu-amd-epyc.json", kernel_ab_table, "python -m benchmarks.kernel_ab"
    ),
    "step-profile-cpu": _table(
        "step-profile-cpu-amd-epyc.json", step_profile_table, "python -m benchmarks.step_profile"
    ),
    "layer-overhead-cpu": _table(
        "layer-overhead-cpu-amd-epyc.json",
        layer_overhead_table,
        "python -m benchmarks.layer_overhead",
    ),
    "speed-cuda": _table(
        "speed-cuda.json", speed_table, "python -m benchmarks.speed --device cuda"
    ),
    "transformers-cpu": _table(
        "transformers-cpu.json", transformers_table, "python -m benchmarks.transformers --threads 1"
    ),
    "integrations-cpu": _table(
        "integrations-cpu.json", integrations_table, "python -m benchmarks.integrations"
    ),
    "compile-step-cpu": _table(
        "compile-step-cpu.json", compile_step_table, "python -m benchmarks.compile_step"
    ),
    "inference-cpu": _table(
        "inference-cpu.json", inference_table, "python -m benchmarks.inference"
    ),
    "fsdp-cpu": _table("fsdp-cpu.json", fsdp_table, "python -m benchmarks.fsdp"),
    "comm": _table("comm.json", comm_table, "python -m benchmarks.comm"),
    "comm-training": _table(
        "comm-training.json", comm_training_table, "python -m benchmarks.comm_training"
    ),
    # The findings' sentences (benchmarks/findings.py)
    "headline-findings": _table(
        ("methods.json", "methods-gpt.json"), findings.headline_findings, METHODS, METHODS_GPT
    ),
    "methods-findings": _table("methods.json", findings.methods_findings, METHODS),
    "methods-gpt-findings": _table(
        ("methods.json", "methods-gpt.json"), findings.methods_gpt_findings, METHODS, METHODS_GPT
    ),
    "recipes-findings": _table(
        ("methods-recipes.json", "methods-gpt.json"),
        findings.recipes_findings,
        METHODS_RECIPES,
        METHODS_GPT,
    ),
    "oracle-findings": _table("metagrad-oracle.json", findings.oracle_findings, ORACLE),
    "metagrad-findings": _table(
        ("metagrad-cifar10.json", "speed-cpu-amd-epyc.json"),
        findings.metagrad_findings,
        "python -m benchmarks.metagrad_cifar10 --threads 1",
        SPEED,
    ),
    "reproduce-findings": _table(
        "reproduce-cpu/results.json", findings.reproduce_findings, REPRODUCE
    ),
    "horizon-findings": _table(
        ("metagrad-horizon.json", "metagrad-ablations.json"),
        findings.horizon_findings,
        HORIZON,
        ABLATIONS,
    ),
    "meta-gradient-findings": _table(
        "metagrad-signal.json", findings.meta_gradient_findings, SIGNAL
    ),
    "comm-training-findings": _table(
        "comm-training.json", findings.comm_training_findings, "python -m benchmarks.comm_training"
    ),
}
"""Every generated block by the name its markers use."""


def available(name: str) -> bool:
    """Whether the result files of table ``name`` are committed."""
    return all((RESULTS / f).is_file() for f in TABLES[name].files)


def render(name: str, where: Path = ROOT) -> str:
    """Table ``name`` and, below it, its source files (linked relative to the folder ``where``)
    and the command that writes them."""
    table = TABLES[name]
    missing = [f for f in table.files if not (RESULTS / f).is_file()]
    if missing:
        raise FileNotFoundError(f"table {name!r} needs benchmarks/results/{missing[0]}")
    texts = [(RESULTS / f).read_text() for f in table.files]
    body = table.render(*(texts if table.text else [json.loads(t) for t in texts]))
    if not table.files:
        return body
    sources = " and ".join(
        f"[`benchmarks/results/{f}`]({Path(os.path.relpath(RESULTS / f, where)).as_posix()}), "
        f"written by {_written_by(command)}"
        for f, command in zip(table.files, table.commands, strict=True)
    )
    return f"{body}\n\nSource: {sources}."


def fill(text: str, where: Path = ROOT) -> str:
    """``text`` with every marked block rewritten from the result files."""
    names = START.findall(text)
    unknown = sorted(set(names) - TABLES.keys())
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
    blocks = [m["name"] for m in BLOCK.finditer(text)]
    if blocks != names:
        unclosed = next(n for n in names if names.count(n) != blocks.count(n))
        raise ValueError(f"<!-- tables:{unclosed} --> has no <!-- /tables:{unclosed} -->")
    return BLOCK.sub(
        lambda m: (
            f"<!-- tables:{m['name']} -->\n\n{render(m['name'], where)}\n\n"
            f"<!-- /tables:{m['name']} -->"
        ),
        text,
    )


def stale(documents: tuple[Path, ...] | None = None) -> list[Path]:
    """The documents (default :data:`DOCUMENTS`) whose tables differ from the result files."""
    return [d for d in documents or DOCUMENTS if fill(d.read_text(), d.parent) != d.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"tables to print (default: all): {', '.join(TABLES)}"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write", action="store_true", help="rewrite the tables in README.md and docs/results.md"
    )
    action.add_argument(
        "--check", action="store_true", help="exit 1 if a document's tables are out of date"
    )
    args = parser.parse_args(argv)
    if args.write:
        for doc in DOCUMENTS:
            text = doc.read_text()
            new = fill(text, doc.parent)
            if new != text:
                doc.write_text(new)
                print(f"rewrote {doc.relative_to(ROOT)}")
        return 0
    if args.check:
        out_of_date = stale()
        for doc in out_of_date:
            name = doc.relative_to(ROOT)
            print(f"{name}: tables out of date; run python -m benchmarks.tables --write")
        return 1 if out_of_date else 0
    unknown = sorted(set(args.names) - TABLES.keys())
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
    for name in args.names or [n for n in TABLES if available(n)]:
        print(f"### {name}\n\n{render(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
