"""Progressive distillation: the x target, the t' / t'' ordering, the time grid against diffusers' DDIM, and the
command on a tiny teacher."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from distcl.cli import main
from distcl.config import ModelConfig, ProgressiveConfig
from distcl.diffusion import ddim_sample
from distcl.distill import distill, fit_inline
from distcl.models import build_scheduler, save_checkpoint
from distcl.progressive import (
    TimeSchedule,
    ddim_step,
    model_x,
    pd_target,
    stage_unit,
    student_scheduler,
    truncated_snr_weight,
)
from distcl.seeding import seeded_generator
from distcl.settings import ConfigError


def zero_snr_schedule() -> TimeSchedule:
    return TimeSchedule(student_scheduler(build_scheduler(ModelConfig()), "v").alphas_cumprod)


def nonlinear_teacher(z, t):
    """A stand-in teacher: any smooth xhat(z, t) that depends on both."""
    return torch.tanh(1.5 * z) * (1 - t.view(-1, 1, 1, 1).float() / 2) + 0.1


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_one_student_step_with_the_target_lands_on_the_teachers_two_steps(n):
    schedule = zero_snr_schedule()
    torch.manual_seed(n)
    i = torch.randint(1, n + 1, (6,))
    t = i.double() / n
    z_t = torch.randn(6, 1, 4, 4)
    x_target, z_2 = pd_target(nonlinear_teacher, z_t, t, n, schedule)
    student_step = ddim_step(z_t, x_target, t, t - 1.0 / n, schedule)
    assert torch.allclose(student_step, z_2, atol=1e-4)


def test_teacher_half_steps_go_t_then_t_prime_then_t_double_prime():
    """Pinned by hand: z' at t - 0.5/n first, then z'' at t - 1/n; the swapped order gives another target."""
    schedule, n = zero_snr_schedule(), 4
    t = torch.full((3,), 0.75, dtype=torch.float64)
    z_t = torch.randn(3, 1, 4, 4)
    t1, t2 = t - 0.125, t - 0.25  # t' = 0.625 (timestep 624), t'' = 0.5 (timestep 499)
    assert schedule.timestep(t1).tolist() == [624] * 3 and schedule.timestep(t2).tolist() == [499] * 3
    z1 = ddim_step(z_t, nonlinear_teacher(z_t, t), t, t1, schedule)
    z2 = ddim_step(z1, nonlinear_teacher(z1, t1), t1, t2, schedule)
    _, got = pd_target(nonlinear_teacher, z_t, t, n, schedule)
    assert torch.allclose(got, z2, atol=1e-6)
    z1_swapped = ddim_step(z_t, nonlinear_teacher(z_t, t), t, t2, schedule)
    z2_swapped = ddim_step(z1_swapped, nonlinear_teacher(z1_swapped, t2), t2, t1, schedule)
    assert not torch.allclose(got, z2_swapped, atol=1e-3)


def test_two_half_steps_from_the_top_are_diffusers_two_step_ddim(unet):
    """On the teacher's own schedule (alpha > 0 at the top), the eps teacher's t = 1 -> 0.5 -> 0 half steps are
    exactly DDIMScheduler's trailing 2-step sampling: the time grid maps onto diffusers'."""
    scheduler = DDIMScheduler.from_config(build_scheduler(ModelConfig()).config, clip_sample=False)
    schedule = TimeSchedule(scheduler.alphas_cumprod)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, z_0 = pd_target(model_x(unet, "epsilon", schedule), z, torch.ones(2, dtype=torch.float64), 1, schedule)
        expected = ddim_sample(unet, scheduler, z, 2)
    assert torch.allclose(z_0, expected, atol=1e-4)


def test_students_sample_with_diffusers_ddim(unet):
    """A v-student's n-step sampling by our DDIM steps is DDIMScheduler's at n steps (what DDIMPipeline runs)."""
    scheduler = student_scheduler(build_scheduler(ModelConfig()), "v")
    schedule = TimeSchedule(scheduler.alphas_cumprod)
    student_x = model_x(unet, "v_prediction", schedule)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n = 4
    x = z
    with torch.no_grad():
        for i in range(n, 0, -1):
            t, s = torch.full((2,), i / n, dtype=torch.float64), torch.full((2,), (i - 1) / n, dtype=torch.float64)
            x = ddim_step(x, student_x(x, t), t, s, schedule)
        expected = ddim_sample(unet, scheduler, z, n)
    assert torch.allclose(x, expected, atol=1e-4)


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"start_steps": 8, "target_steps": 3}, "target_steps", "not reachable by halving"),
        ({"start_steps": 1}, "start_steps", "allowed: >= 2"),
        ({"start_steps": 4, "target_steps": 4}, "target_steps", "not reachable"),
        ({"parameterisation": "eps"}, "parameterisation", "allowed: x, v"),
    ],
)
def test_bad_settings_name_the_field(fields, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        ProgressiveConfig(**fields)
    assert err.value.field == field


def test_stages_halve_down_to_the_target():
    assert ProgressiveConfig(start_steps=8, target_steps=2).stages() == [4, 2]
    assert ProgressiveConfig(start_steps=16, target_steps=1).stages() == [8, 4, 2, 1]


@pytest.fixture
def teacher_dir(tmp_path, unet):
    save_checkpoint(unet, build_scheduler(ModelConfig()), tmp_path / "teacher")
    return tmp_path / "teacher"


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        ["distill", "progressive", "--teacher", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert code == 2 and "is not a distcl / diffusers DDIMPipeline checkpoint" in capsys.readouterr().err
    assert main(["distill", "progressive", "--teacher", "x", "--out", "y", "--set", "target_steps=3"]) == 2


def test_progressive_command_writes_loadable_students_and_resumes(teacher_dir, tmp_path, capsys):
    out = tmp_path / "pd"
    args = [
        "distill",
        "progressive",
        "--teacher",
        str(teacher_dir),
        "--out",
        str(out),
        "--no-progress",
        "--inline",
        "--set",
        "start_steps=4",
        "--set",
        "iterations=3",
        "--set",
        "batch_size=4",
    ]
    assert main(args) == 0
    for n in (2, 1):
        pipe = DDIMPipeline.from_pretrained(out / f"steps_{n}")
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
        images = pipe(batch_size=2, num_inference_steps=n, generator=torch.Generator().manual_seed(0), output_type="np")
        assert images.images.shape == (2, 8, 8, 1)
        assert len((out / f"steps_{n}" / "log.jsonl").read_text().splitlines()) == 3
    mtime = (out / "steps_1" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    capsys.readouterr()
    assert main(args) == 0  # resumed: both stages found done
    assert "progressive steps_" not in capsys.readouterr().out
    assert (out / "steps_1" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime == mtime
    assert main([*args[:-2], "--set", "batch_size=8"]) == 2  # other settings, same --out: refused
    assert json.loads((out / "distill.json").read_text())["batch_size"] == 4


def test_distillation_lowers_the_stage_loss(teacher_dir):
    cfg = ProgressiveConfig(start_steps=2, target_steps=1, iterations=60, batch_size=16, lr=2e-3)
    out = teacher_dir.parent / "pd"
    distill("progressive", teacher_dir, out, cfg, fit_inline, progress=False, log=lambda _: None)
    losses = [json.loads(line)["loss"] for line in (out / "steps_1" / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])  # seeded: the same draws every run


def test_the_truncated_snr_weight_against_the_linear_schedule():
    """max(SNR_t, 1) at t = i/8 from alphas_cumprod = prod(1 - beta), beta linear 1e-4..0.02, computed here."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1 / 8, 2 / 8, 4 / 8, 1.0], dtype=torch.float64)
    expected = [max(float(abar[round(v * 1000) - 1] / (1 - abar[round(v * 1000) - 1])), 1.0) for v in t.tolist()]
    got = truncated_snr_weight(t, TimeSchedule(abar.float()))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[0] > 3 and expected[-1] == 1.0  # the weight matters near the data, is 1 near the noise


def test_the_stage_loss_on_fixed_tensors_against_its_formula(teacher_dir):
    """The first stage (n = 8 of 16) on one constant image: x_target from the eps teacher's two DDIM half steps on
    the zero-SNR schedule, the v student's xhat = alpha z - sigma v, weighted by max(SNR, 1): recomputed here."""
    cfg = ProgressiveConfig(start_steps=16, target_steps=8, batch_size=6, data="fmnist", seed=3)
    image = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    unit = stage_unit(teacher_dir, teacher_dir.parent / "pd", 8, cfg, "cpu", image.repeat(5, 1, 1, 1))
    with torch.no_grad():
        got = float(unit.loss(unit.model, 0, slice(None)))
        generator = seeded_generator(3, "pd", 8, 0)
        t = torch.randint(1, 9, (6,), generator=generator).double() / 8
        eps = torch.randn((6, 1, 8, 8), generator=generator)
        linear = build_scheduler(ModelConfig()).alphas_cumprod.double()  # the eps teacher converts with its own
        rescaled = student_scheduler(build_scheduler(ModelConfig()), "v").alphas_cumprod.double()

        def alpha_sigma(table, s):
            a = torch.where(s > 0, table[(s * 1000).round().long().clamp(1, 1000) - 1], torch.ones_like(s))
            return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)

        def teacher_x(z, s):
            out = unit.model(z.float(), (s * 1000).round().long().clamp(1, 1000) - 1).sample.double()
            alpha, sigma = alpha_sigma(linear, s)
            return ((z - sigma * out) / alpha).clamp(-1, 1)

        def step(z, x, s_from, s_to):
            (a0, s0), (a1, s1) = alpha_sigma(rescaled, s_from), alpha_sigma(rescaled, s_to)
            return a1 * x + s1 / s0 * (z - a0 * x)

        alpha, sigma = alpha_sigma(rescaled, t)
        z_t = alpha * image.double() + sigma * eps.double()
        z1 = step(z_t, teacher_x(z_t, t), t, t - 1 / 16)
        z2 = step(z1, teacher_x(z1, t - 1 / 16), t - 1 / 16, t - 1 / 8)
        a2, s2 = alpha_sigma(rescaled, t - 1 / 8)
        x_target = (z2 - s2 / sigma * z_t) / (a2 - s2 / sigma * alpha)
        v = unit.model(z_t.float(), (t * 1000).round().long() - 1).sample.double()
        weight = (alpha**2 / sigma**2).clamp_min(1).view(-1)
        expected = float((weight * ((x_target - (alpha * z_t - sigma * v)) ** 2).mean((1, 2, 3))).mean())
    assert got == pytest.approx(expected, rel=1e-4)
