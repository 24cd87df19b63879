"""Sweeps on Ray Tune: one trial = one continual run (Ray Train inside with the Ray backend), reporting after
every task, so that ASHA can stop a bad config after its early tasks (the task is Tune's time axis).

    Tuner(with_resources(with_parameters(run_trial, ...), {"cpu": trial_cpus}), param_space=...,
          tune_config=TuneConfig(scheduler=ASHA?, max_concurrent_trials=...), run_config=RunConfig("tune", DIR))

DIR/sweep.yaml       the sweep, so that ``distcl tune --resume DIR`` needs nothing else
DIR/tune/            Tune's experiment state (Tuner.restore resumes it; finished trials are not rerun)
DIR/runs/<slug>/     each trial's run directory (a resumed trial resumes its run: finished tasks are kept)
DIR/sweep.parquet, summary.parquet, summary.md, final_fid.png   the results
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import ray
import yaml
from ray import tune

from distcl.devices import describe_host
from distcl.launch import run
from distcl.runtime.cluster import cluster_capacity, join_cluster
from distcl.runtime.pipeline import layout_needs
from distcl.settings import ConfigError, from_dict
from distcl.sweep import (
    SweepConfig,
    fid_auc,
    plot_final_fid,
    summarize,
    summary_markdown,
    trial_row,
    trial_slug,
)

TUNE_NAME = "tune"


def trial_dir(out: Path, sweep: SweepConfig, values: dict[str, Any], trial_id: str) -> Path:
    """Grid trials are named by their params (unique); random ones also by Tune's trial id."""
    slug = trial_slug(values)
    return Path(out) / "runs" / (slug if sweep.search == "grid" else f"{slug}-{trial_id}")


TRIAL_STARTS = "trial_starts.log"  # in a trial's run directory: one line per (re)start, "id time host"


def trial_start(line: str) -> tuple[str, str, Optional[str]]:
    """(trial id, ISO time, host) of a line of TRIAL_STARTS; host None in lines written before hosts were."""
    trial_id, when, *host = line.split(maxsplit=2)
    return trial_id, when, host[0] if host else None


def run_trial(config: dict[str, Any], sweep: SweepConfig, out: str, parent_run: Optional[str] = None) -> None:
    """Tune's trainable: the continual run of ``config`` (param values), ``tune.report`` after every task; tracked,
    a child of the sweep's MLflow run ``parent_run``, in the sweep's experiment."""
    trial_id = tune.get_context().get_trial_id()
    directory = trial_dir(Path(out), sweep, config, trial_id)
    cfg = sweep.trial_config(config, name=f"{sweep.name}-{directory.name}")
    cfg.tracking.experiment = cfg.tracking.experiment or sweep.name
    if cfg.device == "auto" and not ray.get_gpu_ids():  # the trial holds no GPU: it must not use one
        cfg = replace(cfg, device="cpu")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / TRIAL_STARTS).open("a") as starts:
        starts.write(f"{trial_id} {time.strftime('%Y-%m-%dT%H:%M:%S')} {describe_host()}\n")
    fids: list[float] = []

    def report(k: int, metrics: dict[str, float]) -> None:
        fids.append(metrics["fid"])
        tune.report({"task": k, **metrics, "fid_auc": fid_auc(fids), "run_dir": str(directory)})

    run(cfg, directory, progress=False, on_task=report, parent_run=parent_run)


def trial_cpus(sweep: SweepConfig) -> float:
    if sweep.trial_cpus is not None:
        return sweep.trial_cpus
    return 0.01 if sweep.trial_config({}).runtime.backend == "ray" else 1.0


def trial_gpus(sweep: SweepConfig, cluster_gpus: float) -> float:
    """The GPU a trial's own process holds: an inline trial evaluates and trains there (``device`` cuda, or auto
    on a cluster with GPUs: 1); a Ray-backend trial only orchestrates (0: its workers and samplers ask for theirs)."""
    if sweep.trial_gpus is not None:
        return sweep.trial_gpus
    cfg = sweep.trial_config({})
    if cfg.runtime.backend == "ray" or cfg.device == "cpu":
        return 0.0
    return 1.0 if cfg.device == "cuda" or cluster_gpus > 0 else 0.0


def trial_needs(sweep: SweepConfig, cluster_gpus: float = 0.0) -> dict[str, float]:
    """Resources one trial holds: its driver, plus its Train workers (their GPUs with ``runtime.use_gpu: true``)
    and samplers with the Ray backend."""
    cfg = sweep.trial_config({})
    needs = layout_needs(cfg, cfg.runtime.use_gpu is True) if cfg.runtime.backend == "ray" else {}
    needs["CPU"] = needs.get("CPU", 0) + trial_cpus(sweep)
    if gpus := trial_gpus(sweep, cluster_gpus):
        needs["GPU"] = needs.get("GPU", 0) + gpus
    return needs


def connect(sweep: SweepConfig) -> bool:
    """Join the sweep's cluster (``runtime.address`` / $RAY_ADDRESS), else start a local one sized for
    ``max_concurrent_trials`` trials; True when the cluster is local (its size is then known)."""
    need = trial_needs(sweep)["CPU"] * sweep.max_concurrent_trials
    return join_cluster(sweep.trial_config({}).runtime, need)


def check_capacity(sweep: SweepConfig) -> None:
    """Refuse, before any trial starts, a sweep whose concurrent trials the cluster cannot hold (under an
    autoscaler: its node types at their most)."""
    have = cluster_capacity().total
    for resource, need in trial_needs(sweep, have.get("GPU", 0)).items():
        total = need * sweep.max_concurrent_trials
        if have.get(resource, 0) + 1e-9 < total:
            raise ConfigError(
                "max_concurrent_trials",
                f"{sweep.max_concurrent_trials} trials need {total:g} {resource} ({need:g} each: the trial, its Train "
                f"workers and samplers) but the cluster has {have.get(resource, 0):g} (allowed: fewer concurrent "
                "trials, a smaller runtime layout, a smaller trial_gpus, or a larger runtime.num_cpus)",
            )


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Lists are grid axes (grid search) or choices (random search); distributions map onto tune's."""
    space = {}
    for key, spec in sweep.params.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec) if sweep.search == "grid" else tune.choice(spec)
        else:
            ((kind, args),) = spec.items()
            space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def trainable(sweep: SweepConfig, out: Path, parent_run: Optional[str] = None):
    resources = {"cpu": trial_cpus(sweep), "gpu": trial_gpus(sweep, cluster_capacity().total.get("GPU", 0))}
    trial = tune.with_parameters(run_trial, sweep=sweep, out=str(out), parent_run=parent_run)
    return tune.with_resources(trial, resources)


def build_tuner(sweep: SweepConfig, out: Path, parent_run: Optional[str] = None) -> tune.Tuner:
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=sweep.trial_config({}).data.num_tasks,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
    return tune.Tuner(
        trainable(sweep, out, parent_run),
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            reuse_actors=True,  # a trial's process runs the next trial: its imports (torch, diffusers) paid once
            # the limit lives in the generator (Tune ignores TuneConfig's with a search algorithm, and says so)
            search_alg=tune.search.BasicVariantGenerator(
                random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(out.resolve())),
    )


def run_sweep(sweep: SweepConfig | None, out: Path, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run (``resume``: continue) the sweep into OUT, then write its tables; returns summary.md's path."""
    out = Path(out).resolve()  # trials run in Tune's own working directories
    saved = out / "sweep.yaml"
    if resume:
        if not saved.exists() or not tune.Tuner.can_restore(str((out / TUNE_NAME).resolve())):
            raise ConfigError("--resume", f"{out} holds no sweep to resume (no sweep.yaml and tune/ state)")
        sweep = from_dict(SweepConfig, yaml.safe_load(saved.read_text()))
        sweep.validate()
    else:
        if saved.exists():
            raise ConfigError(
                "--out", f"{out} already holds a sweep (allowed: distcl tune --resume {out}, or another --out)"
            )
    if connect(sweep) or cluster_capacity().autoscaling:  # a cluster whose size is known: now, or at its most
        check_capacity(sweep)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    parent = None
    if sweep.trial_config({}).tracking.mlflow is not None:
        from distcl.tracking import SweepTracker  # mlflow is imported only when asked for

        parent = SweepTracker(sweep, out, log)
        log(f"[distcl] sweep tracked in MLflow: {sweep.trial_config({}).tracking.mlflow}, parent run {parent.run_id}")
    if not resume:
        tmp = out / ".sweep.yaml.tmp"
        tmp.write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
        os.replace(tmp, saved)
    parent_run = parent.run_id if parent is not None else None
    if resume:
        tuner = tune.Tuner.restore(
            str((out / TUNE_NAME).resolve()), trainable(sweep, out, parent_run), resume_errored=True
        )
        log(f"[distcl] resuming sweep {sweep.name} from {out}")
    else:
        tuner = build_tuner(sweep, out, parent_run)
    try:
        grid = tuner.fit()
    except BaseException:
        if parent is not None:
            parent.tracking.end("FAILED")
        raise
    num_tasks = sweep.trial_config({}).data.num_tasks
    rows, unreported = [], 0
    for result in grid:
        if result.config is None:  # started just before a Ctrl-C and reported nothing: left for the resume
            unreported += 1
            continue
        values = {key: result.config[key] for key in sweep.params}
        reported = (result.metrics or {}).get("run_dir")  # a trial that never reported: its name if grid
        directory = Path(reported) if reported else trial_dir(out, sweep, values, "unreported")
        rows.append(trial_row(values, directory, num_tasks, error=result.error is not None))
    summary = write_results(sweep, pd.DataFrame(rows), out, log) if rows else None  # none: Ctrl-C at once
    stopped = sum(row["status"] == "stopped" for row in rows)  # without ASHA, only Ctrl-C stops a trial early
    if sweep.scheduler == "none":
        unfinished = stopped + unreported
    else:
        unfinished = len(grid) - grid.num_terminated - grid.num_errors
    unfinished += sweep.num_trials() - len(grid)  # Ctrl-C before the search made them (Tune returns normally)
    if parent is not None:
        parent.tracking.end("KILLED" if unfinished else "FINISHED")
    if unfinished:  # Ctrl-C: Tune saved its state and returned early
        raise KeyboardInterrupt(
            f"{unfinished} of {sweep.num_trials()} trials unfinished (tables written for the others); continue with: "
            f"distcl tune --resume {out}"
        )
    return summary


def write_results(sweep: SweepConfig, trials: pd.DataFrame, out: Path, log: Callable[[str], None] = print) -> Path:
    """sweep.parquet (one row per trial), summary.parquet, summary.md, final_fid.png."""
    trials = trials.sort_values(list(sweep.params)).reset_index(drop=True)
    trials.to_parquet(out / "sweep.parquet")
    summary = summarize(trials, list(sweep.params))
    summary.to_parquet(out / "summary.parquet")
    markdown = summary_markdown(sweep, summary, trials)
    (out / "summary.md").write_text(markdown)
    plot_final_fid(sweep, summary, out / "final_fid.png")
    log(markdown)
    return out / "summary.md"
