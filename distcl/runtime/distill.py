"""A distillation unit (a PD stage, the PID student) as a work item of a Ray Train worker group
(distcl.runtime.workers): W workers, DDP, each on its rows of every step's batch (distcl.distill); a checkpoint
every ``runtime.checkpoint_every`` steps, and rerunning resumes an unfinished unit from its latest one.

    distill(method, teacher, out, cfg, fit=RayDistillFit(runtime))    # its own worker group, under OUT/ray_train
    RayDistillFit(runtime, group)                                     # a continual run's group (fast replay samplers)
"""

from __future__ import annotations

from typing import Optional

import ray
import torch

from distcl.config import RuntimeConfig, check_worker_split
from distcl.distill import UnitSpec
from distcl.runtime.cluster import join_cluster
from distcl.runtime.workers import OptimisationItem, WorkerGroup, WorkItem
from distcl.training import DistillUnit, optimise

PRINT_EVERY_S = 10.0


def distill_unit_item(config: dict, item: WorkItem) -> dict:
    """The unit ``config["spec"]`` on this worker (its rows of every step's batch); returns the final state
    (distcl.runtime.workers.OptimisationItem). The losses, averaged over the workers, are read on the host at the
    checkpoints and the last step; a line at most every PRINT_EVERY_S."""
    spec: UnitSpec = config["spec"]
    world = item.world
    images = ray.get(config["images"]) if config["images"] is not None else None
    unit = spec.build(item.device, images)
    optimizer = torch.optim.Adam(unit.model.parameters(), lr=unit.lr)
    every = config["checkpoint_every"]

    def describe(row: dict, seconds: float, done: int) -> Optional[str]:
        last = row["step"] == unit.iterations - 1
        return f"loss {row['loss']:.4f}" if seconds > PRINT_EVERY_S or last else None

    def mean_over_workers(loss: torch.Tensor) -> torch.Tensor:
        if world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
        return loss / world

    shard = slice(item.rank, None, world)
    work = OptimisationItem(
        item, f"{spec.method} {spec.name}", unit.model, {"optimizer": optimizer}, unit.iterations, every, describe
    )
    return work.run(
        lambda model, start, on_step: optimise(
            model,
            optimizer,
            lambda step: {"loss": unit.loss(model, step, shard)},
            unit.iterations,
            start=start,
            grad_clip=1.0,
            read_every=every,
            reduce=mean_over_workers,
            on_step=on_step,
            progress=False,
            desc=f"{spec.method} {spec.name}",
        )
    )


class RayDistillFit:
    """A distcl.distill ``Fit`` on Ray Train with the ``runtime`` layout (num_workers, cpus_per_worker, use_gpu,
    checkpoint_every, max_failures, address / num_cpus of the cluster): on ``group`` when given (a continual
    run's), else on a worker group of its own under the first unit's OUT/ray_train, started on first use."""

    def __init__(self, runtime: RuntimeConfig, group: Optional[WorkerGroup] = None):
        self.runtime, self.group, self.own = runtime, group, group is None

    def check(self, batch_size: int) -> None:
        check_worker_split(batch_size, self.runtime.num_workers, "batch_size")

    def __call__(
        self, spec: UnitSpec, images: Optional[torch.Tensor], progress: bool
    ) -> tuple[DistillUnit, list[dict]]:
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
