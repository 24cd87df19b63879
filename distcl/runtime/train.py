"""A continual task (and the continual classifier's) as a work item of the run's Ray Train worker group
(distcl.runtime.workers): worker r trains on data shard r with replay batches r, r+W, ... from the sampler
actors, DDP through ``prepare_model``; a checkpoint every ``runtime.checkpoint_every`` steps. The student's
starting weights come through the object store.
"""
from __future__ import annotations

import time

import ray
import ray.train
import ray.train.torch
import torch

from distcl.config import RunConfig
from distcl.continual import train_classifier
from distcl.models import build_scheduler, build_unet
from distcl.replay import Teacher
from distcl.runtime.samplers import RemoteReplay, classifier_replay
from distcl.runtime.workers import WORKER_LOG, WorkItem
from distcl.training import DataStream, make_optimizer, noise_seed, steps_per_task, train_task


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_task_item(config: dict, item: WorkItem) -> dict:
    """Task k on this worker: ``config`` holds cfg, task, init (a ref to the starting state dict: the model after
    task k-1, or task 0's seeded initialisation), images (a ref), samplers and teacher (``[ref]`` to the samplers' TeacherFiles).
    Returns the final state: model weights, logged rows, recoveries, the workers' node ids."""
    cfg: RunConfig = config["cfg"]
    k: int = config["task"]
    rank, world, device = item.rank, item.world, item.device
    init = ray.get(config["init"])
    student = build_unet(cfg.model)
    student.load_state_dict(init)
    student.to(device)
    optimizer, ema = make_optimizer(student, cfg.train)
    images = ray.get(config["images"])
    steps = steps_per_task(len(images), cfg.train)
    start_step, rows, recoveries = 0, [], []
    if item.resume is not None:
        state = item.resume
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step, rows, recoveries = state["step"] + 1, state["rows"], state["recoveries"]
        recoveries.append({"task": k, "resumed_at_step": start_step, "recovery_s": time.time() - state["time"]})
        if rank == 0:
            WORKER_LOG.info(f"[distcl] task {k}: resumed at step {start_step} from checkpoint, "
                            f"{recoveries[-1]['recovery_s']:.1f}s after it was written")  # fmt: skip
    model = ray.train.torch.prepare_model(student, move_to_device=False)
    worker_nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:  # every rank's node, in rank order (placement.json)
        worker_nodes = [None] * world
        torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    lwf_teacher = None
    if cfg.train.strategy == "lwf" and k > 0:
        frozen = build_unet(cfg.model)
        frozen.load_state_dict(init)
        frozen = frozen.to(device).eval().requires_grad_(False)
        lwf_teacher = Teacher(frozen, build_scheduler(cfg.model), cfg.train.teacher_steps, cfg.train.teacher_eta)
    per_worker = cfg.train.batch_size // world
    replay = None
    if config["samplers"]:
        rt = cfg.runtime
        replay = RemoteReplay(config["samplers"], k, config["teacher"], rank, world, steps, rt.replay_depth,
                              rt.replay_timeout_s)  # fmt: skip
    last_print = [time.perf_counter(), start_step]

    def state_at(step: int, logged: list[dict]) -> dict:
        return {
            "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "step": step, "rows": rows + logged,
            "recoveries": recoveries, "time": time.time(), "worker_nodes": worker_nodes,
        }  # fmt: skip

    def on_step(step: int, logged: list[dict]) -> None:
        item.inject_fault(step)
        if rank == 0 and logged and logged[-1]["step"] == step:
            now = time.perf_counter()
            items = (step + 1 - last_print[1]) * 2 * per_worker * world
            WORKER_LOG.info(f"[distcl] task {k} step {step + 1}/{steps}: loss {logged[-1]['loss']:.4f}, "
                            f"{items / (now - last_print[0]):.0f} items/s, "
                            f"replay wait {logged[-1]['replay_wait_s']:.3f}s")  # fmt: skip
            last_print[:] = [now, step + 1]
        if (step + 1) % cfg.runtime.checkpoint_every == 0 and step < steps - 1:
            item.checkpoint(state_at(step, logged), {"task": k, "step": step})

    logged = train_task(
        model, optimizer, DataStream(images, per_worker, cfg.seed, k, rank, world), replay,
        task=k, steps=steps, train_cfg=cfg.train, scheduler=build_scheduler(cfg.model),
        noise_seed=noise_seed(cfg.seed, k, rank), device=device, ema=ema, lwf_teacher=lwf_teacher,
        start_step=start_step, on_step=on_step, progress=False, precision=cfg.runtime.precision,
    )  # fmt: skip
    return state_at(steps - 1, logged)


def classifier_task_item(config: dict, item: WorkItem) -> dict:
    """The continual classifier's task as a work item: ``config`` holds spec (a distcl.continual.ClassifierSpec),
    samplers and teacher (``[ref]``, or None without replay). Rank 0 trains the small CNN, its replay images
    from the sampler actors; the other ranks only meet it at the item's final report."""
    if item.rank != 0:
        return {}
    spec = config["spec"]
    replay = None
    if config["teacher"] is not None:
        replay = classifier_replay(config["samplers"], spec.cfg, spec.task, config["teacher"], spec.steps)
    weights, rows = train_classifier(spec, replay, item.device)
    return {"weights": weights, "rows": rows}
