import pytest
import torch

from distcl.config import ModelConfig
from distcl.diffusion import add_noise, ddim_sample, ddim_to, sampling_timesteps
from distcl.models import build_scheduler


def test_add_noise_formula(scheduler):
    x0, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 499, 999])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(add_noise(x0, eps, t, scheduler.alphas_cumprod), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    assert torch.allclose(add_noise(x0, eps, t, scheduler.alphas_cumprod), scheduler.add_noise(x0, eps, t))


def test_schedule_is_the_reference(scheduler):
    betas = scheduler.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert len(betas) == 1000 and scheduler.config.prediction_type == "epsilon"
    assert sampling_timesteps(scheduler, 2).tolist() == [999, 499]
    assert sampling_timesteps(scheduler, 10).tolist() == list(range(999, 0, -100))
    assert scheduler.num_inference_steps is None  # grids come from private copies


def test_zero_terminal_snr_option():
    plain = build_scheduler(ModelConfig())
    zsnr = build_scheduler(ModelConfig(rescale_zero_terminal_snr=True))
    assert plain.alphas_cumprod[-1] > 1e-5 and zsnr.alphas_cumprod[-1] < 1e-12


def _manual_ddim(unet, scheduler, x, grid, eta, noise=None):
    """DDIM by hand: x0 = clip((x - sqrt(1-a) eps)/sqrt(a)); x' = sqrt(a') x0 + sqrt(1-a'-s^2) eps + s z."""
    ac = scheduler.alphas_cumprod
    for i, t in enumerate(grid):
        eps = unet(x, t).sample
        a = ac[t]
        a_prev = ac[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - s**2).sqrt() * eps + (s * noise[i] if noise is not None else 0)
    return x


@torch.no_grad()
def test_ddim_matches_the_formula(unet, scheduler):
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = sampling_timesteps(scheduler, 4)  # 999, 749, 499, 249
    expected = _manual_ddim(unet, scheduler, x_T, grid, 0.0)
    assert torch.allclose(ddim_sample(unet, scheduler, x_T, 4), expected, atol=1e-5)
    # eta = 1: the same, plus s * z with z drawn from the generator step by step
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(4, 1, 8, 8, generator=g) for _ in grid]
    got = ddim_sample(unet, scheduler, x_T, 4, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, _manual_ddim(unet, scheduler, x_T, grid, 1.0, noise), atol=1e-5)


@torch.no_grad()
def test_ddim_deterministic_under_seed(unet, scheduler):
    x_T = torch.randn(2, 1, 8, 8)
    a = ddim_sample(unet, scheduler, x_T, 4, 0.5, torch.Generator().manual_seed(3))
    b = ddim_sample(unet, scheduler, x_T, 4, 0.5, torch.Generator().manual_seed(3))
    c = ddim_sample(unet, scheduler, x_T, 4, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@torch.no_grad()
def test_stop_at_returns_per_item_state(unet, scheduler):
    x_T = torch.randn(3, 1, 8, 8)
    stop = torch.tensor([999, 499, 499])
    got = ddim_sample(unet, scheduler, x_T, 2, stop_at=stop)
    assert torch.equal(got[0], x_T[0])  # stopped before any step
    one_step = _manual_ddim(unet, scheduler, x_T, [999], 0.0)  # the 999 -> 499 step alone ...
    a, a_prev = scheduler.alphas_cumprod[999], scheduler.alphas_cumprod[499]
    eps = unet(x_T, 999).sample
    x0 = ((x_T - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # ... must land on t = 499, not on t = 0
    assert not torch.allclose(one_step, expected)
    assert torch.allclose(got[1:], expected[1:], atol=1e-5)
    with pytest.raises(RuntimeError, match="must lie on the 2-step grid"):
        ddim_sample(unet, scheduler, x_T, 2, stop_at=torch.tensor([999, 500, 499]))


@torch.no_grad()
def test_ddim_to_takes_each_item_down_to_its_own_timestep(unet, scheduler):
    """The reference's partial generation: n DDIM steps spaced over [T, t'] per item, recomputed here in float64
    for one item (t' = 250, 2 steps: 999 -> 624 -> 250) and the same for every item alone as in the batch."""
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    stop = torch.tensor([0, 250, 700, 998])
    batch = ddim_to(unet, scheduler, x_T, 2, stop)
    for i in range(4):
        assert torch.allclose(ddim_to(unet, scheduler, x_T[i : i + 1], 2, stop[i : i + 1]), batch[i : i + 1], atol=1e-5)
    abar = scheduler.alphas_cumprod.double()
    x = x_T[1:2].double()
    for t, prev in ((999, 624), (624, 250)):
        eps = unet(x.float(), torch.tensor([t])).sample.double()
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        x = abar[prev].sqrt() * x0 + (1 - abar[prev]).sqrt() * eps
    assert torch.allclose(batch[1:2].double(), x, atol=1e-5)
    assert not torch.allclose(batch[0], batch[2], atol=1e-2)  # other stops, other states
