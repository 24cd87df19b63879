"""Every tensor path of the algorithms on a (fake) CUDA device, on a machine without a GPU: models are built inside
``torch.device("cuda")`` under FakeTensorMode, inputs live on "cuda", and an op that meets a tensor left on the
CPU (a schedule, a constant, a grid) raises FakeTensorDeviceMismatchError. Host reads (``.item()``) are kept
out of these paths: they raise here too.

DDIM sampling: diffusers' DDIMScheduler keeps its timesteps and tables on the host (its step() indexes them with
the host timestep, as in its own pipelines); ``set_timesteps`` builds them from numpy, which fake mode would turn
into a fake tensor that no host code can read, so the ``host_timesteps`` fixture builds them as real tensors, as
in a real run."""

import pytest
import torch
from diffusers import DDIMScheduler
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from distcl.config import ModelConfig
from distcl.diffusion import add_noise, ddim_sample
from distcl.eval_net import CNNFeatureExtractor, EvalClassifier, classify
from distcl.evaluation import generate, generate_indexed
from distcl.losses import continual_loss
from distcl.models import build_scheduler
from distcl.pid import PIDStudent, SigmaSchedule, SigmaTeacher, edm_time_grid, pid_residual
from distcl.progressive import TimeSchedule, model_x, pd_target, truncated_snr_weight
from distcl.replay import Teacher, make_replay, replay_on_data
from distcl.seeding import seeded_generator
from distcl.solver import SolverCNN, distillation_loss, replay_images
from tests.conftest import tiny_unet

CUDA = torch.device("cuda")


@pytest.fixture
def host_timesteps(monkeypatch):
    build = DDIMScheduler.set_timesteps

    def on_the_host(self, *args, **kwargs):
        with unset_fake_temporarily():
            return build(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "set_timesteps", on_the_host)


@pytest.fixture
def fake_cuda():
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def on_device(build):
    """A model built on the (fake) GPU: ``.to("cuda")`` of a real module fails in fake mode."""
    with torch.device(CUDA):
        return build()


@pytest.fixture(scope="module")
def scheduler():
    return build_scheduler(ModelConfig())  # its tables stay on the CPU, as in a real run


@pytest.fixture(scope="module")
def sigma_schedule(scheduler):
    return SigmaSchedule(scheduler.alphas_cumprod)  # made once, as a real run does before its steps


def on_cuda(*tensors):
    return all(t.device.type == "cuda" for t in tensors)


def test_replay_batch_and_the_continual_loss(fake_cuda, scheduler):
    unet = on_device(tiny_unet)
    batch = make_replay(Teacher(unet, scheduler, steps=2), "gaussian", 4, seeded_generator(0, "replay"))
    assert on_cuda(batch.inputs, batch.timesteps, batch.targets)
    x0 = torch.rand(4, 1, 8, 8, device=CUDA) * 2 - 1
    eps, t = torch.randn(4, 1, 8, 8, device=CUDA), torch.randint(0, 1000, (4,), device=CUDA)
    x_t = add_noise(x0, eps, t, scheduler.alphas_cumprod)
    pred = unet(torch.cat([x_t, batch.inputs]), torch.cat([t, batch.timesteps])).sample
    loss, terms = continual_loss(pred[:4], eps, pred[4:], batch.targets, task=2, replay_lambda=3.0)
    assert on_cuda(loss, *terms.values())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_full_and_stopped_and_the_replay_made_with_it(host_timesteps, fake_cuda, scheduler, eta):
    unet = on_device(tiny_unet)
    x_T = torch.randn(3, 1, 8, 8, device=CUDA)
    assert on_cuda(ddim_sample(unet, scheduler, x_T, 2, eta, seeded_generator(0)))
    stop_at = torch.tensor([999, 499, 999], device=CUDA)
    assert on_cuda(ddim_sample(unet, scheduler, x_T, 2, eta, seeded_generator(0), stop_at=stop_at))
    for strategy in ("gr", "gd", "partial_generation"):
        batch = make_replay(Teacher(unet, scheduler, 2, eta), strategy, 3, seeded_generator(0))
        assert on_cuda(batch.inputs, batch.timesteps, batch.targets)


def test_evaluation_samples_classifier_replay_and_distcl_sample(host_timesteps, fake_cuda, scheduler):
    """Drawn on the GPU, handed back on the host: evaluation chunks, the classifier's replay images, and
    ``distcl sample``'s DDIM grid (distcl.evaluation.generate)."""
    unet = on_device(tiny_unet)
    for images in (
        generate_indexed(unet, scheduler, 2, 1.0, seed=0, task=1, start=4, stop=7),
        replay_images(unet, scheduler, 3, 2, 0.0, seed=0, task=1, index=0),
        generate(unet, scheduler, 3, 2, 0.0, 2, seeded_generator(0), progress=False),
    ):
        assert images.device.type == "cpu" and images.shape == (3, 1, 8, 8)


def test_lwf_targets(fake_cuda, scheduler):
    unet = on_device(tiny_unet)
    x_t, t = torch.randn(3, 1, 8, 8, device=CUDA), torch.randint(0, 1000, (3,), device=CUDA)
    assert on_cuda(replay_on_data(Teacher(unet, scheduler, 2), x_t, t).targets)


def test_progressive_target_and_stage_loss(fake_cuda, scheduler):
    teacher, student = on_device(lambda: tiny_unet(0)), on_device(lambda: tiny_unet(1))
    schedule = TimeSchedule(scheduler.alphas_cumprod)
    t = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64, device=CUDA)
    x, eps = torch.rand(3, 1, 8, 8, device=CUDA), torch.randn(3, 1, 8, 8, device=CUDA)
    alpha, sigma = schedule.alpha_sigma(t)
    z_t = alpha * x + sigma * eps
    x_target, z2 = pd_target(model_x(teacher, "epsilon", schedule, clip=True), z_t, t, 4, schedule)
    weight = truncated_snr_weight(t, schedule)
    loss = (weight * ((x_target - model_x(student, "v_prediction", schedule)(z_t, t)) ** 2).mean(dim=(1, 2, 3))).mean()
    assert on_cuda(x_target, z2, weight, loss)


@pytest.mark.parametrize("difference", ["first", "central"])
def test_pid_residual_with_the_grid_on_either_device(sigma_schedule, fake_cuda, difference):
    schedule = sigma_schedule
    student, teacher = (
        PIDStudent(on_device(lambda: tiny_unet(1)), schedule),
        SigmaTeacher(on_device(lambda: tiny_unet(0)), schedule),
    )
    z = torch.randn(3, 1, 8, 8, device=CUDA) * schedule.sigma_max
    for device in ("cpu", CUDA):  # one process keeps the grid on the CPU, several GPU workers on their device
        grid = edm_time_grid(schedule.sigma_max, schedule.sigma_min, 20).to(device)
        i = torch.tensor([1, 5, 17], device=device)
        assert on_cuda(pid_residual(student, teacher, z, grid, i, difference))
    assert on_cuda(student.generate(torch.randn(2, 1, 8, 8, device=CUDA)))


def test_evaluation_features_labels_and_the_classifier_loss(fake_cuda):
    net = on_device(EvalClassifier).eval()
    images = torch.rand(5, 1, 16, 16, device=CUDA) * 2 - 1  # the cpu preset's size: upsampled to 28 inside
    assert on_cuda(net.features(images), net(images))
    assert classify(net, images, batch_size=2).device.type == "cpu"  # labels come back to the host
    extractor = CNNFeatureExtractor.__new__(CNNFeatureExtractor)
    torch.nn.Module.__init__(extractor)
    extractor.net, extractor.features_list = net, ("features",)
    assert on_cuda(*extractor(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, device=CUDA)))
    solver, previous = on_device(SolverCNN), on_device(SolverCNN).eval()
    assert on_cuda(distillation_loss(solver(images), previous(images), temperature=2.0))


def test_a_cpu_schedule_meeting_cuda_inputs_is_caught(fake_cuda):
    """The check itself: the crash class of progressive.TimeSchedule before its fix."""
    table = torch.linspace(1, 0, 10, device="cpu")
    with pytest.raises(Exception, match="cpu"):
        table.double()[torch.tensor([1, 2], device=CUDA)] * torch.ones(2, device=CUDA)
