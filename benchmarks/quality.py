"""Quality benchmark: finetune, joint, gr and gd on Split Fashion-MNIST (the ``cpu`` preset), FID / KLD / TV
and the continual classifier's accuracy and forgetting after every task, one run per (strategy, seed); pairs
already in the results file (with the classifier's metrics) are skipped, so seeds can be completed a piece at
a time.

    python -m benchmarks.quality                          # seed 42, all four strategies
    python -m benchmarks.quality --seeds 69 1714          # more seeds later
    python -m benchmarks.quality --set train.replay_lambda=1.0 --tag lambda1
    python -m benchmarks.quality --strategies gd --tag sampler-progressive2 --set replay_sampler.method=progressive \
        --set replay_sampler.steps=2 --set replay_sampler.iterations=300     # gd with a fast replay sampler
    python -m benchmarks.quality --strategies gd --tag sampler-pid --set replay_sampler.method=pid \
        --set replay_sampler.iterations=1000

Writes benchmarks/results/quality.parquet (long form: strategy, seed, task, metric, value, wall_s, machine,
tag); ``python -m benchmarks.readme_results`` makes the README's tables and plots from it. The three-seed
benchmark of every strategy runs on ``distcl tune`` instead (tuning/benchmark.yaml, benchmarks/sweep_results.py).
Runs go through the in-process backend (``--ray`` for the Ray runtime): the numbers are the same.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import RESULTS, machine, quality_results, stamped
from distcl.config import RunConfig, Strategy, load_config
from distcl.launch import run
from distcl.report import load_metrics
from distcl.rundir import REAL_DATA
from distcl.settings import choices
from distcl.sweep import fid_auc

STRATEGIES = ("finetune", "joint", "gr", "gd")
TEACHER = {"gr": ["train.teacher_steps=2"], "gd": ["train.teacher_steps=2", "train.replay_lambda=3.0"]}


def strategy_run(
    strategy: str,
    seed: int,
    tag: str = "default",
    preset: str = "cpu",
    overrides: list[str] = (),
    ray: bool = False,
    runs: str = "runs/benchmarks",
) -> tuple[RunConfig, Path]:
    """The config and run directory of one benchmark run (``distcl.launch.run`` makes or resumes it)."""
    overrides = [
        f"train.strategy={strategy}",
        f"seed={seed}",
        f"name=quality-{tag}-{strategy}-{seed}",
        f"runtime.backend={'ray' if ray else 'inline'}",
        "classifier.enabled=true",
        *TEACHER.get(strategy, []),
        *overrides,
    ]
    cfg = load_config(preset=preset, overrides=overrides)
    return cfg, Path(runs) / cfg.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="default", help="names a variant (other --set values) in the results")
    parser.add_argument("--runs", default="runs/benchmarks", help="run directories (resumable)")
    parser.add_argument("--ray", action="store_true", help="run through the Ray runtime")
    args = parser.parse_args()

    path = RESULTS / "quality.parquet"
    for seed in args.seeds:
        for strategy in args.strategies:
            with quality_results(path) as results:
                done = results.rows[run_of(results.rows, args.tag, strategy, seed)]
                if not done.empty and (done.metric == "accuracy").any():
                    print(f"skip {strategy} seed {seed} ({args.tag}): done")
                    continue
            cfg, out = strategy_run(strategy, seed, args.tag, args.preset, args.overrides, args.ray, args.runs)
            start = time.perf_counter()
            metrics_path = run(cfg, out)
            wall = time.perf_counter() - start
            rows = load_metrics(metrics_path.parent)  # with the floor: real images scored as samples
            rows = stamped(
                rows[["strategy", "seed", "task", "metric", "value"]], wall, machine(), args.tag, args.preset
            )
            with quality_results(path) as results:  # after every run: an interrupted benchmark keeps what it did
                old = run_of(results.rows, args.tag, strategy, seed) | run_of(results.rows, args.tag, REAL_DATA, seed)
                kept = results.rows[~old]  # a run from before (and its seed's floor): replaced
                results.rows = pd.concat([kept, rows], ignore_index=True)
            print(f"{strategy} seed {seed}: {wall:.0f}s")
    print(table(results.rows))


def run_of(results: pd.DataFrame, tag: str, strategy: str, seed: int) -> pd.Series:
    """The rows of one run (tag, strategy, seed) of the results."""
    if results.empty:
        return pd.Series(False, index=results.index)
    return (results.tag == tag) & (results.strategy == strategy) & (results.seed == seed)


def table(results: pd.DataFrame) -> str:
    """Final-task FID, KLD, TV, classifier accuracy and forgetting per (tag, strategy), and the FID area over
    tasks (distcl.sweep.fid_auc): mean and standard error over seeds; wall time."""
    last = results[results.task == results.task.max()]
    wide = last.pivot_table(index=["tag", "strategy", "seed"], columns="metric", values="value").reset_index()
    wide = wide.reindex(columns=[*wide.columns, *({"accuracy", "forgetting"} - set(wide.columns))])
    wall = last.groupby(["tag", "strategy", "seed"]).wall_s.first().reset_index()
    fid = results[results.metric == "fid"].sort_values("task").groupby(["tag", "strategy", "seed"]).value
    area = fid.agg(lambda v: fid_auc(list(v))).rename("fid_area").reset_index()
    wide = wide.merge(wall, on=["tag", "strategy", "seed"]).merge(area, on=["tag", "strategy", "seed"])
    metrics = ["fid", "kld", "tv", "accuracy", "forgetting", "fid_area"]
    agg = wide.groupby(["tag", "strategy"]).agg(
        seeds=("seed", "count"),
        **{name: spec for m in metrics for name, spec in ((m, (m, "mean")), (f"{m}_se", (m, "sem")))},
        wall_min=("wall_s", lambda s: s.mean() / 60),
    )
    order = {s: i for i, s in enumerate((*choices(Strategy), REAL_DATA))}
    agg = agg.reset_index().sort_values(["tag", "strategy"], key=lambda c: c.map(order) if c.name == "strategy" else c)
    return agg.to_markdown(index=False, floatfmt=".3f")


if __name__ == "__main__":
    main()
