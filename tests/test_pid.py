"""Physics-informed distillation: the sigma-parameterised DDIM ODE, the residual along an accurate numerical
solution of a tiny teacher's ODE (near zero) and off it (not), the boundary condition, the command."""

from typing import Callable, Optional

import pytest
import torch
from diffusers import DDIMScheduler

from distcl.cli import main
from distcl.config import ModelConfig, PIDConfig
from distcl.models import build_scheduler, save_checkpoint
from distcl.pid import (
    PIDStudent,
    SigmaSchedule,
    SigmaTeacher,
    edm_time_grid,
    load_pid_student,
    pid_residual,
)
from distcl.settings import ConfigError


def heun_solve(
    teacher: SigmaTeacher,
    y: torch.Tensor,
    sigmas: torch.Tensor,
    on_point: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Integrate dy/dsigma = (y - D(y, sigma)) / sigma along the decreasing ``sigmas`` (Heun's method)."""
    with torch.no_grad():
        for k in range(len(sigmas) - 1):
            on_point(k, y)
            s, s_next = sigmas[k].expand(len(y)), sigmas[k + 1].expand(len(y))
            step = float(sigmas[k + 1] - sigmas[k])
            d = (y - teacher.denoise(y, s)) / float(sigmas[k])
            y_euler = y + step * d
            d_next = (y_euler - teacher.denoise(y_euler, s_next)) / float(sigmas[k + 1])
            y = y + step * (d + d_next) / 2
        on_point(len(sigmas) - 1, y)
    return y


@pytest.fixture
def teacher(unet):
    return SigmaTeacher(unet, SigmaSchedule(build_scheduler(ModelConfig()).alphas_cumprod))


def test_ddim_is_the_euler_method_of_the_sigma_ode(unet, teacher):
    scheduler = DDIMScheduler.from_config(build_scheduler(ModelConfig()).config, clip_sample=False)
    scheduler.set_timesteps(4)  # 999, 749, 499, 249
    abar = scheduler.alphas_cumprod
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = scheduler.step(unet(x_t, 499).sample, 499, x_t).prev_sample  # to timestep 249
        sigma_t, sigma_s = ((1 - abar[[499, 249]]) / abar[[499, 249]]).sqrt().double()
        assert teacher.schedule.timestep(sigma_t.view(1)).item() == pytest.approx(499, abs=1e-3)
        y_t = x_t / abar[499].sqrt()
        y_s = (
            y_t
            + (sigma_s - sigma_t).float() * (y_t - teacher.denoise(y_t, sigma_t.view(1).expand(2))) / sigma_t.float()
        )
    assert torch.allclose(y_s * abar[249].sqrt(), expected, atol=1e-4)


def test_residual_vanishes_along_the_teachers_ode_solution_and_not_off_it(teacher):
    fine = edm_time_grid(teacher.schedule.sigma_max, teacher.schedule.sigma_min, 401)
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * teacher.schedule.sigma_max
    path = {}
    heun_solve(teacher, z.clone(), fine, lambda k, y: path.__setitem__(round(float(fine[k]), 9), y.clone()))

    def on_solution(zz, t):  # the exact-solution "student": the solved trajectory at time t
        return torch.stack([path[round(float(ti), 9)][0] for ti in t])

    def off_solution(zz, t):  # smooth, right boundary at T, 20 % of t off the ODE's solution
        t4 = t.view(-1, 1, 1, 1).float()
        return on_solution(zz, t) + 0.2 * (1 - t4 / teacher.schedule.sigma_max) * t4 * torch.sin(3 * torch.log(t4))

    grid = fine[::4]  # 101 points: the residual's own grid
    i = torch.arange(1, len(grid) - 1)
    zz = z.expand(len(i), -1, -1, -1)
    for difference in ("first", "central"):
        on = pid_residual(on_solution, teacher, zz, grid, i, difference)
        off = pid_residual(off_solution, teacher, zz, grid, i, difference)
        assert on.mean() < 0.02 * off.mean(), (difference, on.mean(), off.mean())
    central = pid_residual(on_solution, teacher, zz, grid, i, "central").mean()
    assert central < pid_residual(on_solution, teacher, zz, grid, i, "first").mean()  # second-order accurate


def test_student_meets_the_boundary_condition(unet, teacher):
    student = PIDStudent(unet, teacher.schedule)
    z = torch.randn(3, 1, 8, 8) * teacher.schedule.sigma_max
    with torch.no_grad():
        at_top = student(z, torch.full((3,), teacher.schedule.sigma_max, dtype=torch.float64))
    assert torch.allclose(at_top, z, atol=1e-4)


def test_edm_grid():
    grid = edm_time_grid(80.0, 0.002, 5)
    assert grid[0] == pytest.approx(80) and grid[-1] == pytest.approx(0.002) and (grid[1:] < grid[:-1]).all()
    # interior points pinned: (80^(1/7) + i/4 (0.002^(1/7) - 80^(1/7)))^7 (Karras et al. 2022, eq. 5)
    assert grid[1:4].tolist() == pytest.approx([17.527832, 2.515219, 0.1697528], rel=1e-6)
    with pytest.raises(ConfigError, match=r"grid_points: 2 \(allowed: >= 3\)"):
        PIDConfig(grid_points=2)


def test_pid_command_trains_a_one_step_student(unet, tmp_path, capsys):
    save_checkpoint(unet, build_scheduler(ModelConfig()), tmp_path / "teacher")
    out = tmp_path / "pid"
    args = [
        "distill",
        "pid",
        "--teacher",
        str(tmp_path / "teacher"),
        "--out",
        str(out),
        "--no-progress",
        "--inline",
        "--set",
        "iterations=4",
        "--set",
        "batch_size=4",
        "--set",
        "grid_points=20",
    ]
    assert main(args) == 0
    student = load_pid_student(out)
    images = student.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 8, 8) and images.abs().max() <= 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert main([*args[:-2], "--set", "grid_points=30"]) == 2  # same --out, other settings
    assert "other settings" in capsys.readouterr().err
    assert main(["distill", "pid", "--teacher", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_sample_command_reads_pid_students_and_ddim_checkpoints(unet, tmp_path):
    save_checkpoint(unet, build_scheduler(ModelConfig()), tmp_path / "teacher")
    assert (
        main(
            [
                "distill",
                "pid",
                "--teacher",
                str(tmp_path / "teacher"),
                "--out",
                str(tmp_path / "pid"),
                "--no-progress",
                "--inline",
                "--set",
                "iterations=1",
                "--set",
                "batch_size=2",
            ]
        )
        == 0
    )
    for model in ("pid", "teacher"):
        grid = tmp_path / f"{model}.png"
        assert main(["sample", "--model", str(tmp_path / model), "--out", str(grid), "--num", "4", "--steps", "2"]) == 0
        assert grid.stat().st_size > 0
    assert main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
