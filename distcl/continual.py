"""The continual run: for task k, train the student (teacher = frozen student after k-1), save, evaluate; resume.

Outputs under OUT: config.yaml, task_<k>/ (diffusers DDIMPipeline: UNet + scheduler, safetensors),
samples/task_<k>.png, metrics.parquet (long form), train_log.parquet, evaluator.json.
A task whose task_<k>/ exists is never retrained; one without metrics is (re-)evaluated.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from distcl.config import FAST_SAMPLER_STRATEGIES, PIDConfig, ProgressiveConfig, RunConfig
from distcl.settings import ConfigError, from_dict
from distcl.data import Scenario, build_scenario, cache_dir, load_fashion_mnist, locate
from distcl.devices import configure_numerics, resolve_device
from distcl.distill import Fit, distill, fast_sampler, fit_inline
from distcl.evaluation import (
    ChunkResult,
    EvalJob,
    Evaluator,
    EvalWorker,
    metrics_from_chunks,
    save_grid,
    solver_predictions,
)
from distcl.models import build_scheduler, build_unet, load_unet, require_checkpoint, save_checkpoint
from distcl.progressive import stage_dir
from distcl.replay import REPLAY_ITEM_STRATEGIES, Teacher
from distcl.solver import (
    ImageReplay,
    InlineImageReplay,
    SolverCNN,
    forgetting,
    solver_steps,
    train_solver_task,
)
from distcl.training import (
    DataStream,
    InlineReplay,
    derive_seed,
    make_optimizer,
    noise_seed,
    steps_per_task,
    train_task,
)

TEACHER_STRATEGIES = REPLAY_ITEM_STRATEGIES + ("lwf",)


def task_dir(out: Path, k: int) -> Path:
    return out / f"task_{k}"


def replay_sampler_dir(teacher_dir: Path) -> Path:
    """Where the fast replay sampler distilled from the teacher OUT/task_<k> lives: OUT/replay_sampler/task_<k>."""
    return Path(teacher_dir).parent / "replay_sampler" / Path(teacher_dir).name


def uses_fast_sampler(cfg: RunConfig) -> bool:
    return cfg.replay_sampler.method != "ddim" and cfg.train.strategy in FAST_SAMPLER_STRATEGIES


def distill_replay_sampler(cfg: RunConfig, teacher_dir: Path, fit: Fit, progress: bool = True,
                           log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Distil (or find, on resume) the fast replay sampler of the teacher at ``teacher_dir``; its draws are seeded
    by (run seed, teacher)."""
    rs = cfg.replay_sampler
    seed = derive_seed(cfg.seed, "replay_sampler", Path(teacher_dir).name)
    if rs.method == "pid":
        settings = PIDConfig(iterations=rs.iterations, batch_size=rs.batch_size, lr=rs.lr, seed=seed)
    else:  # v students, data-free
        settings = ProgressiveConfig(start_steps=rs.start_steps, target_steps=rs.steps, parameterisation="v",
                                     iterations=rs.iterations, batch_size=rs.batch_size, lr=rs.lr, seed=seed)
    return distill(rs.method, teacher_dir, replay_sampler_dir(teacher_dir), settings, fit,
                   progress=progress, log=log)[-1]  # fmt: skip


def load_teacher(cfg: RunConfig, teacher_dir: Path, device: torch.device | str) -> Teacher:
    """The frozen teacher saved at ``teacher_dir`` with its replay settings, and its fast sampler when
    ``replay_sampler.method`` asks for one (distilled beforehand by ``distill_replay_sampler``)."""
    unet = load_unet(teacher_dir, cfg.model, device).eval().requires_grad_(False)
    sampler = None
    if uses_fast_sampler(cfg):
        rs = cfg.replay_sampler
        sampler = fast_sampler(rs.method, replay_sampler_dir(teacher_dir), device, rs.steps)
    return Teacher(unet, build_scheduler(cfg.model), cfg.train.teacher_steps, cfg.train.teacher_eta, sampler,
                   cfg.runtime.precision)  # fmt: skip


@dataclass(frozen=True)
class TeacherFiles:
    """The checkpoint files of a teacher (OUT/task_<k>) and of the fast replay sampler it uses, by path relative to
    OUT: plain bytes, so that sampler actors on any node get the teacher through the object store."""

    name: str  # task_<k>
    files: dict[str, bytes]

    @classmethod
    def read(cls, cfg: RunConfig, teacher_dir: Path) -> TeacherFiles:
        teacher_dir = Path(teacher_dir)
        require_checkpoint(teacher_dir)  # a clear error here, in the driver (the run loaded it as its student)
        dirs = [teacher_dir]
        if uses_fast_sampler(cfg):
            rs = cfg.replay_sampler
            sampler_dir = replay_sampler_dir(teacher_dir)
            dirs.append(stage_dir(sampler_dir, rs.steps) if rs.method == "progressive" else sampler_dir)
        root = teacher_dir.parent
        files = {str(p.relative_to(root)): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}
        return cls(teacher_dir.name, files)

    def load(self, cfg: RunConfig, device: torch.device | str) -> Teacher:
        """:func:`load_teacher` on a private copy of the files."""
        with tempfile.TemporaryDirectory(prefix="distcl-teacher-") as root:
            for name, data in self.files.items():
                path = Path(root) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return load_teacher(cfg, Path(root) / self.name, device)


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
        raise ConfigError("--out", f"{out} is in use by another distcl run ({holder}); wait for it to end, "
                                   "or use another --out") from None  # fmt: skip
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _HELD_LOCKS[out] = lock
    try:
        yield
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [".lock"]:
            (out / ".lock").unlink()
            out.rmdir()
        raise
    finally:
        del _HELD_LOCKS[out]
        lock.close()


def prepare_out(cfg: RunConfig, out: Path) -> None:
    """Create OUT and write config.yaml; refuse an OUT that holds a run of another config. The runtime layout
    may change between resumes, except the number of Train workers (it shards data and replay)."""
    resolved = cfg.to_dict()
    config_path = out / "config.yaml"
    if config_path.exists():  # read through RunConfig: fields added since the run was made take their defaults
        previous = _results_config(from_dict(RunConfig, yaml.safe_load(config_path.read_text())).to_dict())
        if previous != _results_config(resolved):
            changed = sorted(_diff(previous, _results_config(resolved)))
            raise ConfigError("--out", f"{out} holds a run with another config (differs in {', '.join(changed)}); "
                                       "use another --out or the same config to resume")  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def _results_config(resolved: dict) -> dict:
    """The fields results depend on: all but ``runtime``, plus the number of Train workers (1 inline) and the
    precision."""
    runtime = resolved.get("runtime", {})
    workers = runtime.get("num_workers", 1) if runtime.get("backend", "ray") == "ray" else 1
    return {**{k: v for k, v in resolved.items() if k != "runtime"}, "runtime.num_workers": workers,
            "runtime.precision": runtime.get("precision", "fp32")}  # fmt: skip


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


@dataclass
class TaskSpec:
    """What a task trainer needs for task k: the student to train in place (it starts as the model after
    task k-1, saved at ``init_dir``: the teacher of the strategies that have one) and the task's training
    images."""

    cfg: RunConfig
    task: int
    student: UNet2DModel
    init_dir: Optional[Path]
    images: torch.Tensor
    scheduler: DDIMScheduler
    progress: bool = True

    @property
    def has_teacher(self) -> bool:
        return self.init_dir is not None and self.cfg.train.strategy in TEACHER_STRATEGIES


def train_task_inline(spec: TaskSpec) -> list[dict]:
    """Task k in this process: replay made by the teacher on the trainer's own device (the reference's way)."""
    cfg, k = spec.cfg, spec.task
    strategy = cfg.train.strategy
    teacher, replay = None, None
    if spec.has_teacher:
        teacher = load_teacher(cfg, spec.init_dir, spec.student.device)
    if teacher is not None and strategy in REPLAY_ITEM_STRATEGIES:
        replay = InlineReplay(teacher, strategy, cfg.train.batch_size, cfg.seed, k)
    optimizer, ema = make_optimizer(spec.student, cfg.train)
    return train_task(
        spec.student,
        optimizer,
        DataStream(spec.images, cfg.train.batch_size, cfg.seed, k),
        replay,
        task=k,
        steps=steps_per_task(len(spec.images), cfg.train),
        train_cfg=cfg.train,
        scheduler=spec.scheduler,
        noise_seed=noise_seed(cfg.seed, k),
        device=spec.student.device,
        ema=ema,
        lwf_teacher=teacher if strategy == "lwf" else None,
        progress=spec.progress,
        precision=cfg.runtime.precision,
    )


def inline_image_replay(cfg: RunConfig, k: int, teacher_dir: Path, steps: int) -> InlineImageReplay:
    """The classifier's replay images made in this process by the generator saved at ``teacher_dir``."""
    unet = load_unet(teacher_dir, cfg.model, resolve_device(cfg.device)).eval().requires_grad_(False)
    c = cfg.classifier
    return InlineImageReplay(unet, build_scheduler(cfg.model), c.batch_size, c.replay_steps, c.replay_eta, cfg.seed, k)


@dataclass
class ClassifierSpec:
    """What the continual classifier's task k needs: its starting weights (the classifier after task k-1, or the
    seeded initialisation), the task's images and labels, its steps, and the generator whose samples it replays
    (``replay_from``: OUT/task_<k-1>; None without replay)."""

    cfg: RunConfig
    task: int
    init: dict[str, torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    steps: int
    replay_from: Optional[Path]
    progress: bool = True


def train_classifier(spec: ClassifierSpec, replay: Optional[ImageReplay], device: torch.device | str
                     ) -> tuple[dict[str, torch.Tensor], list[dict]]:  # fmt: skip
    """Classifier task k on ``device`` (distcl.solver.train_solver_task); with ``replay``, the frozen starting
    weights label the replay images. Returns the trained weights (CPU) and the log rows."""
    model = SolverCNN()
    model.load_state_dict(spec.init)
    previous = copy.deepcopy(model).to(device).eval().requires_grad_(False) if replay is not None else None
    rows = train_solver_task(model, previous, spec.images, spec.labels, replay, spec.task, spec.steps,
                             spec.cfg.classifier, spec.cfg.seed, device, spec.progress)  # fmt: skip
    return {name: value.cpu() for name, value in model.state_dict().items()}, rows


class Backend(Protocol):
    """Where a run's heavy work happens: this process (:class:`InlineBackend`) or a Ray cluster
    (distcl.runtime.pipeline.RayBackend). The driver (:func:`run_continual`) only orchestrates."""

    distill_fit: Fit  # distils fast replay samplers

    def train_task(self, spec: TaskSpec) -> list[dict]:
        """Train ``spec.student`` in place on task k; the training log's rows."""

    def train_classifier(self, spec: ClassifierSpec) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The continual classifier's task k (:func:`train_classifier`): its weights and log rows."""

    def evaluate(self, job: EvalJob, progress: bool) -> list[ChunkResult]:
        """Every chunk of ``job`` (any order)."""

    def devices(self) -> str:
        """Which device each role uses, in words (printed once per run)."""

    def close(self) -> None: ...


class InlineBackend:
    """Every piece of the run in this process, on ``device`` (the reference's way)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.distill_fit = partial(fit_inline, device=device)
        self.eval_worker = EvalWorker(device)

    def devices(self) -> str:
        return f"{self.device} for everything (inline: training, replay and evaluation in this process)"

    def train_task(self, spec: TaskSpec) -> list[dict]:
        return train_task_inline(spec)

    def train_classifier(self, spec: ClassifierSpec) -> tuple[dict[str, torch.Tensor], list[dict]]:
        replay = None
        if spec.replay_from is not None:
            replay = inline_image_replay(spec.cfg, spec.task, spec.replay_from, spec.steps)
        return train_classifier(spec, replay, self.device)

    def evaluate(self, job: EvalJob, progress: bool) -> list[ChunkResult]:
        chunks = tqdm(job.chunks(), desc=f"evaluating task {job.task}", disable=not progress, leave=False)
        return [self.eval_worker.run(job, chunk) for chunk in chunks]

    def close(self) -> None:
        pass


def classifier_path(out: Path, k: int) -> Path:
    return out / "classifier" / f"task_{k}.pt"


def train_classifier_task(cfg: RunConfig, scenario: Scenario, k: int, out: Path, backend: Backend,
                          progress: bool) -> list[dict]:  # fmt: skip
    """Classifier task k (distcl.solver) on ``backend``: it starts from the classifier of task k-1; saved to
    classifier/task_<k>.pt."""
    c = cfg.classifier
    strategy = c.resolved_strategy(cfg.train.strategy)
    torch.manual_seed(derive_seed(cfg.seed, "classifier_init"))
    init = SolverCNN().state_dict() if k == 0 else torch.load(classifier_path(out, k - 1), map_location="cpu")
    images, labels = scenario.train_images(k, strategy == "joint"), scenario.train_labels(k, strategy == "joint")
    spec = ClassifierSpec(cfg, k, init, images, labels, solver_steps(len(labels), c.epochs, c.batch_size),
                          task_dir(out, k - 1) if strategy == "replay" and k > 0 else None, progress)  # fmt: skip
    weights, rows = backend.train_classifier(spec)
    path = classifier_path(out, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return rows


def classifier_metrics(scenario: Scenario, k: int, out: Path, labels: torch.Tensor, predicted: torch.Tensor
                       ) -> dict[str, float]:  # fmt: skip
    """From the continual classifier's ``predicted`` labels of the test images of every class seen so far (true
    ``labels``: ``scenario.test_split(k)``'s, in order; the evaluation workers predict them): ``accuracy`` on
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


def run_continual(cfg: RunConfig, out: Path, backend: Optional[Backend] = None, progress: bool = True,
                  log: Callable[[str], None] = print,
                  on_task: Optional[Callable[[int, dict[str, float]], None]] = None) -> Path:  # fmt: skip
    """Run (or resume) all tasks of ``cfg`` into ``out`` on ``backend`` (default: this process); returns the
    metrics table's path. ``on_task(k, metrics)`` is called after task k is evaluated, in task order, also for
    tasks a resumed run finds done. With ``classifier.enabled`` the classifier's task k follows the
    generator's."""
    out = Path(out).resolve()  # it travels to Ray workers, whose working directory is not the caller's
    with out_lock(out):
        return _run_tasks(cfg, out, backend, progress, log, on_task)


def _run_tasks(cfg: RunConfig, out: Path, backend: Optional[Backend], progress: bool, log: Callable[[str], None],
               on_task: Optional[Callable[[int, dict[str, float]], None]]) -> Path:  # fmt: skip
    device = resolve_device(cfg.device)
    configure_numerics(cfg.runtime.precision, cfg.runtime.deterministic)
    backend = backend or InlineBackend(device)
    cache = cache_dir(cfg.cache_dir)
    scheduler = build_scheduler(cfg.model)
    fresh = build_unet(cfg.model)  # validates the architecture before anything is written
    splits = load_fashion_mnist(locate(cfg.data.data_dir, cfg.cache_dir))
    scenario: Scenario = build_scenario(splits, cfg.data, cfg.seed, fresh.config.sample_size)
    prepare_out(cfg, out)
    evaluator = Evaluator(cfg.eval, splits["train"], splits["test"], cache, device, progress)
    (out / "evaluator.json").write_text(json.dumps(evaluator.describe(), indent=2))
    log(f"[distcl] {cfg.name}: tasks {scenario.tasks}, strategy {cfg.train.strategy}, "
        f"evaluation classifier test accuracy {evaluator.classifier_accuracy:.4f}")  # fmt: skip
    log(f"[distcl] devices: {backend.devices()}, precision {cfg.runtime.precision}")
    done_eval = evaluated_tasks(out)
    for k in range(cfg.data.num_tasks):
        directory = task_dir(out, k)
        if not directory.exists():
            start = time.perf_counter()
            if k == 0:
                torch.manual_seed(cfg.seed)
                student = build_unet(cfg.model).to(device)
            else:
                student = load_unet(task_dir(out, k - 1), cfg.model, device)
            init_dir = task_dir(out, k - 1) if k > 0 else None
            spec = TaskSpec(cfg, k, student, init_dir, scenario.train_images(k, cfg.train.strategy == "joint"),
                            scheduler, progress)  # fmt: skip
            if spec.has_teacher and uses_fast_sampler(cfg):
                distill_replay_sampler(cfg, init_dir, backend.distill_fit, progress, log)
            rows = backend.train_task(spec)
            append_rows(out / "train_log.parquet", rows, k)
            save_checkpoint(student, scheduler, directory)
            log(f"[distcl] task {k} {scenario.tasks[k]}: trained {rows[-1]['step'] + 1} steps in "
                f"{time.perf_counter() - start:.1f}s, last loss {rows[-1]['loss']:.4f}")  # fmt: skip
        if cfg.classifier.enabled and not classifier_path(out, k).exists():
            start = time.perf_counter()
            rows = train_classifier_task(cfg, scenario, k, out, backend, progress)
            append_rows(out / "classifier_log.parquet", rows, k)
            log(f"[distcl] classifier task {k}: trained {len(rows)} steps in {time.perf_counter() - start:.1f}s, "
                f"last loss {rows[-1]['loss']:.4f}")  # fmt: skip
        if k not in done_eval:
            start = time.perf_counter()
            test = scenario.test_split(k)
            state = load_unet(directory, cfg.model).state_dict()
            solver = torch.load(classifier_path(out, k), map_location="cpu") if cfg.classifier.enabled else None
            job = evaluator.job(k, cfg.seed, cfg.model, state, test, scenario.sample_size, solver)
            results = backend.evaluate(job, progress)
            metrics, grid = metrics_from_chunks(results, test.labels)
            save_grid(grid, out / "samples" / f"task_{k}.png")
            if cfg.classifier.enabled:
                metrics.update(classifier_metrics(scenario, k, out, test.labels, solver_predictions(results)))
            rows = [
                {"run": cfg.name, "seed": cfg.seed, "strategy": cfg.train.strategy, "task": k, "metric": m, "value": v}
                for m, v in metrics.items()
            ]
            append_rows(out / "metrics.parquet", rows, k)
            log(f"[distcl] task {k} evaluated in {time.perf_counter() - start:.1f}s: "
                + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))  # fmt: skip
        if on_task is not None:
            on_task(k, task_metrics(out, k))
    return out / "metrics.parquet"


def task_metrics(out: Path, k: int) -> dict[str, float]:
    """The metrics of task k from OUT/metrics.parquet, as {metric: value}."""
    table = pq.read_table(out / "metrics.parquet", filters=[("task", "=", k)], columns=["metric", "value"])
    return dict(zip(table["metric"].to_pylist(), table["value"].to_pylist()))
