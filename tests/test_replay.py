import pytest
import torch

from distcl.config import load_config
from distcl.diffusion import add_noise, ddim_sample, ddim_to, sampling_timesteps
from distcl.models import build_scheduler, build_unet, save_checkpoint, seeded_init
from distcl.replay import Teacher, make_replay, replay_on_data
from distcl.teachers import load_teacher, lwf_teacher

N = 6


@pytest.fixture
def teacher(unet, scheduler):
    return Teacher(unet, scheduler, steps=2, eta=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["gr", "gd"])
def test_gr_and_gd_targets(teacher, strategy):
    batch = make_replay(teacher, strategy, N, gen())
    g = gen()  # the same draws, in the documented order: x_T, t', eps'
    x_T = torch.randn(N, 1, 8, 8, generator=g)
    x0_hat = ddim_sample(teacher.unet, teacher.scheduler, x_T, 2, 0.0, g)
    t = torch.randint(0, 1000, (N,), generator=g)
    eps = torch.randn(N, 1, 8, 8, generator=g)
    x_t = add_noise(x0_hat, eps, t, teacher.scheduler.alphas_cumprod)
    assert torch.equal(batch.timesteps, t) and batch.timesteps.dtype == torch.int64
    assert torch.allclose(batch.inputs, x_t, atol=1e-6)
    if strategy == "gr":
        assert torch.equal(batch.targets, eps)  # GR: the true noise
    else:
        assert torch.allclose(batch.targets, teacher.unet(x_t, t).sample, atol=1e-6)  # GD: the teacher's eps
        assert not torch.allclose(batch.targets, eps, atol=1e-2)


@torch.no_grad()
def test_a_fast_sampler_draws_x0_and_the_teacher_still_sets_targets(unet, scheduler):
    """replay_sampler progressive / pid: the student's x0_hat (here a stand-in map) replaces the teacher's DDIM."""
    teacher = Teacher(unet, scheduler, steps=2, eta=0.0, sampler=lambda x_T: 0.5 * torch.tanh(x_T))
    batch = make_replay(teacher, "gd", N, gen(3))
    g = gen(3)
    x0_hat = 0.5 * torch.tanh(torch.randn(N, 1, 8, 8, generator=g))
    t = torch.randint(0, 1000, (N,), generator=g)
    x_t = add_noise(x0_hat, torch.randn(N, 1, 8, 8, generator=g), t, scheduler.alphas_cumprod)
    assert torch.allclose(batch.inputs, x_t, atol=1e-6)
    assert torch.allclose(batch.targets, unet(x_t, t).sample, atol=1e-6)


@torch.no_grad()
def test_gd_and_gr_share_inputs(teacher):
    gr, gd = make_replay(teacher, "gr", N, gen(5)), make_replay(teacher, "gd", N, gen(5))
    assert torch.equal(gr.inputs, gd.inputs) and torch.equal(gr.timesteps, gd.timesteps)


@torch.no_grad()
def test_partial_generation_targets(teacher):
    teacher.steps = 10
    batch = make_replay(teacher, "partial_generation", N, gen(1))
    grid = sampling_timesteps(teacher.scheduler, 10)
    assert torch.isin(batch.timesteps, grid).all()
    g = gen(1)
    x_T = torch.randn(N, 1, 8, 8, generator=g)
    t = grid[torch.randint(0, 10, (N,), generator=g)]
    assert torch.equal(batch.timesteps, t)
    for i in range(N):  # item i = the teacher's DDIM state when reaching t'_i
        k = int((grid == t[i]).nonzero())
        state = (
            x_T[i : i + 1]
            if k == 0
            else ddim_sample(teacher.unet, teacher.scheduler, x_T[i : i + 1], 10, stop_at=t[i : i + 1])
        )
        assert torch.allclose(batch.inputs[i : i + 1], state, atol=1e-4)  # batch-size rounding only
    assert torch.allclose(batch.targets, teacher.unet(batch.inputs, t).sample, atol=1e-5)


@torch.no_grad()
def test_partial_generation_as_the_reference_stops_anywhere(unet, scheduler):
    """train.partial_t uniform: t' ~ U{0..T-1} after x_T, the state of n DDIM steps spaced down to t'."""
    teacher = Teacher(unet, scheduler, steps=2, partial_t="uniform")
    batch = make_replay(teacher, "partial_generation", N, gen(4))
    g = gen(4)
    x_T = torch.randn(N, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (N,), generator=g)
    assert torch.equal(batch.timesteps, t) and len(set(t.tolist())) == N  # not only the grid's 999 and 499
    assert torch.allclose(batch.inputs, ddim_to(unet, scheduler, x_T, 2, t), atol=1e-6)
    assert torch.allclose(batch.targets, unet(batch.inputs, t).sample, atol=1e-5)


@torch.no_grad()
def test_gaussian_targets(teacher):
    batch = make_replay(teacher, "gaussian", N, gen(2))
    g = gen(2)
    x = torch.randn(N, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (N,), generator=g)
    assert torch.equal(batch.inputs, x) and torch.equal(batch.timesteps, t)
    assert torch.allclose(batch.targets, teacher.unet(x, t).sample, atol=1e-6)


@torch.no_grad()
def test_lwf_targets_on_data(teacher):
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    batch = replay_on_data(teacher, x_t, t)
    assert batch.inputs is x_t and torch.allclose(batch.targets, teacher.unet(x_t, t).sample)


@pytest.mark.parametrize("strategy", ["finetune", "joint", "lwf", "nope"])
def test_strategies_without_replay_items(teacher, strategy):
    with pytest.raises(ValueError, match="makes no replay items"):
        make_replay(teacher, strategy, N, gen())


@torch.no_grad()
def test_replay_is_a_function_of_the_seed(teacher):
    a, b, c = (make_replay(teacher, "gd", N, gen(s)) for s in (3, 3, 4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # pinned numbers: a change in the maths or the draw order fails loudly
    assert a.timesteps.tolist() == torch.randint(0, 1000, (N,), generator=_after_sampling(teacher, 3)).tolist()
    assert a.targets.sum().item() == pytest.approx(PINNED_GD_TARGET_SUM, abs=1e-3)


def _after_sampling(teacher, seed):
    g = gen(seed)
    ddim_sample(teacher.unet, teacher.scheduler, torch.randn(N, 1, 8, 8, generator=g), 2, 0.0, g)
    return g


PINNED_GD_TARGET_SUM = -21.5309  # tiny_unet(seed 0), 6 items of generator seed 3, torch 2.14


@pytest.mark.parametrize("strategy", ["gd", "partial_generation", "gaussian"])
def test_a_bf16_teacher_makes_fp32_replay_close_to_the_fp32_one(unet, scheduler, strategy):
    full = make_replay(Teacher(unet, scheduler, steps=2), strategy, 4, torch.Generator().manual_seed(0))
    half = make_replay(
        Teacher(unet, scheduler, steps=2, precision="bf16"), strategy, 4, torch.Generator().manual_seed(0)
    )
    assert half.inputs.dtype == half.targets.dtype == torch.float32  # the trainer's inputs stay fp32
    assert torch.equal(half.timesteps, full.timesteps)
    assert not torch.equal(half.targets, full.targets)  # the teacher really ran in bfloat16
    assert torch.allclose(half.targets, full.targets, atol=0.1)


def test_lwf_teachers_take_the_runs_precision_inline_and_on_ray(tmp_path):
    """Ray's LwF teacher (from the Train worker's starting weights) and the inline one (from OUT/task_<k-1>) are
    the same teacher: under bf16 both run their forwards in bfloat16 (Ray's used to stay fp32)."""
    cfg = load_config(preset="smoke", overrides=["train.strategy=lwf", "runtime.precision=bf16"])
    with seeded_init(0):
        unet = build_unet(cfg.model, cfg.data.image_channels)
    save_checkpoint(unet, build_scheduler(cfg.model), tmp_path / "task_0")
    on_ray, inline = lwf_teacher(cfg, unet.state_dict(), "cpu"), load_teacher(cfg, tmp_path / "task_0", "cpu")
    assert on_ray.precision == inline.precision == "bf16"
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    assert torch.equal(on_ray.eps(x, t), inline.eps(x, t))
    fp32 = lwf_teacher(load_config(preset="smoke", overrides=["train.strategy=lwf"]), unet.state_dict(), "cpu")
    assert not torch.equal(fp32.eps(x, t), on_ray.eps(x, t))  # bf16 targets are not the fp32 ones
