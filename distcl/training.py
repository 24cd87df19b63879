"""One task's training loop over an iterator of data batches and an iterator of replay batches (no Ray)."""
from __future__ import annotations

import hashlib
import math
import time
from typing import Iterator, Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from distcl.diffusion import add_noise
from distcl.losses import continual_loss
from distcl.replay import ReplayBatch, Teacher, make_replay, replay_on_data


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names task and step."""


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, task, batch index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available (allowed here: auto, cpu)")
    return torch.device(name)


def steps_per_task(num_images: int, train_cfg) -> int:
    """ceil(epochs * N / B), capped by max_steps."""
    steps = math.ceil(train_cfg.epochs * num_images / train_cfg.batch_size)
    return min(steps, train_cfg.max_steps) if train_cfg.max_steps is not None else steps


def data_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs of ``batch_size`` images (the last short batch of each epoch dropped if N > B)."""
    n = images.shape[0]
    while True:
        order = torch.randperm(n, generator=generator)
        stop = n - n % batch_size if n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield images[order[start : start + batch_size]]


def inline_replay(teacher: Teacher, strategy: str, n: int, seed: int, task: int) -> Iterator[ReplayBatch]:
    """Replay batch i of task k from generator (seed, "replay", k, i): what the sampler actors compute."""
    i = 0
    while True:
        yield make_replay(teacher, strategy, n, seeded_generator(seed, "replay", task, i))
        i += 1


def train_step(
    student: UNet2DModel,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    replay: Optional[ReplayBatch],
    *,
    task: int,
    train_cfg,
    scheduler: DDIMScheduler,
    generator: torch.Generator,
    lwf_teacher: Optional[Teacher] = None,
) -> dict[str, float]:
    """t ~ U{0..T-1}, x_t = noise(x0, eps, t); one student forward on cat[x_t, inp'] and the continual loss;
    Adam step after clipping the gradient norm. LwF (``lwf_teacher``) distils on the data items themselves."""
    device = x0.device
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(device)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    x_t = add_noise(x0, eps, t, scheduler.alphas_cumprod)
    if lwf_teacher is not None:
        replay = replay_on_data(lwf_teacher, x_t, t)
        pred = student(x_t, t).sample
        pred_data, pred_replay = pred, pred
    elif replay is not None:
        pred = student(torch.cat([x_t, replay.inputs]), torch.cat([t, replay.timesteps])).sample
        pred_data, pred_replay = pred[:B], pred[B:]
    else:
        pred_data, pred_replay = student(x_t, t).sample, None
    loss, terms = continual_loss(
        pred_data,
        eps,
        pred_replay,
        replay.targets if replay is not None else None,
        task,
        train_cfg.replay_lambda,
        train_cfg.task_weighting,
    )
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(terms["loss"]):
        return terms
    loss.backward()
    terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.parameters(), train_cfg.grad_clip))
    optimizer.step()
    return terms


def train_task(
    student: UNet2DModel,
    data: Iterator[torch.Tensor],
    replay: Optional[Iterator[ReplayBatch]],
    *,
    task: int,
    steps: int,
    train_cfg,
    scheduler: DDIMScheduler,
    generator: torch.Generator,
    lwf_teacher: Optional[Teacher] = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``student`` in place for ``steps`` steps of task ``task`` (fresh Adam, as the reference).

    Returns a log row every ``log_every`` steps and at the last step: task, step, loss terms, step_s,
    replay_wait_s (time spent waiting for the replay iterator). Raises NonFiniteLossError on a NaN/inf loss.
    With EMA on, the EMA weights are copied into ``student`` at the end."""
    device = student.device
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=train_cfg.lr)
    ema = EMAModel(student.parameters(), decay=train_cfg.ema_decay) if train_cfg.ema_decay else None
    rows = []
    bar = tqdm(range(steps), desc=f"task {task}", disable=not progress, leave=False)
    for step in bar:
        start = time.perf_counter()
        x0 = next(data).to(device)
        replay_batch = next(replay).to(device) if replay is not None else None
        replay_wait = time.perf_counter() - start
        terms = train_step(
            student, optimizer, x0, replay_batch, task=task, train_cfg=train_cfg,
            scheduler=scheduler, generator=generator, lwf_teacher=lwf_teacher,
        )  # fmt: skip
        if not math.isfinite(terms["loss"]):
            raise NonFiniteLossError(f"non-finite loss {terms['loss']} at task {task} step {step}")
        if ema is not None:
            ema.step(student.parameters())
        if step % train_cfg.log_every == 0 or step == steps - 1:
            step_s = time.perf_counter() - start
            rows.append({"task": task, "step": step, **terms, "step_s": step_s, "replay_wait_s": replay_wait})
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
    if ema is not None:
        ema.copy_to(student.parameters())
    student.eval()
    return rows
