"""Physics-informed distillation (PID; Tee et al., TMLR 2024; ALGORITHMS.md section 3) of a distcl DDIM teacher into a
one-step generator, data-free.

The teacher's ODE in the sigma parameterisation. With abar_t the schedule, let
sigma(t) = sqrt(1 - abar_t) / sqrt(abar_t) and y = x_t / sqrt(abar_t) (so x_t = y / sqrt(1 + sigma^2)). Since
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, y = x0 + sigma eps, and the deterministic DDIM update
x_s = sqrt(abar_s) x0hat + sqrt(1 - abar_s) epshat becomes y_s = y_t + (sigma_s - sigma_t) epshat: DDIM is the Euler
method of

    dy/dsigma = epshat(y, sigma) = (y - D(y, sigma)) / sigma,
    D(y, sigma) = y - sigma eps_theta(y / sqrt(1 + sigma^2), t(sigma))     (the teacher's x0 prediction)

which is EDM's probability-flow ODE dx/dt = (x - D(x, t)) / t with t = sigma. t(sigma) is the teacher's timestep,
interpolated in log sigma between the discrete ones (the UNet takes fractional timesteps). T = sigma at the
schedule's top (about 157 for the linear betas), sigma_min at its bottom (about 0.01).

The student maps z ~ N(0, T^2 I) to the trajectory point at time t, with the boundary condition built in:

    x_theta(z, t) = (t / T) z + (1 - t / T) F_theta(c_in z, c_noise(t)),   c_in = 1 / sqrt(T^2 + 1),
    c_noise(t) = the teacher's timestep t(sigma = t) (F starts as a copy of the teacher's UNet)

and is trained on an EDM time grid t_i = (T^(1/rho) + i/(N-1) (sigma_min^(1/rho) - T^(1/rho)))^rho to make the
ODE residual vanish (gradients through both student calls):

    first order:  dy/dt = (x_theta(z, t_i) - x_theta(z, t_{i+1})) / (t_i - t_{i+1})
    central:      dy/dt = (x_theta(z, t_{i-1}) - x_theta(z, t_{i+1})) / (t_{i-1} - t_{i+1})
    loss = || x_theta(z, t_i) - t_i dy/dt - stopgrad D(x_theta(z, t_i), t_i) ||^2     (L2: no LPIPS weights here)

One-step sampling: x0 = x_theta(z, sigma_min) (y at sigma_min is x0 to within 0.01 noise), clipped to [-1, 1].
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DModel

from distcl.config import PIDConfig
from distcl.models import load_pipeline_parts, read_unet
from distcl.seeding import seeded_generator
from distcl.settings import ConfigError
from distcl.training import DistillUnit

STUDENT_FILE = "pid.json"


class SigmaSchedule:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of a discrete schedule, and back: t(sigma)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double()
        self.log_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().log()  # increasing in t
        self.sigma_max, self.sigma_min = float(self.log_sigmas[-1].exp()), float(self.log_sigmas[0].exp())
        self.log_sigma_range = float(self.log_sigmas[0]), float(self.log_sigmas[-1])  # host numbers: no device

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma): linear interpolation in log sigma between the discrete timesteps (float, on sigma's device)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().log().clamp(*self.log_sigma_range)
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).float()


class SigmaTeacher:
    """The DDIM teacher as an EDM denoiser D(y, sigma) on the sigma time axis (see the module docstring)."""

    def __init__(self, unet: UNet2DModel, schedule: SigmaSchedule):
        self.unet, self.schedule = unet, schedule

    def eps(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scale = (1 + sigma.view(-1, 1, 1, 1) ** 2).rsqrt().to(y)
        return self.unet(y * scale, self.schedule.timestep(sigma).to(y.device)).sample

    def denoise(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(y, sigma) = y - sigma eps_theta(y / sqrt(1 + sigma^2), t(sigma))."""
        return y - sigma.view(-1, 1, 1, 1).to(y) * self.eps(y, sigma)


def edm_time_grid(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """t_i = (T^(1/rho) + i/(n-1) (sigma_min^(1/rho) - T^(1/rho)))^rho, i = 0..n-1, decreasing from T to sigma_min."""
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


StudentFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, t) -> x_theta(z, t)


def pid_residual(
    student: StudentFn,
    teacher: SigmaTeacher,
    z: torch.Tensor,
    grid: torch.Tensor,
    i: torch.Tensor,
    difference: str = "first",
) -> torch.Tensor:
    """Per item: mean over pixels of (x_theta(z, t_i) - t_i dy/dt - stopgrad D(x_theta(z, t_i), t_i))^2, dy/dt by
    the first-order (t_i, t_{i+1}) or central (t_{i-1}, t_{i+1}) finite difference."""
    t_i, t_next = grid[i], grid[i + 1]
    y = student(z, t_i)
    if difference == "first":
        slope = (y - student(z, t_next)) / (t_i - t_next).view(-1, 1, 1, 1).to(y)
    else:
        t_prev = grid[i - 1]
        slope = (student(z, t_prev) - student(z, t_next)) / (t_prev - t_next).view(-1, 1, 1, 1).to(y)
    with torch.no_grad():
        target = teacher.denoise(y.detach(), t_i)
    return ((y - t_i.view(-1, 1, 1, 1).to(y) * slope - target) ** 2).mean(dim=(1, 2, 3))


class PIDStudent(torch.nn.Module):
    """x_theta(z, t) = (t/T) z + (1 - t/T) F(c_in z, c_noise(t)) with F a UNet2DModel (boundary x(z, T) = z)."""

    def __init__(self, unet: UNet2DModel, schedule: SigmaSchedule):
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self.T = schedule.sigma_max
        self.c_in = (self.T**2 + 1) ** -0.5

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frac = (t / self.T).view(-1, 1, 1, 1).to(z)
        return frac * z + (1 - frac) * self.unet(self.c_in * z, self.schedule.timestep(t).to(z.device)).sample

    @torch.no_grad()
    def generate(self, x_T: torch.Tensor) -> torch.Tensor:
        """One step from x_T ~ N(0, I): x0 = x_theta(T x_T, sigma_min), clipped to [-1, 1]."""
        t = torch.full((len(x_T),), self.schedule.sigma_min, dtype=torch.float64)
        return self(x_T * self.T, t).clamp(-1, 1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``generate`` from n x_T drawn from ``generator``; CPU."""
        size = self.unet.config.sample_size
        x_T = torch.randn((n, self.unet.config.in_channels, size, size), generator=generator)
        return self.generate(x_T.to(self.unet.device)).cpu()


def pid_unit(teacher_dir: Path, out: Path, cfg: PIDConfig, device: torch.device | str) -> DistillUnit:
    """The PID student of the teacher at ``teacher_dir`` (a distcl.training.DistillUnit), saved to OUT
    (``load_pid_student(OUT)``). Step k: z ~ N(0, T^2 I) and grid indices i from generator (seed, "pid", k) for
    the whole batch; loss = mean over the shard's rows of the residual (``pid_residual``)."""
    unet, scheduler = load_pipeline_parts(teacher_dir, device)
    schedule = SigmaSchedule(scheduler.alphas_cumprod)
    student = PIDStudent(copy.deepcopy(unet).requires_grad_(True), schedule)
    teacher = SigmaTeacher(unet.eval().requires_grad_(False), schedule)
    grid = edm_time_grid(schedule.sigma_max, schedule.sigma_min, cfg.grid_points, cfg.rho)
    low = 1 if cfg.difference == "central" else 0
    size = unet.config.sample_size

    def loss(model: torch.nn.Module, step: int, shard: slice) -> torch.Tensor:
        generator = seeded_generator(cfg.seed, "pid", step)
        z = torch.randn((cfg.batch_size, unet.config.in_channels, size, size), generator=generator)[shard]
        z = z * schedule.sigma_max
        i = torch.randint(low, cfg.grid_points - 1, (cfg.batch_size,), generator=generator)[shard]
        return pid_residual(model, teacher, z.to(device), grid, i, cfg.difference).mean()

    out = Path(out)

    def save(rows: list[dict]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "unet", ignore_errors=True)  # from an attempt that did not finish
        student.unet.save_pretrained(out / "unet")
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        record = {
            "T": schedule.sigma_max,
            "sigma_min": schedule.sigma_min,
            "alphas_cumprod": scheduler.alphas_cumprod.tolist(),
        }
        (out / STUDENT_FILE).write_text(json.dumps(record))  # written last: marks the student complete

    return DistillUnit(student, loss, cfg.iterations, cfg.lr, save)


def load_pid_student(directory: Path, device: torch.device | str = "cpu") -> PIDStudent:
    """The one-step generator saved by ``pid_distill`` (``student.sample(n, generator)``)."""
    directory = Path(directory)
    if not (directory / STUDENT_FILE).is_file():
        raise ConfigError("--model", f"{directory} holds no PID student ({STUDENT_FILE} missing)")
    record = json.loads((directory / STUDENT_FILE).read_text())
    unet = read_unet(directory / "unet").to(device).eval()
    return PIDStudent(unet, SigmaSchedule(torch.tensor(record["alphas_cumprod"]))).eval()
