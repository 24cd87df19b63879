"""A distillation unit (a PD stage, the PID student) as a work item of a Ray Train worker group
(distcl.runtime.workers): W workers, DDP, each on its rows of every step's batch (distcl.distill); a checkpoint
every ``runtime.checkpoint_every`` steps, and rerunning resumes an unfinished unit from its latest one.

    distill(method, teacher, out, cfg, fit=RayDistillFit(runtime))    # its own worker group, under OUT/ray_train
    RayDistillFit(runtime, group)                                     # a continual run's group (fast replay samplers)
"""
from __future__ import annotations

import time
from typing import Optional

import ray
import ray.train.torch
import torch

from distcl.config import RuntimeConfig, check_worker_split
from distcl.distill import UnitSpec
from distcl.runtime.cluster import join_cluster
from distcl.runtime.workers import WORKER_LOG, WorkerGroup, WorkItem
from distcl.training import DistillUnit, optimise

PRINT_EVERY_S = 10.0


def distill_unit_item(config: dict, item: WorkItem) -> dict:
    """The unit ``config["spec"]`` on this worker; returns the final state (rank 0: weights and logged rows)."""
    spec: UnitSpec = config["spec"]
    rank, world = item.rank, item.world
    images = ray.get(config["images"]) if config["images"] is not None else None
    unit = spec.build(item.device, images)
    optimizer = torch.optim.Adam(unit.model.parameters(), lr=unit.lr)
    start, rows = 0, []
    if item.resume is not None:
        unit.model.load_state_dict(item.resume["model"])
        optimizer.load_state_dict(item.resume["optimizer"])
        start, rows = item.resume["step"] + 1, item.resume["rows"]
        if rank == 0:
            WORKER_LOG.info(f"[distcl] {spec.method} {spec.name}: resumed at step {start} from checkpoint")
    model = ray.train.torch.prepare_model(unit.model, move_to_device=False)
    shard = slice(rank, None, world)
    last_print = [time.perf_counter()]

    def state_at(step: int, logged: list[dict]) -> dict:
        return {"model": unit.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rows": rows + logged} if rank == 0 else {}  # fmt: skip

    every = config["checkpoint_every"]  # the losses are read on the host at the checkpoints (and the last step)

    def on_step(step: int, logged: list[dict]) -> None:
        item.inject_fault(step)
        read = bool(logged) and logged[-1]["iteration"] == step  # optimise read the losses at this step
        if rank == 0 and read and (time.perf_counter() - last_print[0] > PRINT_EVERY_S or step == unit.iterations - 1):
            WORKER_LOG.info(f"[distcl] {spec.method} {spec.name} step {step + 1}/{unit.iterations}: "
                            f"loss {logged[-1]['loss']:.4f}")  # fmt: skip
            last_print[0] = time.perf_counter()
        if (step + 1) % every == 0 and step < unit.iterations - 1:
            item.checkpoint(state_at(step, logged), {"step": step, "loss": logged[-1]["loss"]})

    def mean_over_workers(loss: torch.Tensor) -> torch.Tensor:
        if world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
        return loss / world

    logged = optimise(model, optimizer, lambda step: unit.loss(model, step, shard), unit.iterations, start,
                      on_step=on_step, progress=False, loss_value=mean_over_workers, read_every=every)  # fmt: skip
    return state_at(unit.iterations - 1, logged)


class RayDistillFit:
    """A distcl.distill ``Fit`` on Ray Train with the ``runtime`` layout (num_workers, cpus_per_worker, use_gpu,
    checkpoint_every, max_failures, address / num_cpus of the cluster): on ``group`` when given (a continual
    run's), else on a worker group of its own under the first unit's OUT/ray_train, started on first use."""

    def __init__(self, runtime: RuntimeConfig, group: Optional[WorkerGroup] = None):
        self.runtime, self.group, self.own = runtime, group, group is None

    def check(self, batch_size: int) -> None:
        check_worker_split(batch_size, self.runtime.num_workers, "batch_size")

    def __call__(self, spec: UnitSpec, images: Optional[torch.Tensor], progress: bool) -> tuple[DistillUnit, list[dict]]:
        rt = self.runtime
        self.check(spec.cfg.batch_size)
        if self.group is None:
            join_cluster(rt, rt.num_workers * rt.cpus_per_worker)
            self.group = WorkerGroup(rt, spec.out / "ray_train")
        images_ref = ray.put(images) if images is not None else None
        config = {"spec": spec, "images": images_ref, "checkpoint_every": rt.checkpoint_every}
        state = self.group.run(str(spec.output), distill_unit_item, config)  # the output: unique and stable
        unit = spec.build("cpu", images)
        unit.model.load_state_dict(state["model"])
        return unit, state["rows"]

    def close(self) -> None:
        """Stop the worker group this fit started (a continual run's own group is closed by the run)."""
        if self.own and self.group is not None:
            self.group.close()
            self.group = None
