"""The ``metagrad`` command: ``train``, ``demo`` and ``plot``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from metagrad.checkpoint import CheckpointError
from metagrad.data import DatasetError
from metagrad.parallel.distributed import CollectiveFailure
from metagrad.training.config import (
    ConfigError,
    TrainConfig,
    build_config,
    read_config_file,
    resume_config,
)
from metagrad.training.flags import add_arguments
from metagrad.training.launcher import Terminated

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FloatingPointError, CollectiveFailure)


def _train(args: argparse.Namespace) -> None:
    from metagrad.training.run_files import saved_config
    from metagrad.training.trainer import train

    flags = {k: v for k, v in vars(args).items() if k not in {"command", "config", "func"}}
    base = read_config_file(args.config) if args.config else None
    given = {**(base or {}), **flags}
    if given.get("resume"):
        out = given.get("out", TrainConfig.defaults()["out"])
        cfg = resume_config(saved_config(out), given)
    else:
        cfg = build_config(flags, base)
    summary = train(cfg)
    if summary["rank"] != 0:
        return
    bpc = summary.get("final_test_bpc")
    final = f"final test bpc {bpc:.3f}" if bpc is not None else None
    if final is None:
        final = f"final test acc {summary['final_test_acc']:.2f}%"
    print(
        f"done: {summary['steps']} steps, {final}, "
        f"mean step {summary['mean_step_seconds'] * 1000:.1f} ms -> {summary['config']['out']}"
    )


def _demo(args: argparse.Namespace) -> None:
    from metagrad.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, seeds=args.seeds)


def _reproduce(args: argparse.Namespace) -> None:
    from metagrad.training.reproduce import reproduce

    reproduce(
        profile=args.profile,
        model=args.model,
        epochs=args.epochs,
        seeds=args.seeds,
        only=args.only,
        data=args.data,
        runs_dir=args.runs_dir,
        out_dir=args.out,
        parallel=args.parallel,
        threads=args.threads,
        merge=args.merge,
        report_only=args.report_only,
    )


def _plot(args: argparse.Namespace) -> None:
    from metagrad.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.output, metric=args.metric)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metagrad",
        description="Train CNNs and transformers with quantized (INT8/INT4/...) backward passes, "
        "with or without MetaGrad's hypernetwork correction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model (CIFAR-10, the built-in digits, or a character corpus)"
    )
    add_arguments(train)
    train.set_defaults(func=_train)

    demo = sub.add_parser(
        "demo", help="offline demo: full-precision vs quantized gradients, side by side"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's runs")
    demo.add_argument("--epochs", type=int, default=8, help="epochs per run")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    demo.set_defaults(func=_demo)

    rep = sub.add_parser(
        "reproduce",
        help="the paper's CIFAR-10 table: fp32, plain and MetaGrad at INT8/INT4, several seeds",
    )
    rep.add_argument(
        "--profile",
        default="paper",
        help="paper (full width, 200 epochs) or cpu (width 0.25, 6 epochs, float32)",
    )
    rep.add_argument("--model", help="vgg16 (default), resnet20, resnet56 or mobilenetv2")
    rep.add_argument("--epochs", type=int, help="epochs per run (default: the profile's)")
    rep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    rep.add_argument("--only", nargs="+", help="settings to run (default: all 6)")
    rep.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 path")
    rep.add_argument("--runs-dir", help="run folders (default runs/reproduce/<table>)")
    rep.add_argument("--out", help="where results.json, report.md, curves.png go (runs-dir)")
    rep.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    rep.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: share)")
    rep.add_argument("--merge", nargs="*", default=[], help="other results.json files to add")
    rep.add_argument("--report-only", action="store_true", help="train nothing, only report")
    rep.set_defaults(func=_reproduce)

    plot = sub.add_parser("plot", help="plot metrics.jsonl curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--output", "-o", default="curves.png", help="image file to write")
    plot.add_argument("--metric", default="test_acc", help="metrics.jsonl key to plot")
    plot.set_defaults(func=_plot)
    return parser


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"metagrad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted; resume from the last checkpoint with --resume")
        return 130
    except Terminated as stop:
        print("metagrad: terminated; resume from the last checkpoint with --resume")
        return int(stop.code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
