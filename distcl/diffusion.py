"""Forward noising and DDIM sampling: full, stopped per item at a grid timestep, or per item down to any timestep
(the two ways of partial generation)."""

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
    Returns x0; with ``stop_at`` (one timestep of the ``steps``-step grid per item), returns item i's state
    x_{stop_at[i]} as it was when the loop reached that timestep, before the step from it (the loop runs to the
    end: no host read of the stop times, so it never waits on the device).
    abar_prev is that of t - T // steps (diffusers' rule; 1 below t = 0): on the grid when ``steps`` divides T.
    Works on a private copy of the scheduler: ``set_timesteps`` mutates it.
    """
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)  # on the host, as diffusers' pipelines: step() indexes its CPU tables with t
    stopped = None
    if stop_at is not None:
        stop_at = stop_at.to(x_T.device)
        # checked on the device, without a host read (a CPU tensor raises here, CUDA at its next sync)
        torch._assert_async(
            torch.isin(stop_at, sched.timesteps.to(x_T.device)).all(),
            f"stop_at must lie on the {steps}-step grid (distcl.diffusion.sampling_timesteps)",
        )
        stopped = x_T
    x = x_T
    for t in tqdm(sched.timesteps.tolist(), desc="ddim", leave=False, disable=not progress):  # host ints
        if stop_at is not None:
            stopped = torch.where((stop_at == t).view(-1, *([1] * (x.dim() - 1))), x, stopped)
        eps = unet(x, t).sample.float()  # the trajectory stays fp32 under bf16 autocast
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x if stop_at is None else stopped


@torch.no_grad()
def ddim_to(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    steps: int,
    t_stop: torch.Tensor,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Item i's DDIM state at timestep t_stop[i] after ``steps`` steps from T spaced over [T, t_stop[i]] (the
    reference's partial generation): tau_j = t_stop + round(j (T - t_stop) / steps) - 1 for j = steps..1, then
    tau_0 = t_stop. Each step, per item: x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar), clipped to [-1, 1] as
    the scheduler says; x <- sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps + s z, s = eta sigma_DDIM (z drawn
    from ``generator`` when eta > 0)."""
    T = scheduler.config.num_train_timesteps
    table = scheduler.alphas_cumprod.to(x_T.device)
    stop = t_stop.to(x_T.device).long()
    shape = (-1, *([1] * (x_T.dim() - 1)))

    def tau(j: int) -> torch.Tensor:
        return stop + torch.round(j * (T - stop) / steps).long() - 1 if j > 0 else stop

    x = x_T
    for j in range(steps, 0, -1):
        t, prev = tau(j), tau(j - 1)
        abar, abar_prev = table[t].view(shape), table[prev].view(shape)
        eps = unet(x, t).sample.float()
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        if scheduler.config.clip_sample:
            x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
        s = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).clamp_min(0).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - s**2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x = x + s * torch.randn(x.shape, generator=generator).to(x.device)
    return x
