"""The continual run, the task loop: for task k, train the student (teacher = the frozen student after k-1), train
the continual classifier, evaluate; each step saved to OUT (distcl.rundir) when done, so a rerun resumes: a task
whose task_<k>/ exists is never retrained, one without metrics is (re-)evaluated. On a backend that overlaps
(Ray), the classifier and the evaluation of task k run while task k+1 trains."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
import yaml

from distcl.backend import Backend, ClassifierSpec, InlineBackend, TaskSpec
from distcl.config import RunConfig
from distcl.console import time_left
from distcl.data import Scenario, Split, build_scenario, cache_dir, load_dataset, select
from distcl.devices import configure_numerics, resolve_device
from distcl.eval_net import accuracy_warning
from distcl.eval_net import train_classifier as train_eval_net
from distcl.evalstore import ensure_records, floor_reference, record_path, test_split
from distcl.evaluation import (
    Evaluator,
    metrics_from_chunks,
    save_grid,
    solver_predictions,
)
from distcl.learn import append_scenario, task_config_path, tasks_state, trained_tasks
from distcl.models import build_scheduler, build_unet, load_unet, save_checkpoint, seeded_init
from distcl.rundir import (
    REAL_DATA,
    append_rows,
    check_same_results,
    classifier_path,
    evaluated_tasks,
    load_classifier,
    out_lock,
    prepare_out,
    save_classifier,
    task_dir,
    task_metrics,
)
from distcl.seeding import derive_seed
from distcl.settings import from_dict
from distcl.solver import (
    SolverCNN,
    forgetting,
    solver_steps,
)
from distcl.teachers import distill_replay_sampler, uses_fast_sampler


class RunStopped(RuntimeError):
    """A step finished after its run stopped (by an error or Ctrl-C elsewhere): it is not saved."""


def run_continual(
    cfg: RunConfig,
    out: Path,
    backend: Optional[Backend] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_task: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_start: Optional[Callable[[], None]] = None,
    append: bool = False,
) -> Path:
    """Run (or resume) all tasks of ``cfg`` into ``out`` on ``backend`` (default: this process); returns the
    metrics table's path. With ``append``, ``cfg`` is the config of task(s) added to the run in ``out``
    (distcl.learn: its data holds only the new classes). ``on_start()`` is called once OUT holds the run (its
    config checked and written), before any training; ``on_task(k, metrics)`` after task k is evaluated, in task
    order, also for tasks a resumed run finds done. With ``classifier.enabled`` the classifier's task k follows
    the generator's."""
    out = Path(out).resolve()  # it travels to Ray workers, whose working directory is not the caller's
    with out_lock(out):
        return _run_tasks(cfg, out, backend, progress, log, on_task, on_start, append)


def _run_tasks(
    cfg: RunConfig,
    out: Path,
    backend: Optional[Backend],
    progress: bool,
    log: Callable[[str], None],
    on_task: Optional[Callable[[int, dict[str, float]], None]],
    on_start: Optional[Callable[[], None]],
    append: bool,
) -> Path:
    device = resolve_device(cfg.device)
    configure_numerics(cfg.runtime.precision, cfg.runtime.deterministic)
    fresh = build_unet(cfg.model, cfg.data.image_channels)  # validates the architecture before anything is written
    dataset = load_dataset(cfg.data, cfg.cache_dir, fresh.config.sample_size)
    if append:
        scenario = append_scenario(out, cfg, dataset, fresh.config.sample_size)
        record_task_configs(out, cfg, range(trained_tasks(out), len(scenario.tasks)))
    else:
        scenario = build_scenario(dataset, cfg.data, cfg.seed, fresh.config.sample_size)
        prepare_out(cfg, out)
    if on_start is not None:
        on_start()
    names = [scenario.task_names(k) for k in range(len(scenario.tasks))]
    state = {"tasks": scenario.tasks, "classes": names, "class_names": scenario.class_names}
    (out / "tasks.json").write_text(json.dumps(state, indent=2))
    evaluator = run_evaluator(cfg, out, dataset, scenario, device, progress)
    (out / "evaluator.json").write_text(json.dumps(evaluator.describe(), indent=2))
    run = ContinualRun(cfg, out, scenario, backend or InlineBackend(device, log), evaluator, device, progress, log)
    log(
        f"[distcl] {cfg.name}: tasks {scenario.tasks}, strategy {cfg.train.strategy}, "
        f"evaluation classifier test accuracy {evaluator.classifier_accuracy:.4f}"
    )
    if (warning := accuracy_warning(evaluator.classifier_accuracy)) is not None:
        log(warning)
    log(f"[distcl] classes per task: {scenario.describe()}")
    log(f"[distcl] devices: {run.backend.devices()}, precision {cfg.runtime.precision}")
    run.backend.begin(scenario, [k for k in range(len(scenario.tasks)) if not task_dir(out, k).exists()])
    after = AfterTasks(run, evaluated_tasks(out), on_task)
    try:
        for k in range(len(scenario.tasks)):
            if not task_dir(out, k).exists():
                after.collect(upto=k - 2)  # at most one task's work behind; an error of it raises here
                run.train(k)
            after.submit(k)
        after.finish()
    finally:
        after.stop()
    return out / "metrics.parquet"


EVAL_NET = "eval_net.pt"  # OUT's evaluation network: every task of the run, appended ones too, is scored by it


def run_evaluator(
    cfg: RunConfig, out: Path, dataset, scenario: Scenario, device: torch.device, progress: bool
) -> Evaluator:
    """The evaluator of the run in OUT, whose network is OUT/eval_net.pt: at the run's start the cached network of
    its data (distcl.eval_net), copied there; an append keeps it while it knows every class, else trains it anew
    on OUT's records of the trained classes (distcl.evalstore) and the new data (distcl.learn)."""
    saved = out / EVAL_NET
    cache = cache_dir(cfg.cache_dir)
    if not saved.is_file():
        first = Evaluator(cfg.eval, dataset, scenario.sample_size, cache, device, progress)
        net = torch.load(first.classifier_file, map_location="cpu")
        save_atomically({**net, "classes": dataset.class_names}, saved)
    elif torch.load(saved, map_location="cpu")["arch"]["num_classes"] < scenario.num_classes:
        retrain_eval_net(cfg, out, scenario, device, progress)
    return Evaluator(cfg.eval, dataset, scenario.sample_size, cache, device, progress, saved=saved)


def retrain_eval_net(cfg: RunConfig, out: Path, scenario: Scenario, device: torch.device, progress: bool) -> None:
    """OUT/eval_net.pt trained anew for the scenario's classes: the trained classes' floor reserves and test images
    (OUT's records) with the new classes' training and test images."""
    trained = [c for t in scenario.tasks for c in t if record_path(out, c).is_file()]
    new = [c for t in scenario.tasks for c in t if c not in trained]
    old_train, old_test = floor_reference(out, trained), test_split(out, trained)
    fresh_train, fresh_test = select(scenario.train, new, None), select(scenario.test, new, None)
    train = Split(torch.cat([old_train.images, fresh_train.images]), torch.cat([old_train.labels, fresh_train.labels]))
    test = Split(torch.cat([old_test.images, fresh_test.images]), torch.cat([old_test.labels, fresh_test.labels]))
    net, accuracy = train_eval_net(
        train, test, scenario.num_classes, cfg.eval.classifier_epochs, device, scenario.sample_size, progress=progress
    )
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    saved = {"state_dict": state, "arch": net.arch, "test_accuracy": accuracy, "classes": scenario.class_names}
    save_atomically(saved, out / EVAL_NET)


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def record_task_configs(out: Path, cfg: RunConfig, tasks: range) -> None:
    """OUT/task_configs/task_<k>.yaml of each appended task k; one left by an unfinished learn must be this config
    (as far as results go: ConfigError naming the fields otherwise)."""
    for k in tasks:
        path = task_config_path(out, k)
        if path.is_file():
            check_same_results(from_dict(RunConfig, yaml.safe_load(path.read_text())), cfg, f"task {k} in {out}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


class AfterTasks:
    """What follows the generator's task k: the continual classifier's task k, the evaluation of k (each saved when
    done), then ``on_task(k, metrics)``. On a backend that ``overlaps``, the first two run in a second driver
    thread while task k+1 trains, one task after the other (task k+2 waits for them: the sampler actors keep two
    teachers loaded); ``on_task`` is called in the caller's thread, in task order (so one task later than the
    generator's). After ``stop`` nothing more is saved (a run stopped by an error or Ctrl-C resumes from its
    files)."""

    def __init__(self, run: ContinualRun, evaluated: set[int], on_task: Optional[Callable] = None):
        self.run, self.evaluated, self.on_task = run, evaluated, on_task
        self.thread = ThreadPoolExecutor(1, "distcl-after-task") if run.backend.overlaps else None
        self.pending: deque[tuple[int, Future]] = deque()

    def submit(self, k: int) -> None:
        if self.thread is None:
            self.follow(k)
            self.report(k)
            return
        self.collect()
        self.pending.append((k, self.thread.submit(self.follow, k)))

    def follow(self, k: int) -> None:
        if self.run.cfg.classifier.enabled and not classifier_path(self.run.out, k).exists():
            self.run.train_classifier(k)
        if k not in self.evaluated:
            self.run.evaluate(k)

    def report(self, k: int) -> None:
        if self.on_task is not None:
            self.on_task(k, task_metrics(self.run.out, k))

    def collect(self, upto: Optional[int] = None) -> None:
        """``on_task`` of the tasks whose work is done, in order, having waited for that of the tasks up to
        ``upto``; a failure raises here."""
        while self.pending and (self.pending[0][1].done() or upto is not None and self.pending[0][0] <= upto):
            k, done = self.pending.popleft()
            done.result()
            self.report(k)

    def finish(self) -> None:
        self.collect(upto=len(self.run.scenario.tasks))

    def stop(self) -> None:
        """No saving from now on; the work in flight is abandoned (the backend's close ends its remote calls)."""
        self.run.stop_saving()
        if self.thread is not None:
            self.thread.shutdown(wait=False, cancel_futures=True)


@dataclass
class ContinualRun:
    """One run's three steps of task k, each on the backend and saved to OUT when done: the generator's task, the
    continual classifier's, the evaluation."""

    cfg: RunConfig
    out: Path
    scenario: Scenario
    backend: Backend
    evaluator: Evaluator
    device: torch.device
    progress: bool
    log: Callable[[str], None]
    saving_lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False
    began: float = field(default_factory=time.perf_counter)  # this process's start: the run's clock
    trained: int = 0  # tasks trained by this process

    @contextmanager
    def saving(self):
        """Around each step's writes to OUT: refused once the run is stopped (:meth:`stop_saving`)."""
        with self.saving_lock:
            if self.stopped:
                raise RunStopped("the run stopped: this step is not saved")
            yield

    def stop_saving(self) -> None:
        """Returns once no step is being saved; none is after it."""
        with self.saving_lock:
            self.stopped = True

    def train(self, k: int) -> None:
        """The student starts as the model after task k-1 (task 0: the seeded initialisation); its teacher, for
        the strategies that have one, is that model (its fast replay sampler distilled first when asked). Its line
        says when the run's training will end, at this process's rate per task so far."""
        cfg, out, start = self.cfg, self.out, time.perf_counter()
        if k == 0:
            with seeded_init(cfg.seed):
                student = build_unet(cfg.model, cfg.data.image_channels).to(self.device)
        else:
            student = load_unet(task_dir(out, k - 1), cfg.model, self.device, cfg.data.image_channels)
        init_dir = task_dir(out, k - 1) if k > 0 else None
        scheduler = build_scheduler(cfg.model)
        images = self.scenario.train_images(k, cfg.train.strategy == "joint")
        spec = TaskSpec(cfg, k, student, init_dir, images, scheduler, self.progress)
        if spec.has_teacher and uses_fast_sampler(cfg):
            distill_replay_sampler(cfg, init_dir, self.backend.distill_fit, self.progress, self.log)
        rows = self.backend.train_task(spec)
        append_rows(out / "train_log.parquet", rows, k)
        save_checkpoint(student, scheduler, task_dir(out, k))
        self.trained += 1
        num_tasks = len(self.scenario.tasks)
        left = time_left(time.perf_counter() - self.began, self.trained, num_tasks - k - 1)
        self.log(
            f"[distcl] task {k} {self.scenario.tasks[k]}: trained {rows[-1]['step'] + 1} steps in "
            f"{time.perf_counter() - start:.1f}s, last loss {rows[-1]['loss']:.4f}; "
            f"run: {k + 1}/{num_tasks} tasks, {left}"
        )

    def train_classifier(self, k: int) -> None:
        """Classifier task k (distcl.solver): it starts from the classifier of task k-1 (task 0: seeded)."""
        cfg, c, start = self.cfg, self.cfg.classifier, time.perf_counter()
        strategy = c.resolved_strategy(cfg.train.strategy)
        if k == 0:
            with seeded_init(derive_seed(cfg.seed, "classifier_init")):
                init = SolverCNN(cfg.data.image_channels, self.scenario.num_classes).state_dict()
        else:
            init = load_classifier(self.out, k - 1)
        joint = strategy == "joint"
        images, labels = self.scenario.train_images(k, joint), self.scenario.train_labels(k, joint)
        replay_from = task_dir(self.out, k - 1) if strategy == "replay" and k > 0 else None
        spec = ClassifierSpec(
            cfg, k, init, images, labels, solver_steps(len(labels), c.epochs, c.batch_size), replay_from, self.progress
        )
        weights, rows = self.backend.train_classifier(spec)
        with self.saving():  # the log first: the classifier's file marks the step done
            append_rows(self.out / "classifier_log.parquet", rows, k)
            save_classifier(self.out, k, weights)
        self.log(
            f"[distcl] classifier task {k}: trained {len(rows)} steps in {time.perf_counter() - start:.1f}s, "
            f"last loss {rows[-1]['loss']:.4f}"
        )

    def evaluate(self, k: int) -> None:
        """Metrics of the model after task k on the test classes seen so far (and of the continual classifier), from
        OUT's records of those classes (distcl.evalstore), written for the classes that have none."""
        cfg, out, start = self.cfg, self.out, time.perf_counter()
        seen = self.scenario.seen_classes(k)
        ensure_records(out, self.scenario, seen, cfg.seed, cfg.eval.num_samples)  # OUT keeps what it needs
        solver = load_classifier(out, k) if cfg.classifier.enabled else None
        progress = self.progress and not self.backend.overlaps  # not beside training's
        scored = score_task(cfg, out, k, seen, self.scenario, self.evaluator, self.backend, progress, solver)
        metrics = scored.metrics
        if cfg.classifier.enabled:
            labels, predicted = scored.test.labels, solver_predictions(scored.results)
            metrics.update(classifier_metrics(self.scenario, k, out, labels, predicted))
        rows, floor_rows = metric_rows(cfg, k, metrics, scored.floor, self.evaluator.net_id)
        grid = scored.grid
        with self.saving():
            save_grid(grid, out / "samples" / f"task_{k}.png")
            append_rows(out / "real_metrics.parquet", floor_rows, k)
            append_rows(out / "metrics.parquet", rows, k)
        self.log(
            f"[distcl] task {k} evaluated in {time.perf_counter() - start:.1f}s: "
            + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items())
        )


@dataclass
class Scored:
    """A task's model scored against OUT's records of the classes seen: its metrics, their real-data floor, the
    sample grid, the evaluation chunks' results and the test split they used."""

    metrics: dict[str, float]
    floor: dict[str, float]
    grid: torch.Tensor
    results: list
    test: Split


def score_task(
    cfg: RunConfig,
    out: Path,
    k: int,
    seen: list[int],
    scenario: Scenario,
    evaluator: Evaluator,
    backend: Backend,
    progress: bool,
    solver: Optional[dict] = None,
) -> Scored:
    """OUT/task_<k> scored by ``evaluator`` on ``backend`` against OUT's records of the ``seen`` classes
    (distcl.evalstore), with its real-data floor; with ``solver``, the continual classifier's predictions too."""
    test = test_split(out, seen)
    state = load_unet(task_dir(out, k), cfg.model, channels=cfg.data.image_channels).state_dict()
    job = evaluator.job(k, cfg.seed, cfg.model, state, test, scenario.sample_size, solver)
    results = backend.evaluate(job, progress)
    metrics, grid = metrics_from_chunks(results, test.labels, scenario.num_classes)
    floor = evaluator.real_data(floor_reference(out, seen), test, scenario.sample_size, cfg.seed, k)
    return Scored(metrics, floor, grid, results, test)


def metric_rows(
    cfg: RunConfig, k: int, metrics: dict[str, float], floor: dict[str, float], evaluator: str
) -> tuple[list[dict], list[dict]]:
    """Task k's rows of metrics.parquet and of real_metrics.parquet (the floor: strategy "real data")."""
    run_row = {"run": cfg.name, "seed": cfg.seed, "strategy": cfg.train.strategy, "task": k, "evaluator": evaluator}
    rows = [{**run_row, "metric": m, "value": v} for m, v in metrics.items()]
    floor_rows = [{**r, "strategy": REAL_DATA, "value": floor[r["metric"]]} for r in rows if r["metric"] in floor]
    return rows, floor_rows


RESCORED = "rescored_metrics.parquet"


def rescore(out: Path, device: torch.device, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """``distcl evaluate OUT``: every trained task of OUT scored again by its current evaluation network
    (OUT/eval_net.pt) against OUT's records, in this process, into OUT/rescored_metrics.parquet (its rows, the
    floor's among them, replace those of the same network; metrics.parquet is never rewritten). Curves of one
    network stay comparable after an append retrained it. Its path."""
    out = Path(out).resolve()
    with out_lock(out):
        cfg = from_dict(RunConfig, yaml.safe_load((out / "config.yaml").read_text()))
        state, n = tasks_state(out), trained_tasks(out)
        size = build_unet(cfg.model, cfg.data.image_channels).config.sample_size
        scenario = Scenario([tuple(t) for t in state["tasks"]], None, None, size, state["class_names"])
        evaluator = Evaluator(cfg.eval, None, size, cache_dir(cfg.cache_dir), device, progress, saved=out / EVAL_NET)
        backend = InlineBackend(device, log)
        rows = []
        for k in range(n):
            scored = score_task(cfg, out, k, scenario.seen_classes(k), scenario, evaluator, backend, progress)
            metric, floor = metric_rows(cfg, k, scored.metrics, scored.floor, evaluator.net_id)
            rows += metric + floor
            log(f"[distcl] task {k} scored: " + ", ".join(f"{m} {v:.4f}" for m, v in scored.metrics.items()))
        path = out / RESCORED
        table = pd.DataFrame(rows)
        if path.is_file():
            old = pd.read_parquet(path)
            table = pd.concat([old[old.evaluator != evaluator.net_id], table], ignore_index=True)
        tmp = path.with_name(f".{path.name}.tmp")
        table.to_parquet(tmp)
        os.replace(tmp, path)
    return path


def classifier_metrics(
    scenario: Scenario, k: int, out: Path, labels: torch.Tensor, predicted: torch.Tensor
) -> dict[str, float]:
    """From the continual classifier's ``predicted`` labels of the test images of every class seen so far (true
    ``labels``: distcl.evalstore.test_split's, in order; the evaluation workers predict them): ``accuracy`` on
    them, ``forgetting`` (distcl.solver.forgetting) and ``accuracy_task<j>`` (on task j's classes) for j <= k;
    earlier tasks' values come from metrics.parquet."""

    def acc(mask: torch.Tensor) -> float:
        return int((predicted[mask] == labels[mask]).sum()) / int(mask.sum())

    metrics = {"accuracy": acc(torch.ones_like(labels, dtype=torch.bool))}
    per_task = {j: acc(torch.isin(labels, torch.tensor(scenario.tasks[j]))) for j in range(k + 1)}
    history = {i: {j: task_metrics(out, i)[f"accuracy_task{j}"] for j in range(i + 1)} for i in range(k)}
    history[k] = per_task
    metrics["forgetting"] = forgetting(history, k)
    metrics.update({f"accuracy_task{j}": a for j, a in per_task.items()})
    return metrics
