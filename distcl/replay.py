"""Replay items for continual training: inputs x_t', timesteps t' and targets, for every strategy.

| strategy           | replay input inp'                                   | target'              |
|--------------------|-----------------------------------------------------|----------------------|
| finetune, joint    | none                                                | -                    |
| gr                 | noise(DDIM_teacher(x_T; n, eta), eps', t')          | eps' (the true noise)|
| gd                 | same as gr                                          | eps_teacher(inp', t')|
| partial_generation | teacher DDIM from T to t' (t' on its n-grid, or any: train.partial_t) | eps_teacher(inp', t')|
| gaussian           | N(0, I)                                             | eps_teacher(inp', t')|
| lwf                | the current data's x_t (no extra items)             | eps_teacher(x_t, t)  |

With a fast replay sampler (``replay_sampler.method`` progressive / pid), a student distilled from the teacher
draws gr's and gd's x0_hat in place of DDIM_teacher; the targets stay the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel

from distcl.devices import autocast, to_device
from distcl.diffusion import add_noise, ddim_sample, ddim_to, sampling_timesteps
from distcl.seeding import seeded_generator

REPLAY_ITEM_STRATEGIES = ("gr", "gd", "partial_generation", "gaussian")  # add B teacher-made items per step


@dataclass
class Teacher:
    """The frozen model after the previous task, with the DDIM settings of its replay generation."""

    unet: UNet2DModel
    scheduler: DDIMScheduler
    steps: int
    eta: float = 0.0
    sampler: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # a fast student's x_T -> x0_hat (distcl.distill)
    precision: str = "fp32"  # bf16: its forwards under bfloat16 autocast (results in fp32)
    partial_t: str = "grid"  # partial generation's t': on the steps-grid, or "uniform" over 0..T-1 (the reference)

    def sample(self, x_T: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x0_hat from x_T: the fast ``sampler`` when there is one, else the teacher's ``steps``-step DDIM."""
        with autocast(x_T.device, self.precision):
            if self.sampler is not None:
                return self.sampler(x_T).float()
            return ddim_sample(self.unet, self.scheduler, x_T, self.steps, self.eta, generator).float()

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(x_t.device, self.precision):
            return self.unet(x_t, t).sample.float()


@dataclass
class ReplayBatch:
    inputs: torch.Tensor  # x_t' [B, C, H, W]
    timesteps: torch.Tensor  # t' [B], int64
    targets: torch.Tensor  # [B, C, H, W]

    def to(self, device) -> "ReplayBatch":
        device = torch.device(device)
        return ReplayBatch(
            to_device(self.inputs, device), to_device(self.timesteps, device), to_device(self.targets, device)
        )

    def __len__(self) -> int:
        return self.inputs.shape[0]


@torch.no_grad()
def make_replay(teacher: Teacher, strategy: str, n: int, generator: torch.Generator) -> ReplayBatch:
    """``n`` replay items of ``strategy``; every random draw comes from ``generator`` (a CPU generator), in the
    order x_T, t', eps' (gr, gd), x_T, stop index (partial_generation), inp', t' (gaussian)."""
    if strategy not in REPLAY_ITEM_STRATEGIES:
        raise ValueError(f"strategy {strategy!r} makes no replay items (allowed: {', '.join(REPLAY_ITEM_STRATEGIES)})")
    cfg = teacher.unet.config
    device = teacher.unet.device
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    T = teacher.scheduler.config.num_train_timesteps

    def randn():
        return torch.randn(shape, generator=generator).to(device)

    if strategy in ("gr", "gd"):
        x0_hat = teacher.sample(randn(), generator)
        t = torch.randint(0, T, (n,), generator=generator).to(device)
        eps = randn()
        inputs = add_noise(x0_hat, eps, t, teacher.scheduler.alphas_cumprod)
        targets = eps if strategy == "gr" else teacher.eps(inputs, t)
    elif strategy == "partial_generation":
        x_T = randn()
        if teacher.partial_t == "uniform":
            t = torch.randint(0, T, (n,), generator=generator).to(device)
            inputs = ddim_to(teacher.unet, teacher.scheduler, x_T, teacher.steps, t, teacher.eta, generator)
        else:
            grid = sampling_timesteps(teacher.scheduler, teacher.steps)
            t = grid[torch.randint(0, len(grid), (n,), generator=generator)].to(device)
            inputs = ddim_sample(teacher.unet, teacher.scheduler, x_T, teacher.steps, teacher.eta, generator, stop_at=t)
        targets = teacher.eps(inputs, t)
    else:  # gaussian
        inputs = randn()
        t = torch.randint(0, T, (n,), generator=generator).to(device)
        targets = teacher.eps(inputs, t)
    return ReplayBatch(inputs, t.long(), targets)


@torch.no_grad()
def replay_on_data(teacher: Teacher, x_t: torch.Tensor, t: torch.Tensor) -> ReplayBatch:
    """LwF-style targets on the current data's own noisy inputs: eps_teacher(x_t, t)."""
    return ReplayBatch(x_t, t, teacher.eps(x_t, t))


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
