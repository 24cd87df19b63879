"""A run tracked in MLflow (``tracking.mlflow``): one continual run (an OUT) is one MLflow run, a sweep a parent
run with a child run per trial. The process that holds the metrics logs them (a run's or a trial's driver, after
each task, from OUT's own tables), never a Train worker. MLflow is imported only here, only when tracking is on.

    OUT/tracking.json   {"uri", "run_id", "tasks": [the tasks logged]}: a resumed or appended run continues the
                        same MLflow run, and nothing is logged twice

Per task k (step k): every metric and its real-data floor (``real_data/<metric>``), the training curves
(``train/<term>``, step = the global step over the tasks), the sample grid. At the start: the resolved config as
parameters, tags naming strategy, seed, data and machine. At the end: the metric plots.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from distcl.rundir import TRACKING_FILE
from distcl.settings import ConfigError
from distcl.sweep import flatten

CURVES = ("loss", "loss_data", "loss_replay", "grad_norm", "step_s", "replay_wait_s")
# a server that does not answer fails the start in seconds, not after MLflow's minutes of retries
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def flat_params(config: dict) -> dict[str, str]:
    """A nested config as MLflow parameters: {"train.lr": "0.001", ...} (values at most 6000 characters)."""
    return {key: str(value)[:6000] for key, value in flatten(config).items()}


def mlflow_client(uri: str):
    """An MlflowClient of ``uri`` (mlflow imported here, and only here)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The experiment ``name``, made when new (a local sqlite store's artifacts in ``mlartifacts/`` beside its
    file, where ``mlflow ui`` run from that directory finds them, whatever the working directory of the run)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class Tracking:
    """One MLflow run, to which logging stops (said once, through ``log``) at its first failure: the results are
    in OUT or the sweep directory whatever happens to the tracker."""

    def __init__(self, client, run_id: str, log: Callable[[str], None]):
        self.client, self.run_id, self.log, self.stopped = client, run_id, log, False

    def guarded(self, what: str, work: Callable[[], None]) -> None:
        if self.stopped:
            return
        try:
            work()
        except Exception as err:  # any failure of the tracker: the run goes on without it
            self.stopped = True
            self.log(
                f"[distcl] tracking stopped ({what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "the results are in the run's directory"
            )

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def end(self, status: str) -> None:
        self.guarded("ending the run", lambda: self.client.set_terminated(self.run_id, status))


def start_run(
    client,
    experiment: str,
    name: str,
    params: dict[str, str],
    tags: dict[str, str],
    run_id: Optional[str],
    parent: Optional[str],
    log: Callable[[str], None],
) -> Tracking:
    """Continue the MLflow run ``run_id`` (when the store still has it), else start one named ``name`` in
    ``experiment`` (a child of ``parent``) with ``params`` and ``tags``."""
    from mlflow.entities import Param

    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
            return Tracking(client, run_id, log)
        except Exception:  # gone from the store (deleted): a new run
            pass
    all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
    run = client.create_run(experiment_id(client, experiment), run_name=name, tags=all_tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return Tracking(client, run.info.run_id, log)


def usable(uri: str, work: Callable[[], Any]) -> Any:
    """``work()``; a store that cannot be reached or written is a ConfigError naming ``tracking.mlflow`` (one
    line: the run stops before it trains)."""
    try:
        return work()
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ConfigError("tracking.mlflow", f"{uri!r} cannot be used ({type(err).__name__}: {first})") from None


def _state(directory: Path) -> dict[str, Any]:
    path = directory / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / f".{TRACKING_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, directory / TRACKING_FILE)


class RunTracker:
    """The continual run in OUT as one MLflow run (``cfg.tracking``): made with the store checked (before the run
    writes anything), :meth:`start` once OUT is the run's (it continues the MLflow run of OUT/tracking.json),
    :meth:`task_done` after each task (the driver's ``on_task``), :meth:`end` when the run ends."""

    def __init__(self, cfg, out: Path, parent: Optional[str] = None, log: Callable[[str], None] = print):
        self.cfg, self.out, self.uri, self.parent, self.log = cfg, Path(out), cfg.tracking.mlflow, parent, log
        self.experiment = cfg.tracking.experiment or cfg.name
        self.client = usable(self.uri, lambda: mlflow_client(self.uri))
        usable(self.uri, lambda: experiment_id(self.client, self.experiment))
        self.tracking: Optional[Tracking] = None
        self.logged: set[int] = set()

    def start(self) -> str:
        """Continue OUT's MLflow run (or start it) and record it in OUT/tracking.json; its run id."""
        from distcl.devices import describe_host

        cfg, state = self.cfg, _state(self.out)
        same_store = state.get("uri") == self.uri
        self.logged = set(state.get("tasks", [])) if same_store else set()
        tags = {
            "distcl.strategy": cfg.train.strategy,
            "distcl.seed": str(cfg.seed),
            "distcl.data": f"{cfg.data.source} {cfg.data.data_dir or ''}".strip(),
            "distcl.machine": describe_host(),
            "distcl.out": str(self.out.resolve()),
        }
        run_id = state.get("run_id") if same_store else None
        self.tracking = usable(
            self.uri,
            lambda: start_run(
                self.client, self.experiment, cfg.name, flat_params(cfg.to_dict()), tags, run_id, self.parent, self.log
            ),
        )
        self._save()
        return self.tracking.run_id

    def _save(self) -> None:
        _save_state(self.out, {"uri": self.uri, "run_id": self.tracking.run_id, "tasks": sorted(self.logged)})

    def task_done(self, k: int) -> None:
        """Task k's metrics, floors, training curves and samples, unless logged before."""
        if k not in self.logged:
            self.tracking.guarded(f"task {k}", lambda: self._log_task(k))

    def _log_task(self, k: int) -> None:
        t = self.tracking
        for table, prefix in (("metrics.parquet", ""), ("real_metrics.parquet", "real_data/")):
            path = self.out / table
            if path.is_file():
                rows = pd.read_parquet(path, filters=[("task", "=", k)])
                t.metrics({f"{prefix}{m}": v for m, v in zip(rows.metric, rows.value)}, step=k)
        log_path = self.out / "train_log.parquet"
        if log_path.is_file():
            train = pd.read_parquet(log_path)
            offset = int(sum(train[train.task == j].step.max() + 1 for j in range(k) if (train.task == j).any()))
            rows = train[train.task == k]
            for row in rows.itertuples():
                values = {f"train/{c}": getattr(row, c) for c in CURVES if c in rows and pd.notna(getattr(row, c))}
                t.metrics(values, step=offset + int(row.step))
        grid = self.out / "samples" / f"task_{k}.png"
        if grid.is_file():
            t.client.log_artifact(t.run_id, str(grid), "samples")
        self.logged.add(k)
        self._save()

    def end(self, status: str) -> None:
        """The metric plots (after a finished run) and the run's end status (FINISHED, FAILED, KILLED)."""
        if self.tracking is None:  # the run stopped before it started tracking
            return
        if status == "FINISHED":
            self.tracking.guarded("the plots", self._log_plots)
        self.tracking.end(status)

    def _log_plots(self) -> None:
        from distcl.report import load_metrics, plot_metrics

        with tempfile.TemporaryDirectory() as tmp:
            for path in plot_metrics(load_metrics(self.out), Path(tmp)):
                self.tracking.client.log_artifact(self.tracking.run_id, str(path), "plots")


class SweepTracker:
    """A sweep as an MLflow parent run (its trials' runs are its children, in its experiment), continued by a
    resumed sweep (DIR/tracking.json)."""

    def __init__(self, sweep, out: Path, log: Callable[[str], None] = print):
        from distcl.devices import describe_host

        uri = sweep.trial_config({}).tracking.mlflow
        state = _state(out)
        params = flat_params({"sweep": sweep.params})
        tags = {"distcl.sweep": sweep.name, "distcl.machine": describe_host(), "distcl.out": str(Path(out).resolve())}
        self.experiment = sweep.trial_config({}).tracking.experiment or sweep.name
        run_id = state.get("run_id") if state.get("uri") == uri else None
        client = usable(uri, lambda: mlflow_client(uri))
        self.tracking = usable(
            uri, lambda: start_run(client, self.experiment, sweep.name, params, tags, run_id, None, log)
        )
        _save_state(out, {"uri": uri, "run_id": self.tracking.run_id})

    @property
    def run_id(self) -> str:
        return self.tracking.run_id


class DistillTracker:
    """A distillation (``distcl distill --mlflow``) as one MLflow run: its settings as parameters, each unit's loss
    curve (``<unit>/loss``, step = the unit's step) when the unit is saved; continued on resume (OUT/tracking.json),
    no unit logged twice."""

    def __init__(self, uri: str, method: str, out: Path, settings: dict, log: Callable[[str], None] = print):
        from distcl.devices import describe_host

        self.out, self.uri = Path(out), uri
        state = _state(self.out) if self.out.is_dir() else {}
        same = state.get("uri") == uri
        self.logged = set(state.get("units", [])) if same else set()
        tags = {"distcl.distill": method, "distcl.machine": describe_host(), "distcl.out": str(self.out.resolve())}
        client = usable(uri, lambda: mlflow_client(uri))
        run_id = state.get("run_id") if same else None
        self.tracking = usable(
            uri, lambda: start_run(client, "distill", self.out.name, flat_params(settings), tags, run_id, None, log)
        )

    def unit_done(self, spec, rows: list[dict]) -> None:
        if spec.name not in self.logged:
            self.tracking.guarded(spec.name, lambda: self._log_unit(spec.name, rows))

    def _log_unit(self, name: str, rows: list[dict]) -> None:
        for row in rows:
            self.tracking.metrics({f"{name}/loss": row["loss"]}, step=int(row["step"]))
        self.logged.add(name)
        state = {"uri": self.uri, "run_id": self.tracking.run_id, "units": sorted(self.logged)}
        _save_state(self.out, state)
