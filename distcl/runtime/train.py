"""One task on Ray Train V2: worker r trains on data shard r with replay batches r, r+W, ... from the sampler
actors, DDP through ``prepare_model``; checkpoints every ``runtime.checkpoint_every`` steps and at the end.

    TorchTrainer(train_loop_per_worker, train_loop_config={cfg, task, ...},
                 scaling_config=ScalingConfig(num_workers=W, use_gpu=...),
                 run_config=RunConfig(name="task_<k>", storage_path=OUT/ray_train, failure_config=...))

Rerunning a task with the same name and storage path resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distcl.config import RunConfig as DistclConfig
from distcl.config import RuntimeConfig
from distcl.models import build_scheduler, build_unet, load_unet
from distcl.replay import Teacher
from distcl.runtime.samplers import RemoteReplay
from distcl.training import DataStream, make_optimizer, noise_seed, steps_per_task, train_task

STATE_FILE = "state.pt"
FAULT_ENV = "DISTCL_INJECT_WORKER_FAULT"  # "<task>:<step>:<marker file>": raise once there (fault tests)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def load_state(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> dict:
    """The state a ``report_state`` checkpoint holds."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)


def report_state(state: dict, metrics: dict, rank: int) -> None:
    """``ray.train.report`` on every worker (a barrier); rank 0 attaches ``state`` as the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> None:
    cfg: DistclConfig = config["cfg"]
    k: int = config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_worker)))
    device = ray.train.torch.get_device()
    init_dir: Optional[str] = config["init_dir"]
    if init_dir is None:
        torch.manual_seed(cfg.seed)
        student = build_unet(cfg.model).to(device)
    else:
        student = load_unet(Path(init_dir), cfg.model, device)
    optimizer, ema = make_optimizer(student, cfg.train)
    images = ray.get(config["images"])
    steps = steps_per_task(len(images), cfg.train)
    start_step, rows, recoveries = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_state(checkpoint, device)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step, rows, recoveries = state["step"] + 1, state["rows"], state["recoveries"]
        recoveries.append({"task": k, "resumed_at_step": start_step, "recovery_s": time.time() - state["time"]})
        if rank == 0:
            print(f"[distcl] task {k}: resumed at step {start_step} from checkpoint, "
                  f"{recoveries[-1]['recovery_s']:.1f}s after it was written", flush=True)  # fmt: skip
    model = ray.train.torch.prepare_model(student)
    worker_nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:  # every rank's node, in rank order (placement.json)
        worker_nodes = [None] * world
        torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    lwf_teacher = None
    if cfg.train.strategy == "lwf" and init_dir is not None:
        frozen = load_unet(Path(init_dir), cfg.model, device).eval().requires_grad_(False)
        lwf_teacher = Teacher(frozen, build_scheduler(cfg.model), cfg.train.teacher_steps, cfg.train.teacher_eta)
    per_worker = cfg.train.batch_size // world
    replay = None
    if config["samplers"]:
        rt = cfg.runtime
        replay = RemoteReplay(config["samplers"], k, init_dir, rank, world, steps, rt.replay_depth, rt.replay_timeout_s)
    fault = planned_fault(config["fault"], str(k))
    last_print = [time.perf_counter(), start_step]

    def state_at(step: int, logged: list[dict]) -> dict:
        return {
            "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "step": step, "rows": rows + logged,
            "recoveries": recoveries, "time": time.time(), "worker_nodes": worker_nodes,
        }  # fmt: skip

    def on_step(step: int, logged: list[dict]) -> None:
        inject_fault(fault, step, f"task {k}")
        if rank == 0 and logged and logged[-1]["step"] == step:
            now = time.perf_counter()
            items = (step + 1 - last_print[1]) * 2 * per_worker * world
            print(f"[distcl] task {k} step {step + 1}/{steps}: loss {logged[-1]['loss']:.4f}, "
                  f"{items / (now - last_print[0]):.0f} items/s, replay wait {logged[-1]['replay_wait_s']:.3f}s",
                  flush=True)  # fmt: skip
            last_print[:] = [now, step + 1]
        if (step + 1) % cfg.runtime.checkpoint_every == 0 and step < steps - 1:
            report_state(state_at(step, logged), {"task": k, "step": step}, rank)

    logged = train_task(
        model, optimizer, DataStream(images, per_worker, cfg.seed, k, rank, world), replay,
        task=k, steps=steps, train_cfg=cfg.train, scheduler=build_scheduler(cfg.model),
        noise_seed=noise_seed(cfg.seed, k, rank), device=device, ema=ema, lwf_teacher=lwf_teacher,
        start_step=start_step, on_step=on_step, progress=False,
    )  # fmt: skip
    report_state(state_at(steps - 1, logged), {"task": k, "step": steps - 1, "final": True}, rank)


def planned_fault(spec: Optional[str], where: str) -> Optional[tuple[int, str]]:
    """Parse ``$DISTCL_INJECT_WORKER_FAULT`` ("<where>:<step>:<marker file>"; where: a task index or a distillation
    unit's name) for ``where``."""
    if not spec:
        return None
    fault_where, step, marker = spec.split(":", 2)
    return (int(step), marker) if fault_where == where else None


def inject_fault(fault: Optional[tuple[int, str]], step: int, where: str) -> None:
    """Raise once at the planned step (the marker file records that it happened)."""
    if fault is not None and step == fault[0] and not os.path.exists(fault[1]):
        Path(fault[1]).touch()
        raise RuntimeError(f"injected fault at {where} step {step}")


def resolve_use_gpu(rt: RuntimeConfig) -> bool:
    """``runtime.use_gpu``; None: when the cluster has a GPU for every Train worker."""
    return rt.use_gpu if rt.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= rt.num_workers


def fit_state(loop: Callable[[dict], None], loop_config: dict, rt: RuntimeConfig, name: str, storage: Path,
              use_gpu: bool) -> dict:  # fmt: skip
    """Run ``loop`` on the ``rt`` layout of Train workers as the Train run ``name`` under ``storage`` (rerunning it
    resumes from its latest checkpoint); the final state rank 0 reported (raises the run's error)."""
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "fault": os.environ.get(FAULT_ENV)},
        scaling_config=ScalingConfig(
            num_workers=rt.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": rt.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                  **({rt.worker_resource: 1} if rt.worker_resource else {})},
        ),  # fmt: skip
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return load_state(result.checkpoint)


def fit_task(cfg: DistclConfig, k: int, init_dir: Optional[Path], images_ref, samplers: list, storage: Path,
             use_gpu: bool) -> dict:  # fmt: skip
    """Run task k on Ray Train and return the final state (model weights, logged rows, recoveries)."""
    config = {"cfg": cfg, "task": k, "init_dir": str(init_dir) if init_dir else None, "images": images_ref,
              "samplers": samplers}  # fmt: skip
    return fit_state(train_loop_per_worker, config, cfg.runtime, f"task_{k}", storage, use_gpu)
