"""One task's training loop over a data stream and a replay source, with the seeding that makes every batch a pure
function of (seed, task, worker, step) (no Ray)."""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from distcl.devices import autocast, to_device
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


def steps_per_task(num_images: int, train_cfg) -> int:
    """ceil(epochs * N / B), capped by max_steps."""
    steps = math.ceil(train_cfg.epochs * num_images / train_cfg.batch_size)
    return min(steps, train_cfg.max_steps) if train_cfg.max_steps is not None else steps


class DataStream:
    """Worker ``rank`` of ``world`` reads the shard images[rank::world]; its batch at step s is a pure function of
    (seed, task, rank, world, s): epoch e = s // batches_per_epoch shuffles the shard with generator
    (seed, "data", task, rank, world, e). A resumed run therefore sees exactly the batches it would have seen."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, task: int, rank: int = 0, world: int = 1):
        self.images = images[rank::world]
        n = self.images.shape[0]
        self.batch_size = min(batch_size, n)
        self.per_epoch = n // self.batch_size  # the short last batch of an epoch is dropped
        self.seed_parts = (seed, "data", task, rank, world)
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """Positions in the shard of the batch at ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.images.shape[0], generator=seeded_generator(*self.seed_parts, epoch))
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        return self.images[self.indices(step)]


def noise_seed(seed: int, task: int, rank: int = 0) -> tuple:
    """Seed parts of worker ``rank``'s per-step (t, eps) draws in task ``task`` (the step is appended)."""
    return (seed, "noise", task, rank)


def replay_index(step: int, rank: int = 0, world: int = 1) -> int:
    """Worker r consumes replay batches r, r + W, r + 2W, ...: batch index = step * W + r."""
    return step * world + rank


class InlineReplay:
    """Replay batch i of task k made on the trainer from generator (seed, "replay", k, i): what the sampler
    actors compute (the reference's way of making replay)."""

    def __init__(self, teacher: Teacher, strategy: str, batch_size: int, seed: int, task: int, rank=0, world=1):
        self.teacher, self.strategy, self.batch_size = teacher, strategy, batch_size
        self.seed, self.task, self.rank, self.world = seed, task, rank, world

    def get(self, step: int) -> ReplayBatch:
        index = replay_index(step, self.rank, self.world)
        return indexed_replay(self.teacher, self.strategy, self.batch_size, self.seed, self.task, index)


def indexed_replay(teacher: Teacher, strategy: str, batch_size: int, seed: int, task: int, index: int) -> ReplayBatch:
    """Replay batch ``index`` of task ``task``: make_replay with generator (seed, "replay", task, index)."""
    return make_replay(teacher, strategy, batch_size, seeded_generator(seed, "replay", task, index))


def make_optimizer(student: torch.nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, Optional[EMAModel]]:
    """A fresh Adam per task (as the reference) and, when ``ema_decay`` is set, an EMA of the weights."""
    optimizer = torch.optim.Adam(student.parameters(), lr=train_cfg.lr)
    ema = EMAModel(student.parameters(), decay=train_cfg.ema_decay) if train_cfg.ema_decay else None
    return optimizer, ema


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
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """t ~ U{0..T-1}, x_t = noise(x0, eps, t); one student forward on cat[x_t, inp'] and the continual loss;
    Adam step after clipping the gradient norm. LwF (``lwf_teacher``) distils on the data items themselves.
    ``precision`` bf16 (``runtime.precision``) runs the forward under bfloat16 autocast; the loss is taken in fp32.
    Returns the loss terms and the gradient norm as device tensors: no host sync."""
    device = x0.device
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(device)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    x_t = add_noise(x0, eps, t, scheduler.alphas_cumprod)
    if lwf_teacher is not None:
        replay = replay_on_data(lwf_teacher, x_t, t)
    with autocast(device, precision):
        if replay is not None and lwf_teacher is None:
            pred = student(torch.cat([x_t, replay.inputs]), torch.cat([t, replay.timesteps])).sample.float()
            pred_data, pred_replay = pred[:B], pred[B:]
        else:
            pred = student(x_t, t).sample.float()
            pred_data, pred_replay = pred, (pred if lwf_teacher is not None else None)
    loss, tensors = continual_loss(
        pred_data,
        eps,
        pred_replay,
        replay.targets if replay is not None else None,
        task,
        train_cfg.replay_lambda,
        train_cfg.task_weighting,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tensors["grad_norm"] = torch.nn.utils.clip_grad_norm_(student.parameters(), train_cfg.grad_clip).detach()
    optimizer.step()
    return tensors


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
    on_step: Optional[Callable[[int, list[dict]], None]] = None,
    progress: bool = True,
    precision: str = "fp32",
) -> list[dict]:
    """Train ``student`` in place over steps ``start_step .. steps-1`` of task ``task``.

    ``replay.get(step)`` gives the step's ReplayBatch (None: no replay items); the step's t and eps come from
    generator (*noise_seed, step). Returns a log row every ``log_every`` steps and at the last step: task, step,
    loss terms, step_s, replay_wait_s (time spent waiting for replay). ``on_step(step, rows)`` runs after each
    step (checkpointing). The host reads the device only at logged steps: there a NaN/inf loss since the last
    one raises NonFiniteLossError naming its first step (the diverged task is never saved; a mid-task checkpoint
    may hold its weights, and a resume from it fails the same way). With EMA, its weights end in ``student``."""
    student.train()
    rows = []
    first_bad = torch.tensor(-1, device=device)  # the first step with a non-finite loss, -1: none
    bar = tqdm(range(start_step, steps), desc=f"task {task}", disable=not progress, leave=False)
    for step in bar:
        start = time.perf_counter()
        x0 = to_device(data.batch(step), device)
        replay_batch = replay.get(step).to(device) if replay is not None else None
        replay_wait = time.perf_counter() - start
        terms = train_step(
            student, optimizer, x0, replay_batch, task=task, train_cfg=train_cfg,
            scheduler=scheduler, generator=seeded_generator(*noise_seed, step), lwf_teacher=lwf_teacher,
            precision=precision,
        )  # fmt: skip
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms["loss"]), step, first_bad)
        if ema is not None:
            ema.step(student.parameters())
        if step % train_cfg.log_every == 0 or step == steps - 1:
            if (bad := int(first_bad)) >= 0:
                raise NonFiniteLossError(f"non-finite loss at task {task} step {bad}")
            logged = {name: float(value) for name, value in terms.items()}
            step_s = time.perf_counter() - start
            rows.append({"task": task, "step": step, **logged, "step_s": step_s, "replay_wait_s": replay_wait})
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if on_step is not None:
            on_step(step, rows)
    if ema is not None:
        ema.copy_to(student.parameters())
    student.eval()
    return rows


@dataclass
class DistillUnit:
    """One optimisation: ``iterations`` Adam steps at ``lr`` of ``model`` on ``loss(model, step, shard)``;
    ``save(rows)`` writes the trained ``model`` to its output."""

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module, int, slice], torch.Tensor]
    iterations: int
    lr: float
    save: Callable[[list[dict]], None]


def optimise(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_at: Callable[[int], torch.Tensor],
             steps: int, start: int = 0, grad_clip: float = 1.0,
             on_step: Optional[Callable[[int, list[dict]], None]] = None, progress: bool = True, desc: str = "",
             loss_value: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach, read_every: int = 1,
             ) -> list[dict]:  # fmt: skip
    """Steps ``start .. steps-1`` of a plain loop: loss = ``loss_at(step)``, backward, clip the gradient norm at
    ``grad_clip``, optimizer step. Returns rows {iteration, loss: ``loss_value(loss)``} (data-parallel workers:
    the mean over workers). The host reads the losses every ``read_every`` steps and at the last (one sync for
    them all); ``on_step(step, rows)`` runs after each step with the rows read so far (complete at those steps:
    checkpoint there). Raises NonFiniteLossError naming the first step with a NaN/inf loss."""
    model.train()
    rows: list[dict] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = loss_at(step)
        pending.append(loss_value(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if (step + 1 - start) % read_every == 0 or step == steps - 1:
            first = step + 1 - len(pending)
            for i, value in enumerate(torch.stack(pending).tolist()):
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"non-finite loss {value} at {desc or 'optimisation'} step {first + i}")
                rows.append({"iteration": first + i, "loss": value})
            pending = []
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
        if on_step is not None:
            on_step(step, rows)
    model.eval()
    return rows
