"""Runs tracked in MLflow, read back with MLflow's own client: the same metrics as metrics.parquet (and their
floor), the training curves, the samples and plots; a resumed run continues its MLflow run and logs nothing twice;
a store that cannot be used stops the run before it writes anything; one that fails mid-run stops only the
tracking; with tracking off, nothing imports mlflow; a distillation is a run of its own. (A sweep's parent and
child runs: tests/test_tune.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from distcl.cli import main
from distcl.config import ModelConfig, load_config, tracking_uri
from distcl.launch import run
from distcl.models import build_scheduler, save_checkpoint

TINY = ["data.num_tasks=2", "train.max_steps=5", "eval.num_samples=40", "eval.steps=2"]
ARGS = ["--preset", "smoke", "--inline", "--no-progress", *[a for o in TINY for a in ("--set", o)]]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-task run tracked in a local sqlite store, then the same command again (a resume: nothing to train)."""
    base = tmp_path_factory.mktemp("tracked")
    out, uri = base / "run", f"sqlite:///{base / 'mlflow.db'}"
    assert main(["run", *ARGS, "--out", str(out), "--mlflow", uri]) == 0
    first = json.loads((out / "tracking.json").read_text())
    assert main(["run", *ARGS, "--out", str(out), "--mlflow", uri]) == 0
    return out, MlflowClient(tracking_uri=uri), first


def test_a_run_is_one_mlflow_run_with_the_metrics_of_its_tables(tracked):
    out, client, first = tracked
    state = json.loads((out / "tracking.json").read_text())
    assert state == first == {"uri": state["uri"], "run_id": state["run_id"], "tasks": [0, 1]}  # the resume: same run
    mlrun = client.get_run(state["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "smoke"
    assert client.get_experiment(mlrun.info.experiment_id).name == "smoke"
    metrics = pd.read_parquet(out / "metrics.parquet")
    for metric, rows in metrics.groupby("metric"):
        assert history(client, state["run_id"], metric) == sorted(zip(rows.task, rows.value))  # each logged once
    floor = pd.read_parquet(out / "real_metrics.parquet")
    assert history(client, state["run_id"], "real_data/fid") == sorted(
        zip(floor[floor.metric == "fid"].task, floor[floor.metric == "fid"].value)
    )
    train = pd.read_parquet(out / "train_log.parquet")
    losses = history(client, state["run_id"], "train/loss")
    assert [v for _, v in losses] == pytest.approx(train.loss.tolist()) and [s for s, _ in losses] == [0, 4, 5, 9]
    params, tags = mlrun.data.params, mlrun.data.tags
    assert params["train.strategy"] == "gd" and params["data.num_tasks"] == "2" and params["seed"] == "42"
    assert tags["distcl.strategy"] == "gd" and tags["distcl.seed"] == "42" and tags["distcl.out"] == str(out)
    assert "cores" in tags["distcl.machine"] and tags["distcl.data"].startswith("fashion_mnist")
    artifacts = {a.path for d in ("samples", "plots") for a in client.list_artifacts(state["run_id"], d)}
    assert {"samples/task_0.png", "samples/task_1.png", "plots/fid.png", "plots/kld.png"} <= artifacts


def test_a_store_that_cannot_be_used_stops_the_run_before_it_writes_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *ARGS, "--out", str(out), "--mlflow", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "distcl: config error: tracking.mlflow: 'http://127.0.0.1:9' cannot be used"
    )
    assert not out.exists()


def test_a_tracker_failing_mid_run_stops_tracking_once_and_the_run_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        preset="smoke", overrides=[*TINY, "runtime.backend=inline", "device=cpu", f"tracking.mlflow={uri}"]
    )
    out, lines = tmp_path / "run", []

    def delete_the_run(k, metrics):  # after task 0 is logged, the store refuses the run's further writes
        if k == 0:
            MlflowClient(tracking_uri=uri).delete_run(json.loads((out / "tracking.json").read_text())["run_id"])

    run(cfg, out, progress=False, log=lines.append, on_task=delete_the_run)
    stopped = [line for line in lines if "tracking stopped" in line]
    assert len(stopped) == 1 and stopped[0].startswith("[distcl] tracking stopped (task 1: MlflowException")
    assert sorted(pd.read_parquet(out / "metrics.parquet").task.unique()) == [0, 1]  # no result lost
    assert json.loads((out / "tracking.json").read_text())["tasks"] == [0]


def test_local_store_paths_are_made_absolute_where_the_input_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri("runs/m.db") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    assert tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"
    assert tracking_uri("http://host:5000") == "http://host:5000" and tracking_uri(None) is None


def test_with_tracking_off_nothing_imports_mlflow(tmp_path):
    code = (
        "import sys; from distcl.cli import main; "
        f"assert main(['run', *{ARGS!r}, '--set', 'data.num_tasks=1', '--out', {str(tmp_path / 'run')!r}]) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_distillation_is_one_mlflow_run_with_each_units_loss_once(unet, tmp_path):
    save_checkpoint(unet, build_scheduler(ModelConfig()), tmp_path / "teacher")
    out, uri = tmp_path / "pd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["distill", "progressive", "--teacher", str(tmp_path / "teacher"), "--out", str(out), "--inline"]
    args += [a for o in ("start_steps=4", "target_steps=2", "iterations=3", "batch_size=4") for a in ("--set", o)]
    assert main([*args, "--no-progress", "--mlflow", uri]) == 0
    assert main([*args, "--no-progress", "--mlflow", uri]) == 0  # resumed: every unit done, nothing logged again
    state = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    mlrun = client.get_run(state["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["method"] == "progressive"
    assert state["units"] == ["steps_2"] and mlrun.data.params["target_steps"] == "2"
    assert [s for s, _ in history(client, state["run_id"], "steps_2/loss")] == [0, 1, 2]
