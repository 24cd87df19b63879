"""The run's Ray Train worker group: one TorchTrainer, started once, serves a sequence of work items (the tasks of
a continual run, the distillation units of a fast replay sampler or of ``distcl distill``).

    group = WorkerGroup(runtime, storage=OUT/ray_train)       # TorchTrainer.fit() in a driver thread
    state = group.run("task_1", train_task_item, {...})       # every worker runs the item; rank 0's final state
    group.close()

The driver posts an item to a small ``WorkChannel`` actor; every worker takes it, runs
``item_fn(config, item) -> state``, reports the final state as a Train checkpoint and rank 0 hands it back through
the channel. Mid-item checkpoints (``item.checkpoint``) carry the item's name, so a restarted worker group
(``FailureConfig``) or a rerun driver (the same Train run name and storage path) resumes the item where its last
checkpoint left it, and an item whose final checkpoint was written is not run again.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distcl.config import RuntimeConfig
from distcl.console import time_left
from distcl.devices import configure_numerics
from distcl.runtime.channel import WorkChannel
from distcl.runtime.cluster import HEAD_RESOURCE, cluster_capacity
from distcl.runtime.stream import ingest_options

STATE_FILE = "state.pt"
TRAIN_RUN = "workers"  # the Train run's name under its storage path (stable: a rerun resumes it)
FAULT_ENV = "DISTCL_INJECT_WORKER_FAULT"  # "<item>:<step>:<marker file>": raise once there (fault tests)
# Progress of rank 0. Ray Train sends a worker's log records to the driver's console once (a print there is
# also re-logged by Train: it would show twice).
WORKER_LOG = logging.getLogger("distcl.worker")
# How often Ray Train's controller polls its workers (Ray's default: 2 s). A worker's ``ray.train.report`` waits
# for the poll that takes its previous report, and the run ends at a poll: measured here, every item after the
# first returned 2.0 s after it ended and the group closed in 5 s; at 0.25 s, 0.2 s and 1.6 s.
# $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, when set, wins (Ray Train passes it on to its controller).
TRAIN_POLL_S = "0.25"
# How long Ray Train waits for its workers' resources before it fails the start (Ray's default: 60 s). An
# autoscaler takes minutes to start a cloud node (seconds on a local twin); a layout no node type can hold is
# refused before (pipeline.check_layout). $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, when set, wins.
NODE_START_S = "900"


@dataclass
class WorkItem:
    """What an item function gets besides its config: the worker's place, the state to resume from (the item's
    last mid-item checkpoint, or None) and the checkpoint / fault hooks."""

    name: str
    rank: int
    world: int
    device: torch.device
    resume: Optional[dict]
    fault: Optional[tuple[int, str]]

    def checkpoint(self, state: dict, metrics: dict) -> None:
        """A mid-item checkpoint: every worker calls it at the same steps (``ray.train.report`` is a barrier)."""
        report_state({**state, "item": self.name, "final": False}, {"item": self.name, **metrics}, self.rank)

    def inject_fault(self, step: int) -> None:
        """Raise once at the planned step of this item (the marker file records that it happened)."""
        if self.fault is not None and step == self.fault[0] and not os.path.exists(self.fault[1]):
            Path(self.fault[1]).touch()
            raise RuntimeError(f"injected fault at {self.name} step {step}")


class OptimisationItem:
    """The skeleton of a work item that optimises a model on every Train worker (a continual task, a distillation
    unit, named ``label`` in its lines). ``run(fit)`` resumes the model, ``stateful`` (optimizer, EMA: objects
    with ``state_dict`` / ``load_state_dict``), the step and the rows from the item's last checkpoint, wraps the
    model for DDP (``prepare_model``) and calls ``fit(model, start, on_step)`` (a distcl.training loop). After
    each step: the planned fault; on rank 0, for a row just read, the line ``describe(row, seconds, steps)``
    (since the last line; None: no line) with the elapsed and remaining time (distcl.console.time_left); a
    checkpoint of all workers every ``checkpoint_every`` steps. The final state (rank 0's; {} elsewhere) holds
    the model, the stateful objects, step, rows, recoveries (resumed step, seconds after the checkpoint) and the
    workers' node ids in rank order."""

    def __init__(
        self,
        item: WorkItem,
        label: str,
        model: torch.nn.Module,
        stateful: dict,
        steps: int,
        checkpoint_every: int,
        describe: Callable[[dict, float, int], Optional[str]],
    ):
        self.item, self.label, self.model, self.stateful, self.steps = item, label, model, stateful, steps
        self.checkpoint_every, self.describe = checkpoint_every, describe
        self.start, self.rows, self.recoveries = 0, [], []
        if item.resume is not None:
            model.load_state_dict(item.resume["model"])
            for name, obj in stateful.items():
                obj.load_state_dict(item.resume[name])  # (an optimizer's state follows its parameters' device)
                if hasattr(obj, "to"):  # diffusers' EMAModel keeps the checkpoint's CPU tensors
                    obj.to(item.device)
            self.start, self.rows = item.resume["step"] + 1, item.resume["rows"]
            self.recoveries = item.resume["recoveries"] + [
                {"resumed_at_step": self.start, "recovery_s": time.time() - item.resume["time"]}
            ]
            if item.rank == 0:
                WORKER_LOG.info(
                    f"[distcl] {label}: resumed at step {self.start} from checkpoint, "
                    f"{self.recoveries[-1]['recovery_s']:.1f}s after it was written"
                )
        self.worker_nodes = [ray.get_runtime_context().get_node_id()]
        if item.world > 1:
            self.worker_nodes = [None] * item.world
            torch.distributed.all_gather_object(self.worker_nodes, self.worker_nodes[0])
        self.began = time.perf_counter()
        self.last_line = (self.began, self.start)

    def run(self, fit: Callable[[torch.nn.Module, int, Callable[[int, list[dict]], None]], list[dict]]) -> dict:
        wrapped = ray.train.torch.prepare_model(self.model, move_to_device=False)
        return self.state(self.steps - 1, fit(wrapped, self.start, self.on_step))

    def on_step(self, step: int, logged: list[dict]) -> None:
        self.item.inject_fault(step)
        if self.item.rank == 0 and logged and logged[-1]["step"] == step:
            began, first = self.last_line
            line = self.describe(logged[-1], time.perf_counter() - began, step + 1 - first)
            if line is not None:
                clock = time_left(time.perf_counter() - self.began, step + 1 - self.start, self.steps - step - 1)
                WORKER_LOG.info(f"[distcl] {self.label} step {step + 1}/{self.steps}: {line}, {clock}")
                self.last_line = (time.perf_counter(), step + 1)
        if (step + 1) % self.checkpoint_every == 0 and step < self.steps - 1:
            self.item.checkpoint(self.state(step, logged), {"step": step})

    def state(self, step: int, logged: list[dict]) -> dict:
        if self.item.rank != 0:
            return {}
        return {
            "model": self.model.state_dict(),
            **{n: o.state_dict() for n, o in self.stateful.items()},
            "step": step,
            "rows": self.rows + logged,
            "recoveries": self.recoveries,
            "time": time.time(),
            "worker_nodes": self.worker_nodes,
        }


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


def planned_fault(spec: Optional[str], name: str) -> Optional[tuple[int, str]]:
    """Parse ``$DISTCL_INJECT_WORKER_FAULT`` ("<item name>:<step>:<marker file>") for item ``name``."""
    if not spec:
        return None
    where, step, marker = spec.rsplit(":", 2)
    return (int(step), marker) if where == name else None


def worker_loop(config: dict) -> None:
    """Every Train worker: take the channel's items in turn until it closes."""
    channel = config["channel"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    configure_numerics(*config["numerics"])
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    restored = load_state(checkpoint) if checkpoint is not None else None  # only for the first item taken
    seq = -1
    while (item := ray.get(channel.next.remote(seq))) is not None:
        seq, name, (payload,) = item
        fn, item_config = ray.get(payload)
        resume = restored if restored is not None and restored["item"] == name else None
        restored = None
        if resume is not None and resume["final"]:
            state = resume
        else:
            work = WorkItem(name, rank, world, device, resume, planned_fault(config["fault"], name))
            state = fn(item_config, work)
            report_state({**state, "item": name, "final": True}, {"item": name, "final": True}, rank)
        if rank == 0:
            ray.get(channel.finish.remote(seq, pickle.dumps(state)))


def resolve_use_gpu(rt: RuntimeConfig, cluster_gpus: float, sampler_gpus: float = 0.0) -> bool:
    """``runtime.use_gpu``; None: when the cluster's GPUs hold the Train workers' (``gpus_per_worker`` each) beside
    ``sampler_gpus`` held by the sampler actors."""
    if rt.use_gpu is not None:
        return rt.use_gpu
    return cluster_gpus > 0 and cluster_gpus + 1e-9 >= rt.num_workers * rt.gpus_per_worker + sampler_gpus


def worker_resources(rt: RuntimeConfig, use_gpu: bool) -> dict[str, float]:
    """What one Train worker asks Ray for: ``cpus_per_worker``, with ``use_gpu`` ``gpus_per_worker``, and one unit
    of ``worker_resource``."""
    return {
        "CPU": rt.cpus_per_worker,
        **({"GPU": rt.gpus_per_worker} if use_gpu else {}),
        **({rt.worker_resource: 1} if rt.worker_resource else {}),
    }


class WorkerGroup:
    """``runtime.num_workers`` Train workers for a whole run: ``run(name, fn, config)`` runs one item on all of them
    and returns rank 0's final state. Its Train run lives under ``storage`` (rerunning resumes it). ``datasets``
    (Ray Data, by name: a streamed folder's tasks) reach the items through ``ray.train.get_dataset_shard``."""

    def __init__(self, rt: RuntimeConfig, storage: Path, poll_s: float = 1.0, datasets: Optional[dict] = None):
        self.poll_s = poll_s
        self.storage = Path(storage).resolve()
        # outside any placement group of the caller (a Tune trial's), like the samplers; on the head, which no
        # autoscaler removes (a node that holds only 0-CPU actors is idle to it)
        self.channel = WorkChannel.options(
            resources={HEAD_RESOURCE: 0.001}, scheduling_strategy=PlacementGroupSchedulingStrategy(None)
        ).remote()
        use_gpu = resolve_use_gpu(rt, cluster_capacity().total.get("GPU", 0))  # a continual run decided it already
        self.trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "channel": self.channel,
                "threads": rt.threads("worker"),
                "numerics": (rt.precision, rt.deterministic),
                "fault": os.environ.get(FAULT_ENV),
            },
            scaling_config=ScalingConfig(
                num_workers=rt.num_workers, use_gpu=use_gpu, resources_per_worker=worker_resources(rt, use_gpu)
            ),
            datasets=datasets,
            dataset_config=DataConfig(execution_options=ingest_options()) if datasets else None,
            run_config=RunConfig(
                name=TRAIN_RUN,
                storage_path=str(self.storage),
                failure_config=FailureConfig(max_failures=rt.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # Ray Train's INFO lines (checkpoints, reports, worker group start) stay in its log files
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        self.error: Optional[BaseException] = None
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)  # read by fit(), in the thread
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", NODE_START_S)
        self.thread = threading.Thread(target=self._fit, name="distcl-train", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            result = self.trainer.fit()
            self.error = result.error
        except BaseException as err:  # noqa: BLE001 - handed to the waiting driver thread
            self.error = err

    def run(self, name: str, fn: Callable[[dict, WorkItem], dict], config: dict) -> dict:
        """Run item ``name`` (its checkpoints carry the name: keep it stable across reruns); raises RuntimeError
        when the worker group fails (after ``runtime.max_failures`` restarts)."""
        payload = ray.put((fn, config))  # held here until the item's result is back
        result = self.channel.result.remote(ray.get(self.channel.post.remote(name, [payload])))
        while not ray.wait([result], timeout=self.poll_s)[0]:
            if not self.thread.is_alive():
                raise RuntimeError(f"{name} failed on Ray Train (nothing saved for it): {self.error}")
        return pickle.loads(ray.get(result))

    def close(self) -> None:
        """End the workers' loop and the Train run (an error of the run is raised by ``run``)."""
        ray.get(self.channel.close.remote())
        self.thread.join()
        ray.kill(self.channel)
