"""Thin-driver benchmark: how much of a Ray run's CPU its driver uses, what the Ray backend costs against
``--inline``, and how one task's evaluation scales over sampler actors. Every run starts from nothing (a new
cluster for each Ray run), one after the other on the same machine.

    python -m benchmarks.thin_driver           # about 10 minutes on 2 cores

- driver_cpu_share: CPU seconds of the driver process (this one) / the machine's busy CPU seconds over the same
  time (/proc/stat; the machine runs nothing else), for the cpu preset's gd run with the continual classifier,
  shortened to 2 tasks x 60 steps, on a simulated 3-node cluster (ray.cluster_utils.Cluster: a 0-CPU head, a
  sampler node, a trainer node).
- smoke_ray_over_inline: wall time of the smoke preset on Ray (a new local cluster) / the same run ``--inline``.
- p3_ray_over_inline: the same for the cpu preset's gd run, shortened to 2 tasks x 60 steps, 1 sampler actor.
- eval_scaling_2_over_1: wall time of one evaluation at the ``paper`` model size (the 42.9 M UNet, randomly
  initialised: the cost does not depend on the weights) of 200 samples x 10 DDIM steps and 500 test images, on
  1 sampler actor / on 2 (1 CPU each); both metrics are written, and must be equal.

Writes benchmarks/results/thin_driver.json.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from benchmarks.common import RESULTS, machine
from benchmarks.readme_results import thin_driver_table
from distcl.config import load_config
from distcl.data import cache_dir, load_dataset, select
from distcl.evaluation import Evaluator, metrics_from_chunks
from distcl.launch import run
from distcl.models import build_unet
from distcl.runtime.samplers import SamplerPool

P3 = ["data.num_tasks=2", "train.max_steps=60", "runtime.num_samplers=1"]
ON_NODES = ["classifier.enabled=true", "runtime.sampler_resource=sampler_slot", "runtime.worker_resource=trainer_slot"]


def driver_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed_run(preset: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config(preset=preset, overrides=overrides)
    cpu, busy, start = driver_cpu_s(), machine_busy_s(), time.perf_counter()
    run(cfg, out, progress=False, log=lambda _: None)
    wall = time.perf_counter() - start
    driver, total = driver_cpu_s() - cpu, machine_busy_s() - busy
    if ray.is_initialized():
        ray.shutdown()  # the next Ray run starts its own cluster, as a user's command does
    return {"wall_s": wall, "driver_cpu_s": driver, "machine_cpu_s": total}


def on_three_nodes(overrides: list[str], out: Path) -> dict:
    """``timed_run`` of the cpu preset on a 0-CPU head with a sampler node and a trainer node."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1, resources={"sampler_slot": 1})
    cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
    ray.init(address=cluster.address)
    try:
        return timed_run("cpu", overrides, out)
    finally:
        ray.shutdown()
        cluster.shutdown()


def eval_seconds(job, test_labels: torch.Tensor, samplers: int) -> tuple[float, dict]:
    """Wall time of ``job`` on a pool of ``samplers`` actors (started beforehand) and its metrics."""
    pool = SamplerPool(load_config(preset="cpu", overrides=[f"runtime.num_samplers={samplers}"]), 1)
    try:
        warm_cfg = replace(job.eval_cfg, num_samples=2 * samplers, batch_size=1)
        list(pool.evaluate(replace(job, eval_cfg=warm_cfg, real=job.real[:2])))  # every actor up
        start = time.perf_counter()
        results = list(pool.evaluate(job))
        seconds = time.perf_counter() - start
    finally:
        pool.stop()
    return seconds, metrics_from_chunks(results, test_labels, 10)[0]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="distcl-thin-driver-"))
    runs = {
        "smoke_inline": timed_run("smoke", ["runtime.backend=inline"], work / "smoke-inline"),
        "smoke_ray": timed_run("smoke", [], work / "smoke-ray"),
        "p3_inline": timed_run("cpu", P3 + ["runtime.backend=inline"], work / "p3-inline"),
        "p3_ray": timed_run("cpu", P3, work / "p3-ray"),
        "three_nodes": on_three_nodes(P3 + ON_NODES, work / "three-nodes"),
    }
    cfg = load_config(preset="paper", overrides=["eval.num_samples=200", "eval.batch_size=50"])
    dataset = load_dataset(cfg.data, cfg.cache_dir, 32)
    test = select(dataset.test, list(range(10)), 50)
    evaluator = Evaluator(cfg.eval, dataset, 32, cache_dir(cfg.cache_dir), torch.device("cpu"), progress=False)
    torch.manual_seed(0)
    job = evaluator.job(4, cfg.seed, cfg.model, build_unet(cfg.model).state_dict(), test, 32)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        one_s, one = eval_seconds(job, test.labels, 1)
        two_s, two = eval_seconds(job, test.labels, 2)
    finally:
        ray.shutdown()
    three = runs["three_nodes"]
    results = {
        "machine": machine(),
        "runs": runs,
        "driver_cpu_share": three["driver_cpu_s"] / three["machine_cpu_s"],
        "smoke_ray_over_inline": runs["smoke_ray"]["wall_s"] / runs["smoke_inline"]["wall_s"],
        "p3_ray_over_inline": runs["p3_ray"]["wall_s"] / runs["p3_inline"]["wall_s"],
        "eval": {
            "model": "paper",
            "samples": 200,
            "steps": 10,
            "real_images": len(test.labels),
            "chunks": len(job.chunks()),
            "one_sampler_s": one_s,
            "two_samplers_s": two_s,
            "metrics_one": one,
            "metrics_two": two,
        },
        "eval_scaling_2_over_1": one_s / two_s,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "thin_driver.json").write_text(json.dumps(results, indent=2))
    print("\n".join(thin_driver_table(results)))


if __name__ == "__main__":
    main()
