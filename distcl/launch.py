"""A run, or a distillation, on the backend asked for: the choice made at the face (the CLI, the job entrypoints,
a Tune trial), so that the core (distcl.continual, distcl.distill) never imports the Ray shell."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from distcl.config import DataConfig, RunConfig, RuntimeConfig, apply_overrides
from distcl.console import run_log
from distcl.continual import run_continual
from distcl.data import DataError, load_dataset, to_model_range
from distcl.devices import resolve_device
from distcl.distill import METHODS, distill, fit_inline
from distcl.learn import (
    READY,
    append_scenario,
    learn_config,
    learned,
    ready_arrivals,
    require_run,
    trained_tasks,
)
from distcl.models import build_unet, load_pipeline_parts
from distcl.rundir import check_free
from distcl.settings import ConfigError, from_dict


def run(
    cfg: RunConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_task: Optional[Callable[[int, dict[str, float]], None]] = None,
    parent_run: Optional[str] = None,
    append: bool = False,
) -> Path:
    """Run ``cfg`` on its ``runtime.backend``: Ray (distcl.runtime.pipeline) or this process
    (distcl.continual.run_continual); the metrics table's path. The console's lines also go to OUT/run.log; with
    ``tracking.mlflow``, each task is logged to the run's MLflow run (a child of ``parent_run``) when it is
    evaluated (distcl.tracking). With ``append``, ``cfg`` adds task(s) to the run in OUT (:func:`learn`)."""
    check_free(out)  # a second driver is refused before it writes a line into OUT/run.log
    with run_log(out, f"{cfg.name} ({cfg.runtime.backend})"):
        tracker = None
        if cfg.tracking.mlflow is not None:
            from distcl.tracking import RunTracker  # mlflow is imported only when asked for

            tracker = RunTracker(cfg, out, parent_run, log)  # the store checked before the run writes anything

        def start() -> None:
            if tracker is not None:
                log(f"[distcl] tracked in MLflow: {cfg.tracking.mlflow}, run {tracker.start()}")

        def after_task(k: int, metrics: dict[str, float]) -> None:
            if tracker is not None:
                tracker.task_done(k)
            if on_task is not None:
                on_task(k, metrics)

        try:
            if cfg.runtime.backend == "ray":
                from distcl.runtime.pipeline import run as run_on_ray  # Ray is imported only when asked for

                metrics = run_on_ray(cfg, out, progress, log, after_task, start, append)
            else:
                metrics = run_continual(cfg, out, None, progress, log, after_task, start, append)
        except BaseException as err:
            if tracker is not None:
                tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        if tracker is not None:
            tracker.end("FINISHED")
        return metrics


def learn(out: Path, data_dir: Optional[str], overrides: list[str], progress: bool = True) -> Path:
    """``distcl learn``: the classes in ``data_dir`` appended to the run in ``out`` as its next task(s)
    (distcl.learn), on the backend its config asks for. Bad input (a kept field changed, NEW missing, empty or
    unreadable, a class trained already, OUT not a run or in use) is refused before OUT is touched."""
    out = Path(out).resolve()
    cfg = learn_config(out, data_dir, overrides)
    check_free(out)
    size = build_unet(cfg.model, cfg.data.image_channels).config.sample_size
    try:
        dataset = load_dataset(cfg.data, cfg.cache_dir, size)
    except DataError as err:
        raise ConfigError("--data-dir", str(err)) from None
    append_scenario(out, cfg, dataset, size)  # its refusals, before the run writes anything
    return run(cfg, out, progress, append=True)


def watch(out: Path, inbox: Path, overrides: list[str], progress: bool = True, poll_s: float = 5.0, log=print) -> None:
    """``distcl learn OUT --watch INBOX``: each complete arrival in INBOX (distcl.learn.ready_arrivals) not learned
    yet is appended as OUT's next task, in name order; an arrival refused (a class trained already, an unreadable
    image) is said once and left; one line while it waits. Runs until stopped (Ctrl-C: the same command resumes)."""
    out, inbox = Path(out).resolve(), Path(inbox).resolve()
    if not inbox.is_dir():
        raise ConfigError("--watch", f"{inbox} is not a directory (allowed: the inbox folder to watch)")
    require_run(out)
    refused: set[Path] = set()
    waiting = False
    while True:
        todo = [a for a in ready_arrivals(inbox) if a not in refused and not learned(out, a)]
        if not todo:
            if not waiting:
                log(
                    f"[distcl] watching {inbox}: {trained_tasks(out)} tasks learned; waiting for an arrival "
                    f"(a folder of class folders holding a {READY} file)"
                )
                waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        log(f"[distcl] arrival {todo[0].name}: learning its classes as the next task")
        try:
            learn(out, str(todo[0]), overrides, progress)
        except ConfigError as err:
            log(f"[distcl] arrival {todo[0].name} refused: {err}")
            refused.add(todo[0])


def distill_teacher(
    method: str,
    teacher: Path,
    out: Path,
    overrides: list[str],
    inline: bool = False,
    device: str = "auto",
    runtime: Optional[RuntimeConfig] = None,
    data_dir: Optional[str] = None,
    progress: bool = True,
    mlflow: Optional[str] = None,
) -> list[Path]:
    """``distcl distill``: the ``method`` settings from ``key=value`` overrides, trained in this process on
    ``device`` (``inline``) or on Ray Train with ``runtime``'s layout; progressive with ``data=fmnist`` on the
    training images at the teacher's size; tracked in MLflow at ``mlflow`` (a URI). The outputs (PD: one per
    stage)."""
    cfg = from_dict(METHODS[method], apply_overrides({}, overrides))
    if inline:
        fit = partial(fit_inline, device=resolve_device(device))
    else:
        from distcl.runtime.distill import RayDistillFit  # Ray is imported only when asked for

        fit = RayDistillFit(runtime or RuntimeConfig())
        fit.check(cfg.batch_size)
    images = None
    if method == "progressive" and cfg.data == "fmnist":
        unet = load_pipeline_parts(Path(teacher))[0]
        data = DataConfig(data_dir=data_dir, channels=unet.config.in_channels)
        images = to_model_range(load_dataset(data, None, unet.config.sample_size).train.images, unet.config.sample_size)
    tracker = None
    if mlflow is not None:
        from dataclasses import asdict

        from distcl.tracking import DistillTracker  # mlflow is imported only when asked for

        tracker = DistillTracker(mlflow, method, Path(out), {"method": method, "teacher": str(teacher), **asdict(cfg)})
    try:
        saved = distill(
            method, Path(teacher), Path(out), cfg, fit, images, progress, on_unit=tracker and tracker.unit_done
        )
        if tracker is not None:
            tracker.tracking.end("FINISHED")
        return saved
    except BaseException:
        if tracker is not None:
            tracker.tracking.end("FAILED")
        raise
    finally:
        getattr(fit, "close", lambda: None)()  # the Ray fit's worker group
