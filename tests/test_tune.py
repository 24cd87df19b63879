"""Sweeps on Ray Tune, end to end: a sweep interrupted with Ctrl-C (SIGINT) and resumed reruns no trial that Tune
saw finish, retrains no finished run, and writes both tables with two seeds per config; tracked in MLflow, the
sweep is a parent run and each trial a child run, each task logged once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from distcl.devices import describe_host
from distcl.runtime.tune import TRIAL_STARTS, trial_start

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "tiny",
    "preset": "smoke",
    "base": {
        "data": {"num_tasks": 2, "train_per_class": 40, "test_per_class": 20},
        "train": {"max_steps": 3},
        "eval": {"num_samples": 20, "steps": 2},
        "runtime": {"backend": "inline", "num_cpus": 2},  # trials run in-process: Tune's mechanics, quickly
        "device": "cpu",  # two concurrent trials, whatever GPUs the machine has
    },
    "params": {"train.replay_lambda": [0.5, 3.0], "seed": [42, 69]},
    "max_concurrent_trials": 2,
}


def _private(cmd, **kwargs):
    """``cmd`` in a private PID namespace: whatever it leaves running ends with it, and nothing else."""
    return subprocess.Popen(["unshare", "-pf", "--mount-proc", "--kill-child=SIGKILL", *cmd], **kwargs)


def _inner_pid(outer: subprocess.Popen) -> int:
    """The command's PID (the child of unshare's forked init) as this namespace sees it."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for pid in Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split():
            return int(pid)
        time.sleep(0.1)
    raise AssertionError("the sweep did not start")


def _starts(run_dir: Path) -> int:
    """How often the trial started; each start names the host it ran on."""
    starts = [trial_start(line) for line in (run_dir / TRIAL_STARTS).read_text().splitlines()]
    assert all(host == describe_host() for _, _, host in starts), starts
    return len(starts)


def _weights(run_dir: Path) -> dict[str, int]:
    """Each saved file of the run's tasks and its modification time (a retrained task rewrites its files)."""
    return {str(f.relative_to(run_dir)): f.stat().st_mtime_ns for f in run_dir.glob("task_*/**/*") if f.is_file()}


def _tasks_done(run_dir: Path) -> int:
    path = run_dir / "metrics.parquet"
    return pd.read_parquet(path).task.nunique() if path.exists() else 0


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    sweep_file, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    cmd = [sys.executable, "-m", "distcl.cli", "tune"]
    log = (tmp_path / "first.log").open("w")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _private([*cmd, str(sweep_file), "--out", str(out), "--mlflow", uri], stdout=log, stderr=subprocess.STDOUT)
    pid = _inner_pid(first)
    runs = out / "runs"
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once one trial is finished and the next has started
        dirs = list(runs.glob("*")) if runs.exists() else []
        if any(_tasks_done(d) == 2 for d in dirs) and len(dirs) >= 2:
            break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    else:
        raise AssertionError("no trial finished in time")
    done_on_disk = {d.name: _weights(d) for d in runs.glob("*") if _tasks_done(d) == 2}
    os.kill(pid, signal.SIGINT)
    first.wait(timeout=180)
    log.close()
    assert len(done_on_disk) < 4, "the sweep ended before it could be interrupted"
    assert f"continue with: distcl tune --resume {out}" in (tmp_path / "first.log").read_text()
    # the trials Tune recorded as finished (a run may end on disk just before the Ctrl-C, its trial not yet)
    completed = {
        Path(t.last_result["run_dir"]).name
        for t in ExperimentAnalysis(str(out / "tune")).trials
        if t.status == "TERMINATED"
    }

    resumed = subprocess.run([*cmd, "--resume", str(out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_parquet(out / "sweep.parquet")
    assert len(trials) == 4 and set(trials.status) == {"completed"}
    assert {"train.replay_lambda", "seed", "fid_task0", "fid_task1", "fid_final", "fid_auc"} <= set(trials.columns)
    for run_dir in map(Path, trials.run_dir):
        starts = _starts(run_dir)
        if run_dir.name in completed:
            assert starts == 1, f"{run_dir.name} finished before the interruption but was rerun"
        if run_dir.name in done_on_disk:  # also one whose end Tune had not recorded yet: restarted, it retrains nothing
            assert _weights(run_dir) == done_on_disk[run_dir.name], f"{run_dir.name} was retrained"
    summary = pd.read_parquet(out / "summary.parquet")
    assert sorted(summary["train.replay_lambda"]) == [0.5, 3.0] and set(summary.seeds) == {2}
    assert "best by final fid" in (out / "summary.md").read_text()
    assert (out / "final_fid.png").stat().st_size > 0
    config = json.loads(json.dumps(yaml.safe_load((Path(trials.run_dir[0]) / "config.yaml").read_text())))
    assert config["train"]["max_steps"] == 3 and config["data"]["num_tasks"] == 2

    # tracked in MLflow (the resume took the URI from sweep.yaml): one parent run, each trial a child of it, each
    # task's metrics once although trials were interrupted and resumed
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["distcl.sweep"] == "tiny" and parent.info.status == "FINISHED"
    assert json.loads((out / "tracking.json").read_text())["run_id"] == parent.info.run_id
    children = {Path(r.data.tags["distcl.out"]).name: r for r in runs if r is not parent}
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    for run_dir in map(Path, trials.run_dir):
        child = children[run_dir.name]
        assert child.info.status == "FINISHED"
        assert child.data.params["train.replay_lambda"] in ("0.5", "3.0") and child.data.params["seed"] in ("42", "69")
        fid = pd.read_parquet(run_dir / "metrics.parquet").query("metric == 'fid'")
        logged = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "fid"))
        assert logged == sorted(zip(fid.task, fid.value))
