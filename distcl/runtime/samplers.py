"""Teacher sampler actors: each loads teacher k-1 (with its fast replay sampler, if any) from its checkpoint files,
which come through the object store, and answers ``make(k, teacher, index)`` with replay batch ``index`` of
task k (inputs, timesteps and targets), so the trainer runs no teacher forward at all; after each task they
train the continual classifier (``train_classifier``, on its own thread: its replay images come from every actor,
this one too) and evaluate the task's model (``evaluate``: chunks of distcl.evaluation's job), while the Train
workers go on with the next task. That after-task work runs on threads of its own at a lower CPU priority, so a
replay request is answered at once (not after the evaluation chunks queued before it) and the after-task work
takes the time replay leaves.

Batch ``index`` depends only on (run seed, k, index): the result is the same for any number of actors. An actor
that dies is restarted by Ray (``max_restarts`` times) and its in-flight calls are retried until it is back
(``max_task_retries=-1``: a lost node is noticed only after missed heartbeats, and every failed connection
meanwhile would spend a bounded retry); a replay batch is waited for at most ``runtime.replay_timeout_s``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Callable, Iterator, Optional, TypeVar

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distcl.backend import ClassifierSpec, train_classifier
from distcl.config import RunConfig
from distcl.devices import configure_numerics
from distcl.evaluation import ChunkResult, EvalChunk, EvalJob, EvalWorker
from distcl.replay import ReplayBatch, Teacher, indexed_replay, replay_index
from distcl.solver import replay_images

T = TypeVar("T")
ACTOR_RESTARTS = 4
TEACHERS_KEPT = 2  # teacher k for task k+1's replay, k-1 for the classifier of task k trained meanwhile
EVAL_DEPTH = 2  # evaluation chunks in flight per actor (on their own thread: replay does not wait for them)
# How much lower the after-task threads' CPU priority is than replay's (nice; Linux sets it per thread). Without
# it the first replay batch of every task waited for the evaluation chunks of the task before: measured on 2
# cores, 1.8 s a task on the smoke preset, 7.8 and 8.3 s on the cpu preset (0.2 to 0.6 s with it).
AFTER_TASK_NICE = 10
_after_task = threading.local()


def yield_to_replay() -> None:
    """Lower this thread's CPU priority by AFTER_TASK_NICE (once per thread; Linux only: elsewhere nice is the
    whole process's)."""
    if sys.platform != "linux" or getattr(_after_task, "niced", False):
        return
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + AFTER_TASK_NICE))
    _after_task.niced = True


def kept_teacher(cache: dict, key, make: Callable[[], T]) -> T:
    """``cache[key]``, made by ``make()`` when missing; only the TEACHERS_KEPT most recently used stay."""
    value = cache.pop(key) if key in cache else make()
    cache[key] = value  # the most recent last
    while len(cache) > TEACHERS_KEPT:
        cache.pop(next(iter(cache)))
    return value


@ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=-1, concurrency_groups={"classifier": 1, "evaluation": 1})
class TeacherSampler:
    """One replay-making process. Requests are self-describing (task, teacher, index), the loaded teachers only a
    cache: a restarted actor, or one moved on to the next task, answers every request right."""

    def __init__(self, cfg: RunConfig, batch_size: int, threads: int):
        torch.set_num_threads(threads)
        configure_numerics(cfg.runtime.precision, cfg.runtime.deterministic)
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.cfg, self.batch_size = cfg, batch_size
        self.teachers: dict[str, Teacher] = {}  # by ref, the last TEACHERS_KEPT used
        self.eval_worker, self.eval_job, self.eval_key = EvalWorker(self.device), None, None

    def _teacher(self, teacher: list) -> Teacher:
        """``teacher[0]``: a ref to the teacher's distcl.teachers.TeacherFiles, fetched once per teacher."""
        return kept_teacher(self.teachers, teacher[0].hex(), lambda: ray.get(teacher[0]).load(self.cfg, self.device))

    def make(self, task: int, teacher: list, index: int) -> ReplayBatch:
        """Replay batch ``index`` of task ``task`` from ``teacher`` (CPU tensors)."""
        batch = indexed_replay(
            self._teacher(teacher), self.cfg.train.strategy, self.batch_size, self.cfg.seed, task, index
        )
        return batch.to("cpu")

    def images(self, task: int, teacher: list, index: int, n: int, steps: int, eta: float) -> torch.Tensor:
        """The classifier's replay image batch ``index`` of task ``task`` (distcl.solver.replay_images)."""
        loaded = self._teacher(teacher)
        return replay_images(loaded.unet, loaded.scheduler, n, steps, eta, self.cfg.seed, task, index)

    @ray.method(concurrency_group="classifier")
    def train_classifier(self, spec: ClassifierSpec, actors: list, teacher: Optional[list]) -> tuple[dict, list]:
        """The continual classifier's task (distcl.backend.train_classifier) on this actor's device, its replay
        images (with ``teacher``, ``[ref]`` to the generator of task k-1) made by ``actors``."""
        yield_to_replay()
        replay = None if teacher is None else classifier_replay(actors, self.cfg, spec.task, teacher, spec.steps)
        return train_classifier(spec, replay, self.device)

    @ray.method(concurrency_group="evaluation")
    def evaluate(self, job_ref: list, chunk: EvalChunk) -> ChunkResult:
        """A chunk of the evaluation job in ``job_ref[0]`` (fetched once per job)."""
        yield_to_replay()
        key = job_ref[0].hex()
        if self.eval_key != key:
            self.eval_job, self.eval_key = ray.get(job_ref[0]), key
        return self.eval_worker.run(self.eval_job, chunk)

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}


def sampler_resources(rt) -> dict[str, float]:
    """What one sampler actor asks Ray for: ``sampler_cpus``, ``sampler_gpus`` and one unit of
    ``sampler_resource``."""
    return {"CPU": rt.sampler_cpus, "GPU": rt.sampler_gpus, **({rt.sampler_resource: 1} if rt.sampler_resource else {})}


class SamplerPool:
    """``runtime.num_samplers`` TeacherSampler actors for the whole run (started once, not per task)."""

    def __init__(self, cfg, batch_size: int):
        rt = cfg.runtime
        custom = sampler_resources(rt)
        # outside any placement group of the caller (a Tune trial's): the samplers ask the cluster themselves
        options = dict(
            num_cpus=custom.pop("CPU"),
            num_gpus=custom.pop("GPU"),
            resources=custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        )
        self.actors = [
            TeacherSampler.options(**options).remote(cfg, batch_size, rt.threads("sampler"))
            for _ in range(rt.num_samplers)
        ]

    def evaluate(self, job: EvalJob) -> Iterator[ChunkResult]:
        """The job's chunks spread over the actors, as they finish, at most EVAL_DEPTH in flight per actor (an
        actor asks for another when one ends). The job goes to the object store once; only features, labels and
        the grid's samples come back."""
        job_ref = [ray.put(job)]  # in a list: an actor fetches it once, not with every call
        chunks, pending = iter(job.chunks()), {}

        def submit(actor) -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending[actor.evaluate.remote(job_ref, chunk)] = actor

        for _ in range(EVAL_DEPTH):
            for actor in self.actors:
                submit(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            submit(actor)
            yield ray.get(ready[0])

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


class RemoteReplay:
    """Worker ``rank``'s replay stream from ``teacher`` (``[ref]`` to its TeacherFiles): batch index =
    step * world + rank, asked of actor index % n (its ``method``: ``make`` for replay batches, ``images`` with
    ``extra`` = (n, steps, eta) for the classifier's images).
    At most ``depth`` requests are in flight (Ray's "limit pending tasks" pattern); ``get`` waits for its own."""

    def __init__(
        self,
        actors: list,
        task: int,
        teacher: list,
        rank: int,
        world: int,
        steps: int,
        depth: int,
        timeout_s: float,
        method: str = "make",
        extra: tuple = (),
    ):
        self.method, self.extra = method, extra
        self.actors, self.task, self.teacher = actors, task, teacher
        self.rank, self.world, self.steps = rank, world, steps
        self.depth, self.timeout_s = depth, timeout_s
        self.pending: dict[int, ray.ObjectRef] = {}
        self.next_step: Optional[int] = None

    def _submit(self, step: int) -> None:
        index = replay_index(step, self.rank, self.world)
        actor = self.actors[index % len(self.actors)]
        self.pending[step] = getattr(actor, self.method).remote(self.task, self.teacher, index, *self.extra)

    def get(self, step: int) -> ReplayBatch:
        if self.next_step is None or step not in self.pending and step >= self.next_step:
            self.next_step = step
        while self.next_step < min(step + self.depth, self.steps):
            self._submit(self.next_step)
            self.next_step += 1
        ref = self.pending.pop(step)
        ready, _ = ray.wait([ref], timeout=self.timeout_s)
        if not ready:
            raise TimeoutError(
                f"replay batch for step {step} not ready after runtime.replay_timeout_s={self.timeout_s}s: "
                "are the sampler actors' resources (runtime.sampler_cpus, sampler_gpus, sampler_resource) there?"
            )
        return ray.get(ref)


def classifier_replay(actors: list, cfg, task: int, teacher: list, steps: int) -> RemoteReplay:
    """The continual classifier's replay images of task ``task`` from ``teacher``, made by ``actors``."""
    c, rt = cfg.classifier, cfg.runtime
    return RemoteReplay(
        actors,
        task,
        teacher,
        0,
        1,
        steps,
        rt.replay_depth,
        rt.replay_timeout_s,
        method="images",
        extra=(c.batch_size, c.replay_steps, c.replay_eta),
    )
