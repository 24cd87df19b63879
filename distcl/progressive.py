"""Progressive distillation (Salimans & Ho, ICLR 2022; ALGORITHMS.md section 2) on diffusers' discrete schedule.

Continuous time t in [0, 1] is the discrete timestep round(t T) - 1 (T = 1000): the DDIM "trailing" grid, so an
N-step student samples with diffusers' DDIMScheduler at N steps (``DDIMPipeline.from_pretrained``). t = 0 is the
data (alpha 1, sigma 0). The students' schedule has SNR 0 at the top (``rescale_betas_zero_snr``), which eps
prediction cannot serve: students predict x or v. A stage distils a 2N-step teacher into an N-step student:

    i ~ U{1..N}; t = i/N; t' = t - 0.5/N; t'' = t - 1/N          (t'' < t' < t: the teacher's two half steps)
    z_t   = alpha_t x + sigma_t eps
    z_t'  = alpha_t'  xhat_T(z_t, t)   + (sigma_t'/sigma_t)   (z_t  - alpha_t  xhat_T(z_t, t))
    z_t'' = alpha_t'' xhat_T(z_t', t') + (sigma_t''/sigma_t') (z_t' - alpha_t' xhat_T(z_t', t'))
    x_target = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    loss = max(SNR_t, 1) * mean (x_target - xhat_S(z_t, t))^2                ("truncated SNR" weighting)

so that one student DDIM step from z_t with xhat = x_target lands on z_t''. xhat from a model output o:
``epsilon``: (z - sigma o) / alpha; ``sample`` (x): o; ``v_prediction``: alpha z - sigma o. The first teacher is a
distcl eps model trained on the plain linear schedule; it converts with its own alphas (non-zero at the top,
within 1 % of the rescaled ones elsewhere), while z_t and the DDIM steps use the zero-SNR schedule.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, UNet2DModel

from distcl.config import ProgressiveConfig
from distcl.diffusion import ddim_sample
from distcl.models import load_pipeline_parts, save_checkpoint
from distcl.seeding import seeded_generator
from distcl.training import DistillUnit

PARAMETERISATIONS = {"x": "sample", "v": "v_prediction"}  # distcl name -> diffusers prediction_type


class TimeSchedule:
    """alpha_t, sigma_t for continuous t in [0, 1] on a discrete schedule's ``alphas_cumprod`` (length T)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double()
        self.T = len(alphas_cumprod)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The discrete timestep of t > 0: round(t T) - 1."""
        return (t.double() * self.T).round().long().clamp(1, self.T) - 1

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1; (1, 0) at t = 0. Shape [B, 1, 1, 1], float32, on t's
        device."""
        table = self.alphas_cumprod.to(t.device)
        abar = torch.where(t > 0, table[self.timestep(t)], torch.ones_like(t, dtype=torch.float64))
        shape = (-1, 1, 1, 1)
        return abar.sqrt().float().view(shape), (1 - abar).sqrt().float().view(shape)


def to_x(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str
) -> torch.Tensor:
    """xhat from a model output under diffusers' ``prediction_type``."""
    if prediction == "epsilon":
        return (z - sigma * output) / alpha
    if prediction == "sample":
        return output
    if prediction == "v_prediction":
        return alpha * z - sigma * output
    raise ValueError(f"unknown prediction type {prediction!r}")


def ddim_step(
    z_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: TimeSchedule
) -> torch.Tensor:
    """z_s = alpha_s xhat + (sigma_s / sigma_t) (z_t - alpha_t xhat), s < t (deterministic DDIM)."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    return alpha_s * x_hat + (sigma_s / sigma_t) * (z_t - alpha_t * x_hat)


XPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, t) -> xhat


def pd_target(
    teacher_x: XPredictor, z_t: torch.Tensor, t: torch.Tensor, n: int, schedule: TimeSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_target, z_t'') for an n-step student at times t: the teacher's two DDIM half steps t -> t' -> t''."""
    t1, t2 = t - 0.5 / n, t - 1.0 / n  # t' then t'': swapping them is the known bug
    z1 = ddim_step(z_t, teacher_x(z_t, t), t, t1, schedule)
    z2 = ddim_step(z1, teacher_x(z1, t1), t1, t2, schedule)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_2, sigma_2 = schedule.alpha_sigma(t2)
    ratio = sigma_2 / sigma_t
    return (z2 - ratio * z_t) / (alpha_2 - ratio * alpha_t), z2


def truncated_snr_weight(t: torch.Tensor, schedule: TimeSchedule) -> torch.Tensor:
    """max(SNR_t, 1), SNR = alpha^2 / sigma^2."""
    alpha, sigma = schedule.alpha_sigma(t)
    return (alpha**2 / sigma**2).clamp_min(1.0).view(-1)


def model_x(
    unet: UNet2DModel, prediction: str, schedule: TimeSchedule, own: Optional[TimeSchedule] = None, clip: bool = False
) -> XPredictor:
    """xhat(z, t) of a UNet; ``own``: the schedule the model converts with (the first, eps teacher's); ``clip``:
    xhat clipped to [-1, 1], as the teacher's own DDIM sampler does (``clip_sample``)."""
    convert = own or schedule

    def predict(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = convert.alpha_sigma(t)
        x = to_x(unet(z, schedule.timestep(t).to(z.device)).sample, z, alpha.to(z), sigma.to(z), prediction)
        return x.clamp(-1, 1) if clip else x

    return predict


def student_scheduler(teacher_scheduler: DDIMScheduler, parameterisation: str) -> DDIMScheduler:
    """The teacher's DDIM scheduler with SNR 0 at the top, trailing spacing, and the student's prediction type."""
    return DDIMScheduler.from_config(
        teacher_scheduler.config,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type=PARAMETERISATIONS[parameterisation],
        clip_sample=False,
    )


def stage_dir(out: Path, n: int) -> Path:
    """Where the n-step student of a distillation into OUT is saved (a DDIMPipeline folder)."""
    return Path(out) / f"steps_{n}"


def teacher_samples(
    unet: UNet2DModel, scheduler: DDIMScheduler, steps: int, batch_size: int, seed: int
) -> Callable[[int, slice], torch.Tensor]:
    """Data-free PD: batch k is the teacher's own ``steps``-step DDIM samples from x_T ~ generator (seed, "pd_data", k);
    a shard generates only its rows."""
    size = unet.config.sample_size

    def batch(k: int, shard: slice) -> torch.Tensor:
        generator = seeded_generator(seed, "pd_data", k)
        x_T = torch.randn((batch_size, unet.config.in_channels, size, size), generator=generator)[shard]
        return ddim_sample(unet, scheduler, x_T.to(unet.device), steps, 0.0, generator).clamp(-1, 1)

    return batch


def image_batches(images: torch.Tensor, batch_size: int, seed: int) -> Callable[[int, slice], torch.Tensor]:
    def batch(k: int, shard: slice) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=seeded_generator(seed, "pd_images", k))
        return images[idx[shard]]

    return batch


def stage_unit(
    teacher_dir: Path,
    out: Path,
    n: int,
    cfg: ProgressiveConfig,
    device: torch.device | str,
    images: Optional[torch.Tensor] = None,
) -> DistillUnit:
    """PD stage n: the 2n-step teacher is the checkpoint at ``teacher_dir`` for the
    first stage, else the previous stage's student OUT/steps_<2n>; the student starts as its copy and is saved
    to OUT/steps_<n>/, a DDIMPipeline that samples in n steps.

    Step k: x from ``cfg.data`` batch k, i and eps from generator (seed, "pd", n, k), both for the whole batch;
    loss = mean over the shard's rows of max(SNR_t, 1) mean (x_target - xhat_S(z_t, t))^2."""
    original, original_scheduler = load_pipeline_parts(teacher_dir, device)
    scheduler = student_scheduler(original_scheduler, cfg.parameterisation)
    schedule = TimeSchedule(scheduler.alphas_cumprod)
    first = 2 * n == cfg.start_steps
    unet, unet_scheduler = (
        (original, original_scheduler) if first else load_pipeline_parts(stage_dir(out, 2 * n), device)
    )
    student = copy.deepcopy(unet).requires_grad_(True)
    teacher_x = model_x(
        unet.eval().requires_grad_(False),
        unet_scheduler.config.prediction_type,
        schedule,
        TimeSchedule(unet_scheduler.alphas_cumprod),
        clip=unet_scheduler.config.clip_sample,
    )  # its DDIM, as it samples replay
    if cfg.data == "teacher":
        data = teacher_samples(
            original.eval().requires_grad_(False), original_scheduler, cfg.start_steps, cfg.batch_size, cfg.seed
        )
    else:
        data = image_batches(images, cfg.batch_size, cfg.seed)
    prediction = PARAMETERISATIONS[cfg.parameterisation]

    def loss(model: torch.nn.Module, step: int, shard: slice) -> torch.Tensor:
        generator = seeded_generator(cfg.seed, "pd", n, step)
        x = data(step, shard).to(device)
        i = torch.randint(1, n + 1, (cfg.batch_size,), generator=generator)[shard]
        t = (i.double() / n).to(device)
        eps = torch.randn((cfg.batch_size, *x.shape[1:]), generator=generator)[shard].to(device)
        alpha, sigma = schedule.alpha_sigma(t)
        z_t = alpha.to(x) * x + sigma.to(x) * eps
        with torch.no_grad():
            x_target, _ = pd_target(teacher_x, z_t, t, n, schedule)
        weight = truncated_snr_weight(t, schedule).to(x)
        student_x = model_x(model, prediction, schedule)
        return (weight * ((x_target - student_x(z_t, t)) ** 2).mean(dim=(1, 2, 3))).mean()

    directory = stage_dir(out, n)

    def save(rows: list[dict]) -> None:
        save_checkpoint(student, scheduler, directory)
        (directory / "log.jsonl").write_text("".join(json.dumps({"steps": n, **r}) + "\n" for r in rows))

    return DistillUnit(student, loss, cfg.iterations, cfg.lr, save)
