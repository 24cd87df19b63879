"""The continual classifier ("solver", ALGORITHMS.md section 1, classifier side): a small CNN trained after the
generator's task k on task k's data plus replay images from the generator of task k-1, soft-labelled by the
classifier of task k-1. The standard distillation loss is used (the reference weights the teacher's
log-probabilities by the student's probabilities, the reverse):

    L = 1/(k+1) * CE(s(x), y) + (1 - 1/(k+1)) * KD(s(x'), z(x')),
    KD(s, z) = -sum_c softmax(z / T)_c log softmax(s / T)_c * T^2,   T = classifier.temperature (2)

Strategies: ``replay`` (the above), ``finetune`` (task k's data only) and ``joint`` (the data of tasks 0..k).
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from distcl.data import DataStream
from distcl.diffusion import ddim_sample
from distcl.seeding import seeded_generator
from distcl.training import optimise


class SolverCNN(nn.Module):
    """The reference's scale of classifier (about 118 k parameters); any input size (adaptive pooling)."""

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 96),
            nn.ReLU(),
            nn.Linear(96, num_classes),
        )

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SolverCNN:
        """The classifier of saved weights (its channels and classes read from their shapes)."""
        model = cls(state["net.0.weight"].shape[1], state["net.10.weight"].shape[0])
        model.load_state_dict(state)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_c softmax(z/T)_c log softmax(s/T)_c * T^2, averaged over the batch."""
    soft = F.softmax(teacher_logits / temperature, dim=1)
    return -(soft * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean() * temperature**2


def replay_images(unet, scheduler, n: int, steps: int, eta: float, seed: int, task: int, index: int) -> torch.Tensor:
    """Replay image batch ``index`` of task ``task``: DDIM samples of the generator of task-1 from x_T drawn with
    the generator (seed, "solver_replay", task, index): the same batch wherever it is made. CPU, [-1, 1]."""
    generator = seeded_generator(seed, "solver_replay", task, index)
    cfg = unet.config
    x_T = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
    with torch.no_grad():
        return ddim_sample(unet, scheduler, x_T.to(unet.device), steps, eta, generator).clamp(-1, 1).cpu()


class ImageReplay(Protocol):
    def get(self, step: int) -> torch.Tensor: ...


class InlineImageReplay:
    """Replay images made in this process (the inline backend); on Ray the sampler actors make them."""

    def __init__(self, unet, scheduler, batch_size: int, steps: int, eta: float, seed: int, task: int):
        self.args = (unet, scheduler, batch_size, steps, eta, seed, task)

    def get(self, step: int) -> torch.Tensor:
        return replay_images(*self.args, index=step)


def solver_steps(num_items: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(epochs * num_items / batch_size))


def train_solver_task(
    model: SolverCNN,
    previous: Optional[SolverCNN],
    images: torch.Tensor,
    labels: torch.Tensor,
    replay: Optional[ImageReplay],
    task: int,
    steps: int,
    solver_cfg,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place for ``steps`` Adam steps; with ``replay`` (and ``previous``, the frozen classifier
    of task-1) the loss is the weighted sum above, else cross-entropy. Returns one row per step."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=solver_cfg.lr)
    stream = DataStream(images, solver_cfg.batch_size, seed, ("solver", task))
    w = 1 - 1 / (task + 1)

    def step_terms(step: int) -> dict[str, torch.Tensor]:
        idx = stream.indices(step)
        loss_data = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        if replay is None or task == 0:
            return {"loss": loss_data, "loss_data": loss_data, "loss_replay": torch.zeros((), device=device)}
        x_replay = replay.get(step).to(device)
        with torch.no_grad():
            teacher_logits = previous(x_replay)
        loss_replay = distillation_loss(model(x_replay), teacher_logits, solver_cfg.temperature)
        return {"loss": (1 - w) * loss_data + w * loss_replay, "loss_data": loss_data, "loss_replay": loss_replay}

    return optimise(
        model, optimizer, step_terms, steps, row={"task": task}, progress=progress, desc=f"classifier task {task}"
    )


@torch.no_grad()
def forgetting(history: dict[int, dict[int, float]], k: int) -> float:
    """Average forgetting after task k: mean over tasks j < k of max_{i in j..k-1} a_{i,j} - a_{k,j}, where
    ``history[i][j]`` is the accuracy on task j's test classes after task i (0 at task 0)."""
    if k == 0:
        return 0.0
    drops = [max(history[i][j] for i in range(j, k)) - history[k][j] for j in range(k)]
    return sum(drops) / k
