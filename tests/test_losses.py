import pytest
import torch

from distcl.losses import continual_loss, replay_weight


def fixed(shape, offset):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 10 + offset


def test_replay_weight():
    assert [replay_weight(k) for k in range(5)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75, 0.8])


def test_continual_loss_pinned():
    pred, eps = fixed((2, 1, 2, 2), 0.0), fixed((2, 1, 2, 2), 0.5)  # L_data = 0.25
    pred_r, target_r = fixed((2, 1, 2, 2), 1.0), fixed((2, 1, 2, 2), 0.0)  # MSE = 1.0
    loss, terms = continual_loss(pred, eps, pred_r, target_r, task=3, replay_lambda=3.0)
    assert float(terms["loss_data"]) == pytest.approx(0.25) and float(terms["loss_replay"]) == pytest.approx(3.0)
    assert loss.item() == pytest.approx(0.25 * 0.25 + 0.75 * 3.0)  # (1 - w) L_data + w lambda MSE, w = 3/4
    unweighted, _ = continual_loss(pred, eps, pred_r, target_r, task=3, replay_lambda=3.0, task_weighting=False)
    assert unweighted.item() == pytest.approx(0.25 + 3.0)
    first, _ = continual_loss(pred, eps, pred_r, target_r, task=0, replay_lambda=3.0)
    assert first.item() == pytest.approx(0.25)  # task 0: w = 0
    alone, terms = continual_loss(pred, eps, None, None, task=2, replay_lambda=3.0)
    assert alone.item() == pytest.approx(0.25) and float(terms["loss_replay"]) == 0.0


def test_continual_loss_gradients_reach_both_terms():
    pred = torch.zeros(2, 1, 2, 2, requires_grad=True)
    loss, _ = continual_loss(pred[:1], torch.ones(1, 1, 2, 2), pred[1:], torch.ones(1, 1, 2, 2), 1, 2.0)
    loss.backward()
    # d/dpred of (1-w) mean((p-1)^2) + w lambda mean((p-1)^2) with w = 1/2, 4 elements each
    assert pred.grad[0].flatten().tolist() == pytest.approx([0.5 * 2 * -1 / 4] * 4)
    assert pred.grad[1].flatten().tolist() == pytest.approx([0.5 * 2.0 * 2 * -1 / 4] * 4)
