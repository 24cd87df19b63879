"""A distillation unit (a PD stage, the PID student) on Ray Train: W workers, DDP, each on its rows of every
step's batch (distcl.distill); a checkpoint every ``runtime.checkpoint_every`` steps, and rerunning the unit with
the same OUT resumes from the latest one (its Train run is OUT/ray_train/<unit>).

    distill(method, teacher, out, cfg, fit=RayDistillFit(runtime))
"""
from __future__ import annotations

import time
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import TrainingFailedError

from distcl.config import ConfigError, RuntimeConfig
from distcl.distill import UnitSpec
from distcl.runtime.cluster import join_cluster
from distcl.runtime.train import fit_state, inject_fault, load_state, planned_fault, report_state, resolve_use_gpu
from distcl.training import DistillUnit, optimise

PRINT_EVERY_S = 10.0


def train_loop_per_worker(config: dict) -> None:
    spec: UnitSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    images = ray.get(config["images"]) if config["images"] is not None else None
    unit = spec.build(ray.train.torch.get_device(), images)
    optimizer = torch.optim.Adam(unit.model.parameters(), lr=unit.lr)
    start, rows = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_state(checkpoint)
        unit.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, rows = state["step"] + 1, state["rows"]
        if rank == 0:
            print(f"[distcl] {spec.method} {spec.name}: resumed at step {start} from checkpoint", flush=True)
    model = ray.train.torch.prepare_model(unit.model)
    shard = slice(rank, None, world)
    every = config["checkpoint_every"]
    last_print = [time.perf_counter()]

    def report(step: int, logged: list[dict], final: bool = False) -> None:
        every_row = rows + logged
        state = {"model": unit.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "rows": every_row} if rank == 0 else {}  # fmt: skip
        report_state(state, {"step": step, "loss": every_row[-1]["loss"], "final": final}, rank)

    fault = planned_fault(config["fault"], spec.name)

    def on_step(step: int, logged: list[dict]) -> None:
        inject_fault(fault, step, spec.name)
        if rank == 0 and (time.perf_counter() - last_print[0] > PRINT_EVERY_S or step == unit.iterations - 1):
            print(f"[distcl] {spec.method} {spec.name} step {step + 1}/{unit.iterations}: "
                  f"loss {logged[-1]['loss']:.4f}", flush=True)  # fmt: skip
            last_print[0] = time.perf_counter()
        if (step + 1) % every == 0 and step < unit.iterations - 1:
            report(step, logged)

    def mean_over_workers(loss: torch.Tensor) -> float:
        if world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
        return loss.item() / world

    logged = optimise(model, optimizer, lambda step: unit.loss(model, step, shard), unit.iterations, start,
                      on_step=on_step, progress=False, logged_loss=mean_over_workers)  # fmt: skip
    report(unit.iterations - 1, logged, final=True)


class RayDistillFit:
    """A distcl.distill ``Fit`` on Ray Train with the ``runtime`` layout (num_workers, cpus_per_worker, use_gpu,
    checkpoint_every, max_failures, address / num_cpus of the cluster)."""

    def __init__(self, runtime: RuntimeConfig):
        runtime.validate()
        self.runtime = runtime

    def check(self, batch_size: int) -> None:
        workers = self.runtime.num_workers
        if batch_size % workers:
            raise ConfigError("batch_size", f"{batch_size} does not split into {workers} equal worker shards "
                                            f"(allowed: a multiple of runtime.num_workers={workers})")  # fmt: skip

    def __call__(self, spec: UnitSpec, images: Optional[torch.Tensor], progress: bool) -> tuple[DistillUnit, list[dict]]:
        rt = self.runtime
        self.check(spec.cfg.batch_size)
        join_cluster(rt, rt.num_workers * rt.cpus_per_worker)
        images_ref = ray.put(images) if images is not None else None
        config = {"spec": spec, "images": images_ref, "threads": rt.cpus_per_worker,
                  "checkpoint_every": rt.checkpoint_every}  # fmt: skip
        try:
            state = fit_state(train_loop_per_worker, config, rt, spec.name, spec.out / "ray_train", resolve_use_gpu(rt))
        except TrainingFailedError as err:
            raise RuntimeError(f"{spec.method} {spec.name} failed on Ray Train (nothing saved for it): {err}") from err
        unit = spec.build("cpu", images)
        unit.model.load_state_dict(state["model"])
        return unit, state["rows"]
