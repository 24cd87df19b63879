"""A sweep's finished trials as rows of the quality benchmark: every task's metrics of every finished trial of
``distcl tune`` (read from the trials' run directories under DIR/runs, so a sweep still running can be folded in)
into benchmarks/results/quality.parquet, tagged by the sweep's name and the trial's params other than strategy
and seed, with each run's ``real data`` rows (the metrics' floor); trials already there are replaced.

    python -m benchmarks.sweep_results runs/sweeps/benchmark      # then: python -m benchmarks.readme_results

The results file is read, changed and replaced under a lock (benchmarks.common.quality_results): folds of two
sweeps at once, or a fold beside ``benchmarks.quality``, take turns.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd

from benchmarks.common import RESULTS, quality_results, stamped
from benchmarks.quality import table
from distcl.config import load_config
from distcl.devices import describe_host
from distcl.report import load_metrics
from distcl.rundir import all_tasks_evaluated
from distcl.runtime.tune import TRIAL_STARTS, trial_start
from distcl.sweep import load_sweep

KEYS = ("tag", "strategy", "seed")  # a run in quality.parquet
SAMPLES = RESULTS / "samples"  # the final sample grid of each folded trial of SAMPLE_SEED: {tag}-{strategy}.png
SAMPLE_SEED = 42


def trial_tag(sweep_name: str, trial: dict, params: list[str]) -> str:
    """The sweep's name, then each other param as name=value (e.g. gd_lambda-replay_lambda=0.3-teacher_steps=2)."""
    extra = [f"{p.split('.')[-1]}={trial[p]}" for p in params if p not in ("train.strategy", "seed")]
    return "-".join([sweep_name, *extra])


def finished_params(run_dir: Path, params: list[str]) -> Optional[dict]:
    """The values of ``params`` (dotted run-config fields) in the trial's config when every task of the trial is
    evaluated, else None. Read from the trial's run directory, not DIR/sweep.parquet (written when ``distcl tune``
    ends), so a sweep still running can be folded in."""
    cfg = load_config(run_dir / "config.yaml")
    if not all_tasks_evaluated(run_dir, cfg.data.num_tasks):
        return None
    return {p: functools.reduce(getattr, p.split("."), cfg) for p in params}


def trial_rows(run_dir: Path, tag: str, preset: str) -> pd.DataFrame:
    """A completed trial's metrics (and their real-data floor) in quality.parquet's long form, with each task's
    median training step time as metric ``step_s``; ``wall_s`` from the trial's start to its last metrics
    (NaN for a trial resumed after an interruption); ``machine``: the hosts its starts name (this one for a
    trial started before they were logged), dated by the trial's last metrics."""
    rows = load_metrics(run_dir)  # the metrics, then their real-data floor
    starts = [trial_start(line) for line in (run_dir / TRIAL_STARTS).read_text().splitlines()]
    started = datetime.datetime.fromisoformat(starts[0][1]).timestamp()
    # a resumed trial's span holds the time it was stopped: no wall time for it
    ended = (run_dir / "metrics.parquet").stat().st_mtime
    wall = ended - started if len(starts) == 1 else float("nan")
    log = pd.read_parquet(run_dir / "train_log.parquet")  # the median step time of each task (metric "step_s")
    steps = log.groupby("task").step_s.median().rename("value").reset_index().assign(metric="step_s")
    steps = steps.assign(strategy=rows.strategy.iloc[0], seed=rows.seed.iloc[0])
    rows = pd.concat([rows, steps], ignore_index=True)[["strategy", "seed", "task", "metric", "value"]]
    hosts = dict.fromkeys(host or describe_host() for _, _, host in starts)  # unlogged: this machine's
    where = f"{' then '.join(hosts)}; {datetime.date.fromtimestamp(ended).isoformat()}"
    return stamped(rows, wall, where, tag, preset)


def keep_machines(new: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """``new`` with the machine (and date) already recorded for each of its runs whose metrics are unchanged: the
    machine that folds a run again need not be the one it ran on."""
    on = [*KEYS, "task", "metric"]
    both = new.merge(results[[*on, "value", "machine"]], on=on, how="left", suffixes=("", "_old"))
    equal = (both.value - both.value_old).abs().le(1e-9) | (both.value.isna() & both.value_old.isna())
    unchanged = (equal & both.machine_old.notna()).groupby([both[k] for k in KEYS]).transform("all")
    return new.assign(machine=both.machine_old.where(unchanged, both.machine).values)


def keep_final_samples(run_dir: Path, tag: str) -> None:
    """A trial of SAMPLE_SEED: its last task's sample grid as SAMPLES/{tag}-{strategy}.png (the README's figure)."""
    cfg = load_config(run_dir / "config.yaml")
    grid = run_dir / "samples" / f"task_{cfg.data.num_tasks - 1}.png"
    if cfg.seed == SAMPLE_SEED and grid.is_file():
        SAMPLES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, SAMPLES / f"{tag}-{cfg.train.strategy}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--results", type=Path, default=RESULTS / "quality.parquet")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep_dir / "sweep.yaml")
    run_dirs = sorted(d for d in (args.sweep_dir / "runs").glob("*") if (d / "config.yaml").is_file())
    done = [(d, params) for d in run_dirs if (params := finished_params(d, list(sweep.params))) is not None]
    new = [trial_rows(d, trial_tag(sweep.name, params, list(sweep.params)), sweep.preset) for d, params in done]
    with quality_results(args.results) as results:
        if new:
            new = pd.concat(new, ignore_index=True).drop_duplicates([*KEYS, "task", "metric"])  # real data: per seed
            kept = results.rows
            if not kept.empty:  # trials folded in before (or a strategy's real-data rows) are replaced
                new = keep_machines(new, kept)
                runs = new[list(KEYS)].drop_duplicates()
                stale = kept.merge(runs, on=list(KEYS), how="left", indicator=True)["_merge"] == "both"
                kept = kept[~stale.values]
            results.rows = pd.concat([kept, new], ignore_index=True)
    for run_dir, params in done:
        keep_final_samples(run_dir, trial_tag(sweep.name, params, list(sweep.params)))
    results = results.rows
    print(f"{len(done)} of {len(run_dirs)} trials started in {args.sweep_dir} are finished")
    print(table(results[results.tag.str.startswith(sweep.name)]) if not results.empty else "no results yet")


if __name__ == "__main__":
    main()
