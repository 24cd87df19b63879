"""A continual task as a work item of the run's Ray Train worker group
(distcl.runtime.workers): worker r trains on data shard r with replay batches r, r+W, ... from the sampler
actors, DDP through ``prepare_model``; a checkpoint every ``runtime.checkpoint_every`` steps. The student's
starting weights come through the object store.
"""

from __future__ import annotations

import ray

from distcl.config import RunConfig
from distcl.data import DataStream
from distcl.models import build_scheduler, build_unet
from distcl.runtime.samplers import RemoteReplay
from distcl.runtime.stream import ShardStream, dataset_name
from distcl.runtime.workers import OptimisationItem, WorkItem
from distcl.seeding import noise_seed
from distcl.teachers import lwf_teacher
from distcl.training import make_optimizer, steps_per_task, train_task


def train_task_item(config: dict, item: WorkItem) -> dict:
    """Task k on this worker: ``config`` holds cfg, task, init (a ref to the starting state dict: the model after
    task k-1, or task 0's seeded initialisation), images (a ref; None for a streamed folder: its Dataset, read
    through ``get_dataset_shard``) and their count, samplers and teacher (``[ref]`` to the samplers'
    TeacherFiles). Returns the final state (distcl.runtime.workers.OptimisationItem)."""
    cfg: RunConfig = config["cfg"]
    k: int = config["task"]
    rank, world, device = item.rank, item.world, item.device
    init = ray.get(config["init"])
    student = build_unet(cfg.model, cfg.data.image_channels)
    student.load_state_dict(init)
    student.to(device)
    optimizer, ema = make_optimizer(student, cfg.train)
    per_worker, count = cfg.train.batch_size // world, config["count"]
    if config["images"] is not None:
        data = DataStream(ray.get(config["images"]), per_worker, cfg.seed, k, rank, world)
    else:
        shard = ray.train.get_dataset_shard(dataset_name(k))
        data = ShardStream(shard, count, per_worker, student.config.sample_size, cfg.seed, k, rank, world)
    steps = steps_per_task(count, cfg.train)
    teacher = lwf_teacher(cfg, init, device) if cfg.train.strategy == "lwf" and k > 0 else None
    replay = None
    if config["samplers"]:
        rt = cfg.runtime
        replay = RemoteReplay(
            config["samplers"], k, config["teacher"], rank, world, steps, rt.replay_depth, rt.replay_timeout_s
        )

    def describe(row: dict, seconds: float, done: int) -> str:
        items = done * 2 * per_worker * world  # data and replay items of all workers
        return f"loss {row['loss']:.4f}, {items / seconds:.0f} items/s, replay wait {row['replay_wait_s']:.3f}s"

    stateful = {"optimizer": optimizer, **({"ema": ema} if ema is not None else {})}
    task = OptimisationItem(item, f"task {k}", student, stateful, steps, cfg.runtime.checkpoint_every, describe)
    return task.run(
        lambda model, start, on_step: train_task(
            model,
            optimizer,
            data,
            replay,
            task=k,
            steps=steps,
            train_cfg=cfg.train,
            scheduler=build_scheduler(cfg.model),
            noise_seed=noise_seed(cfg.seed, k, rank),
            device=device,
            ema=ema,
            lwf_teacher=teacher,
            start_step=start,
            on_step=on_step,
            progress=False,
            precision=cfg.runtime.precision,
        )
    )
