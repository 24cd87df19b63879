"""The continual classifier: its loss, replay images, training step and forgetting, against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from distcl.config import ClassifierConfig, load_config
from distcl.data import read_idx_source, select, to_model_range
from distcl.diffusion import ddim_sample
from distcl.eval_net import classify
from distcl.seeding import seeded_generator
from distcl.settings import ConfigError
from distcl.solver import (
    InlineImageReplay,
    SolverCNN,
    distillation_loss,
    forgetting,
    replay_images,
    train_solver_task,
)


def test_solver_has_the_reference_scale():
    n = sum(p.numel() for p in SolverCNN().parameters())
    assert 100_000 < n < 140_000
    assert SolverCNN()(torch.zeros(3, 1, 16, 16)).shape == (3, 10) == SolverCNN()(torch.zeros(3, 1, 32, 32)).shape


def test_distillation_loss_is_the_standard_form():
    torch.manual_seed(0)
    s, z, T = torch.randn(5, 10), torch.randn(5, 10), 2.0
    by_hand = sum(-(F.softmax(z[i] / T, 0) * F.log_softmax(s[i] / T, 0)).sum() for i in range(5)) / 5 * T * T
    assert distillation_loss(s, z, T) == pytest.approx(float(by_hand), rel=1e-6)
    # its minimum over s is at s = z (the gradient vanishes there), not at the reverse form's
    s = z.clone().requires_grad_(True)
    distillation_loss(s, z, T).backward()
    assert s.grad.abs().max() < 1e-6


def test_replay_images_depend_only_on_seed_task_and_index(unet, scheduler):
    a = replay_images(unet, scheduler, 3, 2, 0.0, seed=42, task=1, index=5)
    assert torch.equal(a, replay_images(unet, scheduler, 3, 2, 0.0, seed=42, task=1, index=5))
    assert not torch.equal(a, replay_images(unet, scheduler, 3, 2, 0.0, seed=42, task=1, index=6))
    generator = seeded_generator(42, "solver_replay", 1, 5)
    x_T = torch.randn((3, 1, 8, 8), generator=generator)
    with torch.no_grad():
        expected = ddim_sample(unet, scheduler, x_T, 2, 0.0, generator).clamp(-1, 1)
    assert torch.equal(a, expected)
    assert torch.equal(InlineImageReplay(unet, scheduler, 3, 2, 0.0, 42, 1).get(5), a)


def test_forgetting_by_hand():
    history = {0: {0: 0.9}, 1: {0: 0.7, 1: 0.95}, 2: {0: 0.8, 1: 0.5, 2: 0.99}}
    assert forgetting(history, 0) == 0.0
    assert forgetting(history, 1) == pytest.approx(0.2)
    assert forgetting(history, 2) == pytest.approx(((0.9 - 0.8) + (0.95 - 0.5)) / 2)


@pytest.fixture(scope="module")
def two_classes(fmnist_dir):
    splits = read_idx_source(fmnist_dir)
    train, test = select(splits.train, (1, 8), 300), select(splits.test, (1, 8), 200)  # trouser, bag
    return (to_model_range(train.images, 16), train.labels), (to_model_range(test.images, 16), test.labels)


def test_classifier_learns_a_task(two_classes):
    (x, y), (x_test, y_test) = two_classes
    torch.manual_seed(0)
    model = SolverCNN()
    cfg = ClassifierConfig(batch_size=32, lr=2e-3)
    rows = train_solver_task(model, None, x, y, None, 0, 40, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert len(rows) == 40 and all(r["loss_replay"] == 0 for r in rows)
    assert (classify(model.eval(), x_test) == y_test).float().mean() > 0.9


class FixedImages:
    def __init__(self, images):
        self.images, self.asked = images, []

    def get(self, step):
        self.asked.append(step)
        return self.images


def test_replay_loss_is_weighted_by_the_task(two_classes):
    (x, y), _ = two_classes
    torch.manual_seed(1)
    previous = SolverCNN().eval()
    model = SolverCNN()
    replay = FixedImages(torch.rand(32, 1, 16, 16) * 2 - 1)
    cfg = ClassifierConfig(batch_size=32)
    rows = train_solver_task(model, previous, x, y, replay, 3, 2, cfg, 0, torch.device("cpu"), progress=False)
    assert replay.asked == [0, 1]
    for row in rows:  # task 3: w = 1 - 1/4
        assert row["loss"] == pytest.approx(0.25 * row["loss_data"] + 0.75 * row["loss_replay"], rel=1e-5)
        assert row["loss_replay"] > 0


def test_classifier_config_is_validated():
    assert load_config(preset="smoke", overrides=["classifier.enabled=true"]).classifier.enabled
    with pytest.raises(ConfigError, match="classifier.strategy"):
        load_config(preset="smoke", overrides=["classifier.strategy=distill"])
    assert ClassifierConfig().resolved_strategy("gd") == "replay"
    assert ClassifierConfig().resolved_strategy("joint") == "joint"
    assert ClassifierConfig(strategy="finetune").resolved_strategy("gd") == "finetune"
