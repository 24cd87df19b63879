"""The ``distcl`` command line.

    distcl run [CONFIG] [--preset smoke|cpu|paper] [--out DIR] [--set key.sub=value ...] [--data-dir DIR]
               [--address RAY_ADDRESS] [--inline]
    distcl report OUT
    distcl tune SWEEP.yaml --out DIR      a Ray Tune sweep (tuning/*.yaml); distcl tune --resume DIR continues one

Exit codes: 0 done, 1 the run failed (message on stderr), 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distcl.config import PRESETS, ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distcl", description="Continual training of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a continual training run")
    run.add_argument("config", nargs="?", help="YAML/JSON config file (fields of distcl.config.RunConfig)")
    run.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset config")
    run.add_argument("--out", help="output directory (default: runs/<name>); rerun to resume")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set train.replay_lambda=1.0 (repeatable)")  # fmt: skip
    run.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (searched first)")
    run.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    run.add_argument("--inline", action="store_true", help="no Ray: one process, replay made on the trainer")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    tune = sub.add_parser("tune", help="a Ray Tune sweep over run-config fields (see tuning/)")
    tune.add_argument("sweep", nargs="?", help="sweep file (fields of distcl.sweep.SweepConfig)")
    tune.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>)")
    tune.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials kept)")
    tune.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    report = sub.add_parser("report", help="Markdown table and PNG plots of a run's metrics")
    report.add_argument("out", help="a run's output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "tune":
        return _tune(args)
    return _report(args)


def _run(args) -> int:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.address:
        overrides.append(f"runtime.address={args.address}")
    if args.inline:
        overrides.append("runtime.backend=inline")
    try:
        cfg = load_config(args.config, args.preset, overrides)
    except ConfigError as err:
        print(f"distcl: config error: {err}", file=sys.stderr)
        return 2
    from distcl.continual import run  # heavy imports only once the config is valid
    from distcl.data import DataError

    out = Path(args.out or Path("runs") / cfg.name)
    try:
        metrics = run(cfg, out, progress=not args.no_progress)
    except ConfigError as err:
        print(f"distcl: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, RuntimeError, FileNotFoundError) as err:
        print(f"distcl: run failed: {err}", file=sys.stderr)
        return 1
    print(f"[distcl] done: {metrics}")
    return 0


def _tune(args) -> int:
    from distcl.sweep import load_sweep

    try:
        if (args.sweep is None) == (args.resume is None):
            raise ConfigError("sweep", "give a sweep file, or --resume DIR (not both)")
        if args.resume:
            sweep, out = None, Path(args.resume)
        else:
            sweep = load_sweep(args.sweep)
            if args.address:
                sweep.base.setdefault("runtime", {})["address"] = args.address
            out = Path(args.out or Path("runs") / "sweeps" / sweep.name)
    except ConfigError as err:
        print(f"distcl: config error: {err}", file=sys.stderr)
        return 2
    from distcl.runtime.tune import run_sweep

    try:
        summary = run_sweep(sweep, out, resume=sweep is None)
    except ConfigError as err:
        print(f"distcl: config error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"distcl: sweep failed: {err}", file=sys.stderr)
        return 1
    print(f"[distcl] done: {summary}")
    return 0


def _report(args) -> int:
    from distcl.report import load_metrics, metrics_table, plot_metrics

    try:
        df = load_metrics(Path(args.out))
    except FileNotFoundError as err:
        print(f"distcl: {err}", file=sys.stderr)
        return 2
    print(metrics_table(df))
    for path in plot_metrics(df, Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
