"""The training-loop skeleton (:func:`optimise`: step, clip, log, checkpoint hook, progress) and the diffusion
student's continual task on it (no Ray). Every loop of distcl runs on the skeleton: the student's tasks, the
distillation units, the continual classifier and the evaluation classifier; each keeps only its step's loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from distcl.data import DataStream
from distcl.devices import autocast, to_device
from distcl.diffusion import add_noise
from distcl.losses import continual_loss
from distcl.replay import ReplayBatch, Teacher, replay_on_data
from distcl.seeding import seeded_generator

Terms = dict[str, "torch.Tensor | float"]  # a step's logged values; "loss" is the one optimised
OnStep = Callable[[int, list[dict]], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the loop and the step."""


def optimise(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step_terms: Callable[[int], Terms],
    steps: int,
    *,
    start: int = 0,
    grad_clip: Optional[float] = None,
    after_step: Optional[Callable[[], None]] = None,
    log_every: int = 1,
    read_every: Optional[int] = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach,
    row: Optional[dict] = None,
    on_step: Optional[OnStep] = None,
    progress: bool = True,
    desc: str = "optimisation",
) -> list[dict]:
    """Steps ``start .. steps-1``: terms = ``step_terms(step)``; backward of terms["loss"]; the gradient norm clipped
    at ``grad_clip`` (logged as grad_norm); optimizer step; ``after_step()`` (EMA, a learning-rate schedule).

    Steps that are multiples of ``log_every``, and the last, give a row {**row, step, **terms, step_s}, each tensor
    term mapped by ``reduce`` (data-parallel workers: the mean over workers). The host reads them at every logged
    step (or at the steps s with s + 1 a multiple of ``read_every``: a resumed loop reads where the first did)
    and at the last, in one sync, and raises NonFiniteLossError naming the
    first step whose loss was NaN/inf since the last read (every step's loss is checked, on the device).
    ``on_step(step, rows)`` runs after each step with the rows read so far (complete at the read steps:
    checkpoint there)."""
    model.train()
    rows: list[dict] = []
    pending: list[tuple[int, Terms, float]] = []  # logged steps not yet read: (step, terms, seconds)
    first_bad = None  # device tensor: the first step with a non-finite loss since the last read, -1: none
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        began = time.perf_counter()
        terms = step_terms(step)
        loss = terms["loss"]
        bad = torch.where(~torch.isfinite(loss.detach()), step, -1)
        first_bad = bad if first_bad is None else torch.where(first_bad < 0, bad, first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        last = step == steps - 1
        logged_now = step % log_every == 0 or last
        if logged_now:
            logged = {k: reduce(v.detach()) if isinstance(v, torch.Tensor) else v for k, v in terms.items()}
            pending.append((step, logged, time.perf_counter() - began))
        if (logged_now if read_every is None else (step + 1) % read_every == 0) or last:
            rows += _read(pending, first_bad, row or {}, desc)
            if pending and pending[-1][0] == step:  # this step's time includes the read
                rows[-1]["step_s"] = time.perf_counter() - began
            pending, first_bad = [], None
            if rows:
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
        if on_step is not None:
            on_step(step, rows)
    model.eval()
    return rows


def _read(pending: list[tuple[int, Terms, float]], first_bad: torch.Tensor, row: dict, desc: str) -> list[dict]:
    """The pending rows' tensors and ``first_bad`` in one device-to-host copy."""
    tensors = [v.float().reshape(()) for _, terms, _ in pending for v in terms.values() if isinstance(v, torch.Tensor)]
    *values, bad = torch.stack([*tensors, first_bad.float()]).tolist()
    if bad >= 0:
        raise NonFiniteLossError(f"non-finite loss at {desc} step {int(bad)}")
    read, values = [], iter(values)
    for step, terms, seconds in pending:
        logged = {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in terms.items()}
        read.append({**row, "step": step, **logged, "step_s": seconds})
    return read


@dataclass
class DistillUnit:
    """One optimisation: ``iterations`` Adam steps at ``lr`` of ``model`` on ``loss(model, step, shard)``;
    ``save(rows)`` writes the trained ``model`` to its output."""

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module, int, slice], torch.Tensor]
    iterations: int
    lr: float
    save: Callable[[list[dict]], None]


def steps_per_task(num_images: int, train_cfg) -> int:
    """ceil(epochs * N / B), capped by max_steps."""
    steps = math.ceil(train_cfg.epochs * num_images / train_cfg.batch_size)
    return min(steps, train_cfg.max_steps) if train_cfg.max_steps is not None else steps


def make_optimizer(student: torch.nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, Optional[EMAModel]]:
    """A fresh Adam per task (as the reference) and, when ``ema_decay`` is set, an EMA of the weights."""
    optimizer = torch.optim.Adam(student.parameters(), lr=train_cfg.lr)
    ema = EMAModel(student.parameters(), decay=train_cfg.ema_decay) if train_cfg.ema_decay else None
    return optimizer, ema


def continual_terms(
    student: UNet2DModel,
    x0: torch.Tensor,
    replay: Optional[ReplayBatch],
    *,
    task: int,
    train_cfg,
    scheduler: DDIMScheduler,
    generator: torch.Generator,
    lwf_teacher: Optional[Teacher] = None,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """t ~ U{0..T-1}, x_t = noise(x0, eps, t); one student forward on cat[x_t, inp'] and the continual loss terms
    (distcl.losses). LwF (``lwf_teacher``) distils on the data items themselves. ``precision`` bf16 runs the
    forward under bfloat16 autocast; the loss is taken in fp32. Device tensors: no host sync."""
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = add_noise(x0, eps, t, scheduler.alphas_cumprod)
    if lwf_teacher is not None:
        replay = replay_on_data(lwf_teacher, x_t, t)
    with autocast(x0.device, precision):
        if replay is not None and lwf_teacher is None:
            pred = student(torch.cat([x_t, replay.inputs]), torch.cat([t, replay.timesteps])).sample.float()
            pred_data, pred_replay = pred[:B], pred[B:]
        else:
            pred = student(x_t, t).sample.float()
            pred_data, pred_replay = pred, (pred if lwf_teacher is not None else None)
    targets = replay.targets if replay is not None else None
    loss, tensors = continual_loss(
        pred_data, eps, pred_replay, targets, task, train_cfg.replay_lambda, train_cfg.task_weighting
    )
    return {**tensors, "loss": loss}


def train_task(
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataStream,
    replay=None,
    *,
    task: int,
    steps: int,
    train_cfg,
    scheduler: DDIMScheduler,
    noise_seed: tuple,
    device: torch.device,
    ema: Optional[EMAModel] = None,
    lwf_teacher: Optional[Teacher] = None,
    start_step: int = 0,
    on_step: Optional[OnStep] = None,
    progress: bool = True,
    precision: str = "fp32",
) -> list[dict]:
    """Train ``student`` in place over steps ``start_step .. steps-1`` of task ``task`` (on :func:`optimise`).

    ``replay.get(step)`` gives the step's ReplayBatch (None: no replay items); the step's t and eps come from
    generator (*noise_seed, step). A log row every ``log_every`` steps and at the last: task, step, loss terms,
    grad_norm, step_s, replay_wait_s (time spent waiting for replay). A NaN/inf loss raises NonFiniteLossError at
    the next logged step, naming its first step (the diverged task is never saved; a mid-task checkpoint may hold
    its weights, and a resume from it fails the same way). With EMA, its weights end in ``student``."""

    def step_terms(step: int) -> Terms:
        x0 = to_device(data.batch(step), device)
        began = time.perf_counter()
        replay_batch = replay.get(step).to(device) if replay is not None else None
        replay_wait = time.perf_counter() - began
        terms = continual_terms(
            student,
            x0,
            replay_batch,
            task=task,
            train_cfg=train_cfg,
            scheduler=scheduler,
            generator=seeded_generator(*noise_seed, step),
            lwf_teacher=lwf_teacher,
            precision=precision,
        )
        return {**terms, "replay_wait_s": replay_wait}

    rows = optimise(
        student,
        optimizer,
        step_terms,
        steps,
        start=start_step,
        grad_clip=train_cfg.grad_clip,
        after_step=(lambda: ema.step(student.parameters())) if ema is not None else None,
        log_every=train_cfg.log_every,
        row={"task": task},
        on_step=on_step,
        progress=progress,
        desc=f"task {task}",
    )
    if ema is not None:
        ema.copy_to(student.parameters())
    return rows
