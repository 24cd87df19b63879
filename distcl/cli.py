"""The ``distcl`` command line.

    distcl run [CONFIG] [--preset smoke|cpu|paper] [--out DIR] [--set key.sub=value ...] [--data-dir DIR]
               [--address RAY_ADDRESS] [--inline] [--mlflow [URI]]
    distcl learn OUT --data-dir NEW [--set key=value ...] [--inline]   NEW's classes as OUT's next task(s)
    distcl learn OUT --watch INBOX [--poll-s 5]    each complete arrival in INBOX (a READY file) as the next task
    distcl evaluate OUT       every saved task scored again by OUT's current evaluation network
    distcl report OUT
    distcl tune SWEEP.yaml --out DIR [--mlflow [URI]]   a Ray Tune sweep (tuning/*.yaml); --resume DIR continues one
    distcl distill progressive|pid --teacher task_<k>/ --out DIR [--set key=value ...] [--workers W] [--inline]
                   [--mlflow [URI]]
    distcl sample --model DIR --out grid.png [--num 100] [--steps 10] [--device auto]
    distcl cluster local [cluster.yaml] [--idle-timeout-s 15] [--max-node-cpus C] [--max-nodes-per-type N]
                                          a local autoscaling twin of a cluster file
    distcl cluster local --down [cluster.yaml] | --preempt NODE_TYPE [cluster.yaml]

Exit codes: 0 done, 1 the run failed (message on stderr), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from distcl.config import DEVICES, PRESETS, RuntimeConfig, load_config, tracking_uri
from distcl.console import line_buffered
from distcl.settings import ConfigError
from distcl.sweep import load_sweep

LOCAL_MLFLOW = "sqlite:///mlflow.db"  # MLflow's local store without a server (`mlflow ui` reads it from here)


def add_mlflow_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const=LOCAL_MLFLOW,
        metavar="URI",
        help=f"track in MLflow (tracking.mlflow); URI default {LOCAL_MLFLOW} (./mlflow.db)",
    )


def add_set_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distcl", description="Continual training of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a continual training run")
    run.add_argument("config", nargs="?", help="YAML/JSON config file (fields of distcl.config.RunConfig)")
    run.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset config")
    run.add_argument("--out", help="output directory (default: runs/<name>); rerun to resume")
    add_set_flag(run, "override a field, e.g. --set train.replay_lambda=1.0 (repeatable)")
    run.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (searched first)")
    run.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    run.add_argument("--inline", action="store_true", help="no Ray: one process, replay made on the trainer")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (the default when not on a terminal)")
    add_mlflow_flag(run)
    learn = sub.add_parser("learn", help="append new classes to a run as its next task(s), the old data gone")
    learn.add_argument("out", metavar="OUT", help="the run's directory (a distcl run --out)")
    new = learn.add_mutually_exclusive_group()
    new.add_argument("--data-dir", help="the new data: an image folder of new classes (or the standard set's files)")
    new.add_argument("--watch", metavar="INBOX", help="append each complete arrival in INBOX, and keep watching")
    learn.add_argument("--poll-s", type=float, default=5.0, help="with --watch: seconds between looks (default 5)")
    add_set_flag(learn, "e.g. --set 'data.tasks=[[Bag, Sandal]]' or --set train.lr=5e-4 (repeatable; see distcl.learn)")
    learn.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    learn.add_argument("--inline", action="store_true", help="no Ray: one process")
    learn.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_mlflow_flag(learn)
    tune = sub.add_parser("tune", help="a Ray Tune sweep over run-config fields (see tuning/)")
    tune.add_argument("sweep", nargs="?", help="sweep file (fields of distcl.sweep.SweepConfig)")
    tune.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>)")
    tune.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials kept)")
    tune.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    add_mlflow_flag(tune)
    distill = sub.add_parser("distill", help="distil a teacher checkpoint into a fast sampler")
    methods = distill.add_subparsers(dest="method", required=True)
    for method, help_text, settings in (
        (
            "progressive",
            "progressive distillation: halving stages, x / v students (OUT/steps_<n>/)",
            "distcl.config.ProgressiveConfig, e.g. --set target_steps=2",
        ),
        (
            "pid",
            "physics-informed distillation: a data-free one-step student (OUT/, distcl sample --model OUT)",
            "distcl.config.PIDConfig, e.g. --set difference=central",
        ),
    ):
        parser_m = methods.add_parser(method, help=help_text)
        parser_m.add_argument("--teacher", required=True, help="a task_<k>/ checkpoint (DDIMPipeline folder)")
        parser_m.add_argument("--out", required=True, help="output directory (resumable)")
        add_set_flag(parser_m, f"a field of {settings}")
        parser_m.add_argument("--workers", type=int, default=1, help="Ray Train workers (batch_size splits among them)")
        parser_m.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
        parser_m.add_argument("--inline", action="store_true", help="no Ray: train in this process")
        parser_m.add_argument("--device", default="auto", help="with --inline: auto | cpu | cuda")
        parser_m.add_argument(
            "--no-progress", action="store_true", help="no progress bars (the default off a terminal)"
        )
        add_mlflow_flag(parser_m)
        if method == "progressive":
            parser_m.add_argument("--data-dir", help="Fashion-MNIST files (with --set data=fmnist)")
    sample = sub.add_parser("sample", help="sample a checkpoint: a task_<k>/ or PD stage (DDIM), or a PID student")
    sample.add_argument("--model", required=True, help="a DDIMPipeline folder, or a `distcl distill pid` OUT")
    sample.add_argument("--out", required=True, help="PNG grid to write")
    sample.add_argument("--num", type=int, default=100, help="number of samples (default 100, a 10x10 grid)")
    sample.add_argument("--steps", type=int, default=10, help="DDIM steps (ignored for a one-step PID student)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", choices=DEVICES, default="auto", help="auto (default): CUDA when present")
    evaluate = sub.add_parser("evaluate", help="score every saved task again with the run's current evaluator")
    evaluate.add_argument("out", metavar="OUT", help="a run's output directory")
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help="auto (default): CUDA when present")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    report = sub.add_parser("report", help="Markdown table and PNG plots of a run's metrics")
    report.add_argument("out", help="a run's output directory")
    cluster = sub.add_parser("cluster", help="rehearse a Ray cluster file on this machine")
    local = cluster.add_subparsers(dest="action", required=True).add_parser(
        "local", help="a local autoscaling twin of a cluster file: its node types, started as runs ask for them"
    )
    local.add_argument("cluster_file", nargs="?", default="cluster.yaml", help="default: cluster.yaml")
    action = local.add_mutually_exclusive_group()
    action.add_argument("--down", action="store_true", help="stop the twin (only its own processes)")
    action.add_argument("--preempt", metavar="NODE_TYPE", help="kill one node of NODE_TYPE at once, as a spot reclaim")
    local.add_argument("--idle-timeout-s", type=float, default=15.0, help="idle nodes go after this (default 15)")
    local.add_argument("--max-node-cpus", type=float, help="cap each node type's CPUs to fit this machine")
    local.add_argument("--max-nodes-per-type", type=int, help="cap each node type's max_workers to fit this machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    line_buffered()  # each line reaches a file or pipe when it is printed
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "learn":
        return _learn(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "distill":
        return _distill(args)
    if args.command == "sample":
        return _sample(args)
    if args.command == "cluster":
        return _cluster(args)
    if args.command == "evaluate":
        return _evaluate(args)
    return _report(args)


def _guarded(what: str, work: Callable[[], int]) -> int:
    """Exit codes: bad input (ConfigError) 2 with "config error"; a failure of the work 1 (DataError is a
    RuntimeError); Ctrl-C 130, in one line (finished work is kept: the same command resumes); else ``work()``."""
    try:
        return work()
    except KeyboardInterrupt as err:
        print(f"distcl: {what} interrupted: {str(err) or 'run the same command again to resume'}", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"distcl: config error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, FileNotFoundError) as err:
        print(f"distcl: {what} failed: {err}", file=sys.stderr)
        return 1


def _progress(args) -> bool:
    """Progress bars on a terminal, unless --no-progress; plain log lines in files and job logs."""
    return not args.no_progress and sys.stderr.isatty()


# The commands: parse, then dispatch. The heavy imports (torch, Ray) follow a valid command line.


def _face_overrides(args) -> list[str]:
    """--set items, then the flags that stand for fields (--address, --inline, --mlflow)."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"runtime.address={args.address}")
    if args.inline:
        overrides.append("runtime.backend=inline")
    if args.mlflow:
        overrides.append(f"tracking.mlflow={args.mlflow}")
    return overrides


def _run(args) -> int:
    overrides = _face_overrides(args)
    if args.data_dir:
        overrides.insert(len(args.overrides), f"data.data_dir={args.data_dir}")  # after --set, as before

    def work() -> int:
        cfg = load_config(args.config, args.preset, overrides)
        from distcl.launch import run

        metrics = run(cfg, Path(args.out or Path("runs") / cfg.name), progress=_progress(args))
        print(f"[distcl] done: {metrics}")
        return 0

    return _guarded("run", work)


def _learn(args) -> int:
    def work() -> int:
        from distcl.launch import learn, watch

        if args.watch:
            watch(Path(args.out), Path(args.watch), _face_overrides(args), _progress(args), args.poll_s)
            return 0
        print(f"[distcl] done: {learn(Path(args.out), args.data_dir, _face_overrides(args), _progress(args))}")
        return 0

    return _guarded("learn", work)


def _tune(args) -> int:
    def work() -> int:
        if (args.sweep is None) == (args.resume is None):
            raise ConfigError("sweep", "give a sweep file, or --resume DIR (not both)")
        sweep, out = None, Path(args.resume or ".")
        if args.sweep:
            sweep = load_sweep(args.sweep)
            if args.address:
                sweep.base.setdefault("runtime", {})["address"] = args.address
            if args.mlflow:
                sweep.base.setdefault("tracking", {})["mlflow"] = tracking_uri(args.mlflow)
            out = Path(args.out or Path("runs") / "sweeps" / sweep.name)
        from distcl.runtime.tune import run_sweep

        print(f"[distcl] done: {run_sweep(sweep, out, resume=sweep is None)}")
        return 0

    return _guarded("sweep", work)


def _distill(args) -> int:
    def work() -> int:
        from distcl.launch import distill_teacher

        runtime = RuntimeConfig(address=args.address, num_workers=args.workers)
        saved = distill_teacher(
            args.method,
            args.teacher,
            args.out,
            args.overrides,
            args.inline,
            args.device,
            runtime,
            getattr(args, "data_dir", None),
            _progress(args),
            tracking_uri(args.mlflow),
        )
        print(f"[distcl] done: {', '.join(map(str, saved))}")
        return 0

    return _guarded("distillation", work)


def _sample(args) -> int:
    def work() -> int:
        from distcl.devices import resolve_device
        from distcl.evaluation import write_samples

        out = write_samples(args.model, args.out, args.num, args.steps, args.seed, resolve_device(args.device))
        print(f"[distcl] wrote {out}")
        return 0

    return _guarded("sampling", work)


def _evaluate(args) -> int:
    def work() -> int:
        from distcl.continual import rescore
        from distcl.devices import resolve_device
        from distcl.learn import require_run

        require_run(Path(args.out))
        print(f"[distcl] wrote {rescore(Path(args.out), resolve_device(args.device), _progress(args))}")
        return 0

    return _guarded("evaluation", work)


def _report(args) -> int:
    from distcl.report import load_metrics, metrics_table, plot_metrics, task_classes

    try:
        df = load_metrics(Path(args.out))
    except FileNotFoundError as err:
        print(f"distcl: {err}", file=sys.stderr)
        return 2
    print(metrics_table(df, task_classes(Path(args.out))))
    for path in plot_metrics(df, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _cluster(args) -> int:
    def work() -> int:
        from distcl.runtime import twin

        if not (args.down or args.preempt):
            up = twin.start_twin(args.cluster_file, args.idle_timeout_s, args.max_node_cpus, args.max_nodes_per_type)
            print(twin.describe(up, args.cluster_file))
            return 0
        name = twin.read_cluster_file(args.cluster_file)["cluster_name"]
        if args.preempt:
            print(f"[distcl] {twin.preempt(name, args.preempt)}")
        elif stopped := twin.stop_twin(name):
            print(f"[distcl] twin of {name!r} stopped ({stopped} processes)")
        else:
            print(f"[distcl] no twin of {name!r} runs")
        return 0

    return _guarded("cluster", work)


if __name__ == "__main__":
    sys.exit(main())
