"""A run directory OUT: its layout, its tables (rows replaced per task, atomically), the resume checks, and the
lock that lets one driver hold it.

    OUT/config.yaml                 the run's config (a resume must match it)
    OUT/task_<k>/                   the student after task k (a diffusers DDIMPipeline folder)
    OUT/replay_sampler/task_<k>/    the fast replay sampler distilled from task_<k>
    OUT/classifier/task_<k>.pt      the continual classifier after task k
    OUT/samples/task_<k>.png        evaluation samples
    OUT/metrics.parquet             long form: run, seed, strategy, task, metric, value
    OUT/real_metrics.parquet        the same metrics of real images of the seen classes (strategy "real data")
    OUT/train_log.parquet, classifier_log.parquet, evaluator.json, .lock
    OUT/run.log                     the console of every start (distcl.console)
    OUT/tracking.json               the MLflow run tracking OUT (distcl.tracking)
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from distcl.config import RunConfig
from distcl.console import RUN_LOG
from distcl.settings import ConfigError, from_dict

REAL_DATA = "real data"  # the strategy name of the metrics' floor: real images scored as samples
TRACKING_FILE = "tracking.json"  # the MLflow run that tracks OUT (distcl.tracking)


def task_dir(out: Path, k: int) -> Path:
    return out / f"task_{k}"


def replay_sampler_dir(teacher_dir: Path) -> Path:
    """Where the fast replay sampler distilled from the teacher OUT/task_<k> lives: OUT/replay_sampler/task_<k>."""
    return Path(teacher_dir).parent / "replay_sampler" / Path(teacher_dir).name


def classifier_path(out: Path, k: int) -> Path:
    return out / "classifier" / f"task_{k}.pt"


def append_rows(path: Path, rows: list[dict], task: int) -> None:
    """Rewrite the Parquet table at ``path`` with its rows of ``task`` replaced by ``rows`` (atomically)."""
    table = pa.Table.from_pylist(rows)
    if path.exists():
        old = pq.read_table(path)
        old = old.filter(pa.compute.not_equal(old["task"], task))
        table = pa.concat_tables([old, table], promote_options="permissive")
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def evaluated_tasks(out: Path) -> set[int]:
    path = out / "metrics.parquet"
    return set(pq.read_table(path, columns=["task"])["task"].to_pylist()) if path.exists() else set()


def all_tasks_evaluated(out: Path, num_tasks: int) -> bool:
    """Every task 0..num_tasks-1 of the run in OUT has its metrics."""
    return evaluated_tasks(out) >= set(range(num_tasks))


def task_metrics(out: Path, k: int) -> dict[str, float]:
    """The metrics of task k from OUT/metrics.parquet, as {metric: value}."""
    table = pq.read_table(out / "metrics.parquet", filters=[("task", "=", k)], columns=["metric", "value"])
    return dict(zip(table["metric"].to_pylist(), table["value"].to_pylist()))


_HELD_LOCKS: dict[Path, IO] = {}


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """One driver per OUT: an exclusive ``flock`` on OUT/.lock while the run lasts. The kernel drops it when the
    driver ends, however it ends, so a killed driver's OUT can be resumed at once; re-entrant in one process.
    A second driver is refused (ConfigError on ``--out``, naming the holder); an OUT this call created is
    removed again if the run fails before writing anything else."""
    out = Path(out)
    if out in _HELD_LOCKS:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            "--out", f"{out} is in use by another distcl run ({holder}); wait for it to end, or use another --out"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _HELD_LOCKS[out] = lock
    try:
        yield
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {".lock", RUN_LOG}:  # only the lock and its console
            shutil.rmtree(out)
        raise
    finally:
        del _HELD_LOCKS[out]
        lock.close()


def check_free(out: Path) -> None:
    """Refuse (ConfigError on ``--out``, naming the holder) an OUT that a running driver holds, writing nothing."""
    path = Path(out) / ".lock"
    if not path.is_file():
        return
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                "--out", f"{out} is in use by another distcl run ({holder}); wait for it to end"
            ) from None


def prepare_out(cfg: RunConfig, out: Path) -> None:
    """Create OUT and write config.yaml; refuse an OUT that holds a run of another config. The runtime layout
    may change between resumes, except the number of Train workers (it shards data and replay)."""
    config_path = out / "config.yaml"
    if config_path.exists():  # read through RunConfig: fields added since the run was made take their defaults
        check_same_results(from_dict(RunConfig, yaml.safe_load(config_path.read_text())), cfg, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def check_same_results(previous: RunConfig, cfg: RunConfig, holder) -> None:
    """Refuse (ConfigError on ``--out``, naming the fields) a config whose results would differ from those of
    ``previous``, the config ``holder`` was started with."""
    before, now = _results_config(previous.to_dict()), _results_config(cfg.to_dict())
    if before != now:
        raise ConfigError(
            "--out",
            f"{holder} holds a run with another config (differs in {', '.join(sorted(_diff(before, now)))}); "
            "use another --out or the same config to resume",
        )


def _results_config(resolved: dict) -> dict:
    """The fields results depend on: all but ``runtime`` and ``tracking``, plus the number of Train workers (1
    inline) and the precision."""
    runtime = resolved.get("runtime", {})
    workers = runtime.get("num_workers", 1) if runtime.get("backend", "ray") == "ray" else 1
    return {
        **{k: v for k, v in resolved.items() if k not in ("runtime", "tracking")},
        "runtime.num_workers": workers,
        "runtime.precision": runtime.get("precision", "fp32"),
    }


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


def save_classifier(out: Path, k: int, weights: dict[str, torch.Tensor]) -> None:
    """The continual classifier after task k, written atomically."""
    path = classifier_path(out, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_classifier(out: Path, k: int) -> dict[str, torch.Tensor]:
    return torch.load(classifier_path(out, k), map_location="cpu")
