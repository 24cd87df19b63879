"""The continual run on Ray: a local cluster by default (``ray.init()``), the ``runtime.address`` or
``$RAY_ADDRESS`` cluster when set. One Ray Train worker group and one sampler pool serve every task of the run:
sampler actors host teacher k-1 and evaluate model k, the Train workers update the student, the driver
orchestrates (distcl.continual does the rest: resume, outputs)."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import ray
from tqdm.auto import tqdm

from distcl.backend import ClassifierSpec, TaskSpec
from distcl.config import RunConfig
from distcl.continual import run_continual
from distcl.data import Files, Scenario
from distcl.evaluation import ChunkResult, EvalJob
from distcl.replay import REPLAY_ITEM_STRATEGIES
from distcl.rundir import out_lock
from distcl.runtime.cluster import cluster_capacity, join_cluster
from distcl.runtime.distill import RayDistillFit
from distcl.runtime.samplers import SamplerPool, kept_teacher, sampler_resources
from distcl.runtime.stream import dataset_name, task_dataset
from distcl.runtime.train import train_task_item
from distcl.runtime.workers import WorkerGroup, resolve_use_gpu, worker_resources
from distcl.settings import ConfigError
from distcl.teachers import TeacherFiles


def layout_bundles(cfg: RunConfig, use_gpu: bool) -> dict[str, dict[str, float]]:
    """What one Train worker (with ``use_gpu``, its GPU) and one sampler actor each ask for on a single node: the
    same dicts their scheduling uses."""
    return {"Train worker": worker_resources(cfg.runtime, use_gpu), "sampler actor": sampler_resources(cfg.runtime)}


def layout_needs(cfg: RunConfig, use_gpu: bool) -> dict[str, float]:
    """Resources one task holds at once: the Train workers (with ``use_gpu``, their GPUs) and the sampler actors."""
    rt = cfg.runtime
    counts = {"Train worker": rt.num_workers, "sampler actor": rt.num_samplers}
    needs: dict[str, float] = {}
    for role, bundle in layout_bundles(cfg, use_gpu).items():
        for resource, amount in bundle.items():
            if amount or resource == "CPU":
                needs[resource] = needs.get(resource, 0) + amount * counts[role]
    return needs


def connect(cfg: RunConfig) -> RunConfig:
    """Join the configured cluster, or start a local one big enough for the layout; ``cfg`` with
    ``runtime.use_gpu`` decided for this cluster (None: when its GPUs, under an autoscaler those its node types
    can start, hold the workers' beside the samplers')."""
    rt = cfg.runtime
    join_cluster(rt, layout_needs(cfg, use_gpu=False)["CPU"])
    gpus = cluster_capacity().total.get("GPU", 0)
    use_gpu = resolve_use_gpu(rt, gpus, rt.num_samplers * rt.sampler_gpus)
    return replace(cfg, runtime=replace(rt, use_gpu=use_gpu))


def check_layout(cfg: RunConfig) -> None:
    """Refuse, naming the fields, a layout the cluster cannot hold (instead of waiting forever): more than it
    has, or under an autoscaler more than its node types can start, or a role no single node can hold; ``cfg``
    as :func:`connect` returns it."""
    capacity = cluster_capacity()
    rt = cfg.runtime
    fields = (
        f"(num_workers={rt.num_workers}, cpus_per_worker={rt.cpus_per_worker}, use_gpu={rt.use_gpu}, "
        f"gpus_per_worker={rt.gpus_per_worker}, num_samplers={rt.num_samplers}, sampler_cpus={rt.sampler_cpus}, "
        f"sampler_gpus={rt.sampler_gpus}, sampler_resource={rt.sampler_resource}, "
        f"worker_resource={rt.worker_resource}, num_cpus={rt.num_cpus})"
    )
    has = "the cluster's node types can start at most" if capacity.autoscaling else "the cluster has"
    for resource, need in layout_needs(cfg, bool(rt.use_gpu)).items():
        if capacity.total.get(resource, 0) + 1e-9 < need:
            raise ConfigError(
                "runtime",
                f"the layout needs {need:g} {resource} but {has} {capacity.total.get(resource, 0):g} {fields}",
            )
    for role, bundle in layout_bundles(cfg, bool(rt.use_gpu)).items():
        if not capacity.fits_one_node(bundle):
            wanted = {k: v for k, v in bundle.items() if v}
            raise ConfigError(
                "runtime",
                f"a {role} needs {wanted} on one node but no "
                f"{'node type' if capacity.autoscaling else 'node'} has that {fields}",
            )


def role_devices(cfg: RunConfig) -> str:
    """Which device each role of a Ray run uses (``cfg`` as :func:`connect` returns it)."""
    rt = cfg.runtime
    workers = f"cuda ({rt.gpus_per_worker:g} GPU each)" if rt.use_gpu else "cpu"
    samplers = f"cuda ({rt.sampler_gpus:g} GPU each)" if rt.sampler_gpus else "cpu"
    return (
        f"driver cpu (orchestrates), {rt.num_workers} Train worker(s) {workers}, {rt.num_samplers} sampler "
        f"actor(s) {samplers} (replay, the continual classifier and evaluation)"
    )


class RayBackend:
    """A distcl.continual backend on Ray: the run's one Ray Train worker group (it comes up while the driver
    loads data; for a streamed folder once the tasks' files are known: they are its datasets) trains every task
    and distils the fast replay samplers; the sampler actors host teacher k-1, train the continual classifier and
    evaluate, with ``runtime.overlap`` while the Train workers go on with the next task."""

    def __init__(self, cfg: RunConfig, out: Path, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.overlaps = cfg.runtime.overlap
        self.teacher_refs: dict[Path, list] = {}  # the last TEACHERS_KEPT teachers put (two driver threads ask)
        self.teacher_lock = threading.Lock()
        self.group = None if cfg.data.stream else WorkerGroup(cfg.runtime, self.out / "ray_train")
        # the actors come up while the Train workers do and the driver loads data: task 0's evaluation needs them
        self.pool: Optional[SamplerPool] = SamplerPool(cfg, cfg.train.batch_size // cfg.runtime.num_workers)
        self.distill_fit = RayDistillFit(cfg.runtime, self.group)

    def begin(self, scenario: Scenario, todo: list[int]) -> None:
        """A streamed folder: the worker group starts with a Dataset of each task still to train."""
        if not self.cfg.data.stream:
            return
        joint, channels = self.cfg.train.strategy == "joint", self.cfg.data.image_channels
        datasets = {
            dataset_name(k): task_dataset(
                scenario.train_images(k, joint),
                channels,
                scenario.sample_size,
                self.cfg.seed,
                k,
                self.cfg.runtime.data_cpus,
            )
            for k in todo
        }
        self.group = WorkerGroup(self.cfg.runtime, self.out / "ray_train", datasets=datasets)
        self.distill_fit = RayDistillFit(self.cfg.runtime, self.group)

    def train_task(self, spec: TaskSpec) -> list[dict]:
        cfg, k = spec.cfg, spec.task
        samplers, teacher = [], None
        if spec.has_teacher and cfg.train.strategy in REPLAY_ITEM_STRATEGIES:
            samplers, teacher = self.pool.actors, self.teacher(spec.init_dir)
        init = ray.put({name: value.cpu() for name, value in spec.student.state_dict().items()})
        streamed = isinstance(spec.images, Files)  # then the workers read its Dataset (begin)
        images = None if streamed else ray.put(spec.images)
        config = {"cfg": cfg, "task": k, "init": init, "images": images, "samplers": samplers, "teacher": teacher}
        config["count"] = len(spec.images.paths) if streamed else len(spec.images)
        state = self.group.run(f"task_{k}", train_task_item, config)
        del init, images
        for event in state["recoveries"]:
            self.log(
                f"[distcl] task {k}: recovered at step {event['resumed_at_step']} "
                f"({event['recovery_s']:.1f}s after the checkpoint)"
            )
        spec.student.load_state_dict(state["model"])
        self.record_placement(k, state["worker_nodes"])
        return state["rows"]

    def devices(self) -> str:
        return role_devices(self.cfg)

    def teacher(self, teacher_dir: Path) -> list:
        """``[ref]`` to the TeacherFiles of ``teacher_dir``, put in the object store once per teacher."""
        with self.teacher_lock:
            return kept_teacher(
                self.teacher_refs, teacher_dir, lambda: [ray.put(TeacherFiles.read(self.cfg, teacher_dir))]
            )

    def train_classifier(self, spec: ClassifierSpec) -> tuple[dict, list[dict]]:
        """On sampler actor k % n (TeacherSampler.train_classifier), its replay images from all of them."""
        teacher = self.teacher(spec.replay_from) if spec.replay_from is not None else None
        actors = self.pool.actors
        trainer = actors[spec.task % len(actors)]
        return ray.get(trainer.train_classifier.remote(replace(spec, progress=False), actors, teacher))

    def evaluate(self, job: EvalJob, progress: bool) -> list[ChunkResult]:
        """On the sampler actors (SamplerPool.evaluate)."""
        chunks = self.pool.evaluate(job)
        return list(
            tqdm(chunks, total=len(job.chunks()), desc=f"evaluating task {job.task}", disable=not progress, leave=False)
        )

    def record_placement(self, k: int, worker_nodes: list[str]) -> None:
        """OUT/placement.json: the node ids of task k's Train workers (by rank) and sampler actors."""
        samplers = ray.get([a.where.remote() for a in self.pool.actors]) if self.pool is not None else []
        path = self.out / "placement.json"
        placement = json.loads(path.read_text()) if path.exists() else {}
        placement[f"task_{k}"] = {"train_workers": worker_nodes, "samplers": [s["node_id"] for s in samplers]}
        path.write_text(json.dumps(placement, indent=2))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self.group is not None:
            self.group.close()
            self.group = None


def run(
    cfg: RunConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_task: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_start: Optional[Callable[[], None]] = None,
    append: bool = False,
) -> Path:
    """``distcl run`` and ``distcl learn`` on Ray (arguments as distcl.continual.run_continual)."""
    cfg = connect(cfg)
    check_layout(cfg)
    out = Path(out).resolve()
    with out_lock(out):  # before the Train workers write into OUT/ray_train
        backend = RayBackend(cfg, out, log)
        try:
            metrics = run_continual(cfg, out, backend, progress, log, on_task, on_start, append)
        finally:
            backend.close()
        shutil.rmtree(out / "ray_train", ignore_errors=True)  # every task is saved: its checkpoints are not needed
    return metrics
