"""Forward noising and DDIM sampling (full, or stopped per item at a timestep t' for partial generation)."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per item."""
    abar = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def sampling_timesteps(scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """The DDIM grid of ``steps`` timesteps, descending (trailing spacing: 2 steps -> 999, 499)."""
    own = DDIMScheduler.from_config(scheduler.config)
    own.set_timesteps(steps)
    return own.timesteps.clone()


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    stop_at: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM from x_T over ``steps`` trailing timesteps.

    Each step: x0_hat = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t), clipped to [-1, 1];
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps + s z, s = eta * sigma_t(DDIM).
    Returns x0; with ``stop_at`` (one grid timestep per item), returns item i's state x_{stop_at[i]}
    as it was when the loop reached that timestep, before the step from it.
    abar_prev is that of t - T // steps (diffusers' rule; 1 below t = 0): on the grid when ``steps`` divides T.
    Works on a private copy of the scheduler: ``set_timesteps`` mutates it.
    """
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps, device=x_T.device)
    if stop_at is not None:
        stop_at = stop_at.to(x_T.device)
        if not torch.isin(stop_at, sched.timesteps).all():
            raise ValueError(f"stop_at must lie on the {steps}-step grid {sched.timesteps.tolist()}")
        stopped = torch.empty_like(x_T)
    x = x_T
    for t in tqdm(sched.timesteps, desc="ddim", leave=False, disable=not progress):
        if stop_at is not None:
            hit = stop_at == t
            stopped[hit] = x[hit]
            if bool((stop_at >= t).all()):
                return stopped
        eps = unet(x, t).sample
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x
