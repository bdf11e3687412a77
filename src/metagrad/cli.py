"""The ``metagrad`` command: ``train``, ``demo`` and ``plot``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metagrad.checkpoint import CheckpointError
from metagrad.config import ConfigError, add_arguments, build_config, read_config_file
from metagrad.data import DatasetError

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FloatingPointError)


def _train(args: argparse.Namespace) -> None:
    from metagrad.train import train

    flags = {k: v for k, v in vars(args).items() if k not in {"command", "config", "func"}}
    base = read_config_file(args.config) if args.config else None
    summary = train(build_config(flags, base))
    acc = summary["final_test_acc"]
    print(
        f"done: {summary['steps']} steps, final test acc {acc:.2f}%, "
        f"mean step {summary['mean_step_seconds'] * 1000:.1f} ms -> {summary['config']['out']}"
    )


def _demo(args: argparse.Namespace) -> None:
    from metagrad.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, seeds=args.seeds)


def _plot(args: argparse.Namespace) -> None:
    from metagrad.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.output, metric=args.metric)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metagrad",
        description="Train CNNs with quantized (INT8/INT4/...) backward passes, with or without "
        "MetaGrad's hypernetwork correction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (CIFAR-10 or the built-in digits)")
    add_arguments(train)
    train.set_defaults(func=_train)

    demo = sub.add_parser(
        "demo", help="offline demo: full-precision vs quantized gradients, side by side"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's runs")
    demo.add_argument("--epochs", type=int, default=8, help="epochs per run")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    demo.set_defaults(func=_demo)

    plot = sub.add_parser("plot", help="plot metrics.jsonl curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--output", "-o", default="curves.png", help="image file to write")
    plot.add_argument("--metric", default="test_acc", help="metrics.jsonl key to plot")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"metagrad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted; resume from the last checkpoint with --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
