"""``metagrad reproduce``: the paper's CIFAR-10 table (full precision, plain and MetaGrad at INT8
and INT4) by one command.

Every run is ``metagrad train`` in its own process, ``parallel`` at a time (several share one GPU
well; :mod:`metagrad.training.launcher`), writing into ``runs_dir/<run>``: a finished or diverged
run is skipped, a killed one resumed from its checkpoint. The report is built from every run
found in ``runs_dir`` (and any ``merge`` files), so separate invocations (other seeds, other
machines) add up to one table:

- ``results.json``: one record per run (setting, seed, accuracies per epoch, step time, memory,
  and the commit, torch, device and threads it ran with);
- ``report.md``: mean and spread per setting, MetaGrad minus plain paired by seed, gap to fp32;
- ``curves.png``: test accuracy per epoch, mean over seeds.

Every record is checked, field by field, before it is used (:mod:`.run_records`). A ``merge``
file that is missing, not JSON or holds a malformed record stops the report with one line that
names the file, the record and the problem. A run folder whose ``summary.json`` cannot be read
(a torn or hand-edited file) is trained again by the launcher, or left out of a
``--report-only`` report with a warning naming the file; a bad line in its ``metrics.jsonl``
leaves only its curve out (the table needs only the summary), with a warning naming the file
and the line.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagrad.checkpoint import atomic_write, write_json
from metagrad.stats import differences, interval_text, p_text, signed, summary
from metagrad.training.config import ConfigError
from metagrad.training.launcher import Launch, launch_runs
from metagrad.training.run_files import (
    METRICS,
    SUMMARY,
    RunFileError,
    is_number,
    json_kind,
    read_json,
    read_metrics,
    read_summary,
    warn,
)
from metagrad.training.run_records import check_fields, check_record, completed

TENSOR = {"grad_granularity": "tensor"}
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"grad_bits": 32},
    "int8-nearest-tensor": {"grad_bits": 8, "grad_rounding": "nearest", **TENSOR},
    "int4-stochastic-tensor": {"grad_bits": 4, "grad_rounding": "stochastic", **TENSOR},
    "int4-stochastic-sample": {
        "grad_bits": 4,
        "grad_rounding": "stochastic",
        "grad_granularity": "sample",
    },
    "int4-nearest-tensor": {"grad_bits": 4, "grad_rounding": "nearest", **TENSOR},
    "int4-nearest-sample": {
        "grad_bits": 4,
        "grad_rounding": "nearest",
        "grad_granularity": "sample",
    },
}
"""The table's rows; every quantized one is run plain and with MetaGrad (11 runs a seed)."""

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"model": "vgg16", "width": 1.0, "epochs": 200},
    "cpu": {"model": "vgg16", "width": 0.25, "epochs": 6, "amp": "off"},
}
"""``paper``: full width, the paper-style 200 epochs (``--epochs 30`` for a short table).
``cpu``: width 0.25 for 6 epochs in float32, the settings of ``benchmarks/metagrad_cifar10.py``."""

COMMON: dict[str, Any] = {
    "batch_size": 128,
    "lr": 0.1,
    "hyper": "grad+weight",
    "hyper_hidden": 8,
    "hyper_lr": 1e-4,
}
MODELS = ("vgg16", "resnet20", "resnet56", "mobilenetv2")
TABLE_KEYS = ("model", "width", "epochs")
"""What makes runs belong to one table."""


@dataclass(frozen=True)
class Run:
    """One training run of the table."""

    setting: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        method = "" if self.setting == "fp32" else f"-{self.method}"
        return f"{self.setting}{method}-seed{self.seed}"

    def settings(self, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, **SETTINGS[self.setting], "method": self.method, "seed": self.seed}


def plan(seeds: Sequence[int], only: Sequence[str] | None = None) -> list[Run]:
    """Every run, seed by seed (all of seed 0 first), optionally only the named settings."""
    runs = []
    for seed in seeds:
        for setting in SETTINGS:
            if only and setting not in only:
                continue
            methods = ("plain",) if setting == "fp32" else ("plain", "metagrad")
            runs += [Run(setting, method, seed) for method in methods]
    return runs


def base_settings(profile: str, model: str | None, epochs: int | None) -> dict[str, Any]:
    """The settings every run of the table shares."""
    if profile not in PROFILES:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    base = {**COMMON, **PROFILES[profile]}
    if model is not None:
        if model not in MODELS:
            raise ConfigError(f"model must be one of {', '.join(MODELS)}; got {model!r}")
        base["model"] = model
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        base["epochs"] = epochs
    return base


# ------------------------------------------------------------------------------ running


def run_all(
    runs: list[Run],
    base: dict[str, Any],
    data: str,
    runs_dir: Path,
    parallel: int,
    threads: int,
) -> dict[str, int]:
    """Train every unfinished run, ``parallel`` processes at a time; exit status per run (0 for
    a run that diverged: its divergence is its result). Ctrl-C stops the runs too, each keeping
    its last completed epoch."""
    launches = [Launch(run.name, run.settings(base), runs_dir / run.name) for run in runs]
    return launch_runs(launches, data, parallel=parallel, threads=threads, label="reproduce")


# ------------------------------------------------------------------------------ results


_CONFIG_FIELDS = ("method", "seed", "model", "width", "epochs")
"""What a run record takes from the run's settings, and from its summary:"""
_SUMMARY_FIELDS = ("epochs_completed", "final_test_acc", "best_test_acc")


def _curve(run_dir: Path) -> list[float]:
    """Test accuracy per completed epoch; [] with a warning if ``metrics.jsonl`` is bad."""
    if not (run_dir / METRICS).is_file():
        return []
    try:
        history = read_metrics(run_dir)
        for record in history:
            if not (is_number(record.get("test_acc")) and 0 <= record["test_acc"] <= 100):
                raise RunFileError(
                    f"{run_dir / METRICS}: test_acc of epoch {record['epoch']} is "
                    f"{json_kind(record.get('test_acc'))}"
                )
    except RunFileError as err:
        warn(f"{err}; the curve of {run_dir.name} is left out")
        return []
    return [record["test_acc"] for record in history]


def run_record(run_dir: Path) -> dict[str, Any] | None:
    """The result of one run directory (None if it has no summary yet, or no table setting).

    Raises:
        RunFileError: its ``summary.json`` is unreadable, or lacks or mistypes a field (one
            line naming the file). A bad ``metrics.jsonl`` only leaves the curve out (warning).
    """
    summary = read_summary(run_dir)
    if summary is None:
        return None
    where = str(run_dir / SUMMARY)
    cfg = summary.get("config")
    if not isinstance(cfg, dict):
        raise RunFileError(f"{where}: config is {json_kind(cfg)}, expected an object")
    missing = [f"config.{k}" for k in _CONFIG_FIELDS if k not in cfg]
    missing += [k for k in _SUMMARY_FIELDS if k not in summary]
    if missing:
        raise RunFileError(f"{where}: lacks {', '.join(missing)}")
    setting = next(
        (name for name, s in SETTINGS.items() if all(cfg.get(k) == v for k, v in s.items())),
        None,
    )
    if setting is None:
        return None
    provenance = summary.get("provenance") or {
        "torch": summary.get("torch"),
        "device": summary.get("device"),
        "threads": summary.get("threads"),
    }
    record = {
        "run": run_dir.name,
        "setting": setting,
        **{key: cfg[key] for key in _CONFIG_FIELDS},
        **{key: summary[key] for key in _SUMMARY_FIELDS},
        "diverged_at_step": summary.get("diverged_at_step"),
        "test_acc_per_epoch": [],
        "mean_step_seconds": summary.get("mean_step_seconds"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "amp": summary.get("amp", "off"),
        "compile": summary.get("compile", "off"),
        "provenance": provenance,
    }
    record = check_fields(record, where, SETTINGS)
    record["test_acc_per_epoch"] = _curve(run_dir)
    return record


def read_merge_file(path: Path, table: dict[str, Any]) -> list[dict[str, Any]]:
    """The checked run records of a ``results.json`` of the same ``table`` (``--merge``).

    Raises:
        RunFileError: a missing or unreadable file, not JSON, not a results object, or a
            malformed record (one line naming the file and the record).
        ConfigError: a table of another model, width or epochs.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunFileError(
            f"{path}: expected a results.json object with a table and runs, got {json_kind(data)}"
        )
    for key, kind, expected in (("table", dict, "an object"), ("runs", list, "a list")):
        if key not in data:
            raise RunFileError(f"{path}: no {key!r}; not a results.json of metagrad reproduce")
        if not isinstance(data[key], kind):
            raise RunFileError(f"{path}: {key!r} is {json_kind(data[key])}, expected {expected}")
    for key in TABLE_KEYS:
        if data["table"].get(key) != table[key]:
            raise ConfigError(
                f"{path}: a table of {key}={data['table'].get(key)!r}, not {table[key]!r}"
            )
    return [check_record(r, f"{path}, runs[{i}]", SETTINGS) for i, r in enumerate(data["runs"])]


def collect(runs_dir: Path, merge: Sequence[Path], table: dict[str, Any]) -> list[dict]:
    """Records of every run in ``runs_dir`` and the ``merge`` files that belong to ``table``
    (same model, width and epochs); a run found in several places keeps the local one. A run
    folder whose summary cannot be read is left out, with a warning naming the file."""
    records: dict[str, dict] = {}
    for path in merge:
        records.update({r["run"]: r for r in read_merge_file(Path(path), table)})
    if runs_dir.is_dir():
        for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
            try:
                record = run_record(run_dir)
            except RunFileError as err:
                warn(f"{err}; {run_dir.name} is left out of the report")
                continue
            if record is not None and all(record[k] == table[k] for k in TABLE_KEYS):
                records[record["run"]] = record
    return sorted(records.values(), key=lambda r: (r["seed"], list(SETTINGS).index(r["setting"])))


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({len(values)})"


def _gap(values: list[float]) -> str:
    """A paired mean difference and its 95% interval."""
    c = differences(values)
    return "-" if c.mean is None else f"{signed(c.mean)} {interval_text(c)}"


def summary_table(rows: dict[str, Any]) -> str:
    """Per setting: plain and MetaGrad over seeds (mean ± standard deviation (number of seeds),
    a description of spread); MetaGrad - plain paired by seed, with its 95% confidence interval
    and sign-flip p; each method minus fp32, paired, with its interval."""
    lines = [
        "| gradients | plain | MetaGrad | MetaGrad - plain | 95% CI | sign-flip p "
        "| plain - fp32 [95% CI] | MetaGrad - fp32 [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, row in rows.items():
        plain = _mean_sd([v for _, v in row["plain"]])
        if setting == "fp32":
            lines.append(f"| {setting} | {plain} | | | | | | |")
            continue
        c = differences(row["metagrad_minus_plain"])
        mean = "-" if c.mean is None else signed(c.mean)
        lines.append(
            f"| {setting} | {plain} | {_mean_sd([v for _, v in row['metagrad']])} | {mean} "
            f"| {interval_text(c)} | {p_text(c)} | {_gap(row['plain_minus_fp32'])} "
            f"| {_gap(row['metagrad_minus_fp32'])} |"
        )
    words = [
        f"- {setting}: {summary(differences(row['metagrad_minus_plain']))}"
        for setting, row in rows.items()
        if setting != "fp32"
    ]
    return "\n".join([*lines, "", "MetaGrad minus plain, in words:", "", *words])


def _accuracy(record: dict) -> float | None:
    """Final test accuracy; a run that diverged counts as chance (10%)."""
    if record["diverged_at_step"] is not None:
        return 10.0
    return record["final_test_acc"] if completed(record) else None


def summarize(records: list[dict]) -> dict[str, Any]:
    """Per setting: accuracies of plain and MetaGrad, their paired difference, gap to fp32."""
    acc: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        value = _accuracy(r)
        if value is not None:
            acc.setdefault((r["setting"], r["method"]), {})[r["seed"]] = value
    fp32 = acc.get(("fp32", "plain"), {})
    rows = {}
    for setting in SETTINGS:
        plain, meta = acc.get((setting, "plain"), {}), acc.get((setting, "metagrad"), {})
        if not plain and not meta:
            continue
        paired = [meta[s] - plain[s] for s in sorted(plain.keys() & meta.keys())]
        gap = [plain[s] - fp32[s] for s in sorted(plain.keys() & fp32.keys())]
        gap_meta = [meta[s] - fp32[s] for s in sorted(meta.keys() & fp32.keys())]
        rows[setting] = {
            "plain": sorted(plain.items()),
            "metagrad": sorted(meta.items()),
            "metagrad_minus_plain": paired,
            "plain_minus_fp32": gap,
            "metagrad_minus_fp32": gap_meta,
        }
    return rows


def report(table: dict[str, Any], records: list[dict], rows: dict[str, Any]) -> str:
    """The markdown report."""
    head = (
        f"# CIFAR-10: {table['model']} (width {table['width']}), {table['epochs']} epochs\n\n"
        "Final test accuracy (%): mean ± standard deviation over the seeds (number of seeds), a "
        "description of spread. A diverged run counts as 10% (chance). Differences are paired "
        "by seed: their mean, t-based 95% confidence interval and exact sign-flip p "
        "(`metagrad.stats`; with n seeds p cannot fall below 2/2^n). Words: an interval that "
        "holds 0 is *no difference detected*.\n\n"
    )
    commits: dict[str, int] = {}
    for r in records:
        commit = ((r["provenance"] or {}).get("commit") or "unknown")[:12]
        commits[commit] = commits.get(commit, 0) + 1
    code = ", ".join(f"{c} ({n} runs)" for c, n in commits.items())
    runs = [
        f"\n\n## Runs\n\nThe code they ran: commit {code}.\n\n"
        "| run | final | best | epochs | mean step s | amp | device | commit |\n"
        "|---|---|---|---|---|---|---|---|"
    ]
    for r in records:
        final = "diverged" if r["diverged_at_step"] is not None else r["final_test_acc"]
        final = f"{final:.2f}" if isinstance(final, float) else final
        prov = r["provenance"] or {}
        commit = (prov.get("commit") or "-")[:12]
        runs.append(
            f"| {r['run']} | {final} | {r['best_test_acc'] or 0:.2f} "
            f"| {r['epochs_completed']}/{r['epochs']} | {r['mean_step_seconds'] or 0:.3f} "
            f"| {r['amp']} | {prov.get('device_name') or prov.get('device')} | {commit} |"
        )
    return head + summary_table(rows) + "\n".join(runs) + "\n"


def plot(records: list[dict], output: Path) -> Path:
    """Test accuracy per epoch, mean over seeds: a colour per setting, MetaGrad dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str], list[list[float]]] = {}
    for r in records:
        if r["test_acc_per_epoch"]:
            curves.setdefault((r["setting"], r["method"]), []).append(r["test_acc_per_epoch"])
    colours = dict(zip(SETTINGS, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(9.0, 4.5))
    for (setting, method), runs in curves.items():
        length = min(len(c) for c in runs)
        mean = [statistics.mean(c[i] for c in runs) for i in range(length)]
        label = setting if setting == "fp32" else f"{setting} {method}"
        style = "--" if method == "metagrad" else "-"
        label = f"{label} ({len(runs)})"
        ax.plot(range(1, length + 1), mean, style, color=colours[setting], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def write_results(
    table: dict[str, Any], runs_dir: Path, merge: Sequence[Path], out_dir: Path
) -> dict[str, Any]:
    """Collect, summarize and write ``results.json``, ``report.md`` and ``curves.png``."""
    records = collect(runs_dir, merge, table)
    rows = summarize(records)
    result = {"table": table, "summary": rows, "runs": records}
    write_json(result, out_dir / "results.json")
    text = report(table, records, rows)
    atomic_write(out_dir / "report.md", lambda f: f.write(text.encode()))
    if records:
        plot(records, out_dir / "curves.png")
    return result


def reproduce(
    *,
    profile: str = "paper",
    model: str | None = None,
    epochs: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    only: Sequence[str] | None = None,
    data: str = "../shared/data/cifar10-jpeg.zip",
    runs_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    parallel: int = 1,
    threads: int = 0,
    merge: Sequence[str | Path] = (),
    report_only: bool = False,
) -> dict[str, Any]:
    """Train the table's runs that are not finished, then write its results (see module docs)."""
    base = base_settings(profile, model, epochs)
    unknown = sorted(set(only or ()) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")
    name = f"{base['model']}-w{base['width']:g}-e{base['epochs']}"
    runs_path = Path(runs_dir) if runs_dir else Path("runs") / "reproduce" / name
    out_path = Path(out_dir) if out_dir else runs_path
    table = {
        "profile": profile,
        "model": base["model"],
        "width": base["width"],
        "epochs": base["epochs"],
        "settings": base,
    }
    failed: list[str] = []
    if not report_only:
        if not Path(data).exists() and data != "digits":
            raise ConfigError(f"no dataset at {data}: pass --data PATH (CIFAR-10)")
        threads = threads or max(1, (os.cpu_count() or 1) // parallel)
        status = run_all(plan(seeds, only), base, data, runs_path, parallel, threads)
        failed = sorted(n for n, code in status.items() if code != 0)
    result = write_results(table, runs_path, [Path(m) for m in merge], out_path)
    print(Path(out_path / "report.md").read_text())
    print(f"wrote {out_path / 'results.json'}, report.md and curves.png")
    if failed:
        raise ConfigError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their log.txt)")
    return result
