"""Where a continual run's heavy work happens: the :class:`Backend` seam (train a task, train the continual
classifier, distil a replay sampler, evaluate), the specs that cross it, and :class:`InlineBackend`, every piece
in this process. The Ray implementation is distcl.runtime.pipeline.RayBackend; the core never imports it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from distcl.config import RunConfig
from distcl.console import StepLines
from distcl.data import DataStream, Files, Scenario
from distcl.devices import resolve_device
from distcl.distill import Fit, fit_inline
from distcl.evaluation import (
    ChunkResult,
    EvalJob,
    EvalWorker,
)
from distcl.models import build_scheduler, load_unet
from distcl.replay import REPLAY_ITEM_STRATEGIES, InlineReplay
from distcl.seeding import noise_seed
from distcl.solver import (
    ImageReplay,
    InlineImageReplay,
    SolverCNN,
    train_solver_task,
)
from distcl.teachers import load_teacher
from distcl.training import OnStep, make_optimizer, steps_per_task, train_task

TEACHER_STRATEGIES = REPLAY_ITEM_STRATEGIES + ("lwf",)


@dataclass
class TaskSpec:
    """What a task trainer needs for task k: the student to train in place (it starts as the model after
    task k-1, saved at ``init_dir``: the teacher of the strategies that have one) and the task's training
    images (a streamed folder's: their files, distcl.data.Files)."""

    cfg: RunConfig
    task: int
    student: UNet2DModel
    init_dir: Optional[Path]
    images: torch.Tensor | Files
    scheduler: DDIMScheduler
    progress: bool = True

    @property
    def steps(self) -> int:
        return steps_per_task(len(self.images.paths if isinstance(self.images, Files) else self.images), self.cfg.train)

    @property
    def has_teacher(self) -> bool:
        return self.init_dir is not None and self.cfg.train.strategy in TEACHER_STRATEGIES


def train_task_inline(spec: TaskSpec, on_step: Optional[OnStep] = None) -> list[dict]:
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
        steps=spec.steps,
        train_cfg=cfg.train,
        scheduler=spec.scheduler,
        noise_seed=noise_seed(cfg.seed, k),
        device=spec.student.device,
        ema=ema,
        lwf_teacher=teacher if strategy == "lwf" else None,
        on_step=on_step,
        progress=spec.progress,
        precision=cfg.runtime.precision,
    )


def inline_image_replay(cfg: RunConfig, k: int, teacher_dir: Path, steps: int) -> InlineImageReplay:
    """The classifier's replay images made in this process by the generator saved at ``teacher_dir``."""
    unet = load_unet(teacher_dir, cfg.model, resolve_device(cfg.device), cfg.data.image_channels)
    unet.eval().requires_grad_(False)
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


def train_classifier(
    spec: ClassifierSpec, replay: Optional[ImageReplay], device: torch.device | str
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Classifier task k on ``device`` (distcl.solver.train_solver_task); with ``replay``, the frozen starting
    weights label the replay images. Returns the trained weights (CPU) and the log rows."""
    model = SolverCNN.from_state(spec.init)
    previous = copy.deepcopy(model).to(device).eval().requires_grad_(False) if replay is not None else None
    rows = train_solver_task(
        model,
        previous,
        spec.images,
        spec.labels,
        replay,
        spec.task,
        spec.steps,
        spec.cfg.classifier,
        spec.cfg.seed,
        device,
        spec.progress,
    )
    return {name: value.cpu() for name, value in model.state_dict().items()}, rows


class Backend(Protocol):
    """Where a run's heavy work happens: this process (:class:`InlineBackend`) or a Ray cluster
    (distcl.runtime.pipeline.RayBackend). The driver (:func:`run_continual`) only orchestrates."""

    distill_fit: Fit  # distils fast replay samplers
    overlaps: bool  # the classifier and evaluation of task k may run (in a second driver thread) while k+1 trains

    def begin(self, scenario: Scenario, todo: list[int]) -> None:
        """The run's tasks are known (``todo``: the ones still to train); called once, before the first."""

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
    """Every piece of the run in this process, on ``device`` (the reference's way); without progress bars, a
    task's progress lines go to ``log`` (distcl.console.StepLines)."""

    overlaps = False  # one process: each step has every core

    def __init__(self, device: torch.device, log: Callable[[str], None] = print):
        self.device, self.log = device, log
        self.distill_fit = partial(fit_inline, device=device)
        self.eval_worker = EvalWorker(device)

    def devices(self) -> str:
        return f"{self.device} for everything (inline: training, replay and evaluation in this process)"

    def begin(self, scenario: Scenario, todo: list[int]) -> None:
        """Nothing to prepare: every task's images are in memory."""

    def train_task(self, spec: TaskSpec) -> list[dict]:
        return train_task_inline(spec, None if spec.progress else StepLines(f"task {spec.task}", spec.steps, self.log))

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
