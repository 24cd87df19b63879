"""The continual diffusion loss: data term plus lambda-weighted replay (distillation) term."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def replay_weight(task: int) -> float:
    """w = 1 - 1/(k+1): the share of the replay term at 0-based task k (0 at task 0, 0.8 at task 4)."""
    return 1.0 - 1.0 / (task + 1)


def continual_loss(
    pred_data: torch.Tensor,
    eps: torch.Tensor,
    pred_replay: Optional[torch.Tensor],
    target_replay: Optional[torch.Tensor],
    task: int,
    replay_lambda: float,
    task_weighting: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_data = MSE(pred_data, eps); L_replay = lambda * MSE(pred_replay, target_replay);
    L = (1 - w) L_data + w L_replay with w = 1 - 1/(k+1) (task_weighting), else L = L_data + L_replay;
    L = L_data when there is no replay. Returns L and its detached terms for logging (tensors on L's device: no
    host read here)."""
    loss_data = F.mse_loss(pred_data, eps)
    if pred_replay is None:
        zero = torch.zeros((), device=loss_data.device)
        return loss_data, {"loss": loss_data.detach(), "loss_data": loss_data.detach(), "loss_replay": zero}
    loss_replay = replay_lambda * F.mse_loss(pred_replay, target_replay)
    if task_weighting:
        w = replay_weight(task)
        loss = (1 - w) * loss_data + w * loss_replay
    else:
        loss = loss_data + loss_replay
    return loss, {"loss": loss.detach(), "loss_data": loss_data.detach(), "loss_replay": loss_replay.detach()}
