"""Thin-driver benchmark: how much of a Ray run's CPU its driver uses, what the Ray backend costs against
``--inline``, and how one task's evaluation scales over sampler actors. Every run starts from nothing (a new
local cluster for each Ray run), one after the other on the same machine.

    python -m benchmarks.thin_driver           # about 10 minutes on 2 cores

- driver_cpu_share: CPU seconds of the driver process (this one) during the smoke preset on Ray, divided by
  the machine's busy CPU seconds over the same time (/proc/stat; the machine runs nothing else).
- smoke_ray_over_inline: wall time of the smoke preset on Ray divided by the same run ``--inline``.
- p3_ray_over_inline: the same for the cpu preset's gd run, shortened to 2 tasks x 60 steps, 1 sampler actor.
- eval_scaling_2_over_1: wall time of one task's evaluation at the cpu preset's settings (1,000 samples, 10 DDIM
  steps, the 10 classes' test images) on 1 sampler actor divided by the same on 2 (1 CPU each); the metrics of
  both are printed, and must be equal.

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

from benchmarks.common import RESULTS, machine
from distcl.config import load_config
from distcl.continual import run, task_dir
from distcl.data import build_scenario, cache_dir, load_fashion_mnist, locate
from distcl.evaluation import Evaluator, metrics_from_chunks
from distcl.models import load_unet
from distcl.runtime.samplers import SamplerPool

P3 = ["data.num_tasks=2", "train.max_steps=60", "runtime.num_samplers=1"]


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
    return seconds, metrics_from_chunks(results, test_labels)[0]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="distcl-thin-driver-"))
    runs = {
        "smoke_inline": timed_run("smoke", ["runtime.backend=inline"], work / "smoke-inline"),
        "smoke_ray": timed_run("smoke", [], work / "smoke-ray"),
        "p3_inline": timed_run("cpu", P3 + ["runtime.backend=inline"], work / "p3-inline"),
        "p3_ray": timed_run("cpu", P3, work / "p3-ray"),
    }
    cfg = load_config(preset="cpu")
    splits = load_fashion_mnist(locate(cfg.data.data_dir, cfg.cache_dir))
    scenario = build_scenario(splits, cfg.data, cfg.seed, 16)
    test = scenario.test_split(cfg.data.num_tasks - 1)
    evaluator = Evaluator(cfg.eval, splits["train"], splits["test"], cache_dir(cfg.cache_dir), torch.device("cpu"),
                          progress=False)  # fmt: skip
    state = load_unet(task_dir(work / "p3-ray", 1), cfg.model).state_dict()  # scored against all 10 classes
    job = evaluator.job(cfg.data.num_tasks - 1, cfg.seed, cfg.model, state, test, scenario.sample_size)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        one_s, one = eval_seconds(job, test.labels, 1)
        two_s, two = eval_seconds(job, test.labels, 2)
    finally:
        ray.shutdown()
    results = {
        "machine": machine(),
        "runs": runs,
        "driver_cpu_share": runs["smoke_ray"]["driver_cpu_s"] / runs["smoke_ray"]["machine_cpu_s"],
        "smoke_ray_over_inline": runs["smoke_ray"]["wall_s"] / runs["smoke_inline"]["wall_s"],
        "p3_ray_over_inline": runs["p3_ray"]["wall_s"] / runs["p3_inline"]["wall_s"],
        "eval": {"chunks": len(job.chunks()), "one_sampler_s": one_s, "two_samplers_s": two_s,
                 "metrics_one": one, "metrics_two": two},  # fmt: skip
        "eval_scaling_2_over_1": one_s / two_s,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "thin_driver.json").write_text(json.dumps(results, indent=2))
    print(f"| figure | value |\n|---|---|\n"
          f"| driver CPU share, smoke on Ray | {results['driver_cpu_share']:.3f} |\n"
          f"| smoke: Ray / inline wall time | {results['smoke_ray_over_inline']:.3f} "
          f"({runs['smoke_ray']['wall_s']:.1f} s / {runs['smoke_inline']['wall_s']:.1f} s) |\n"
          f"| cpu preset, 2 tasks x 60 steps: Ray / inline | {results['p3_ray_over_inline']:.3f} "
          f"({runs['p3_ray']['wall_s']:.1f} s / {runs['p3_inline']['wall_s']:.1f} s) |\n"
          f"| evaluation, 1 / 2 sampler actors | {results['eval_scaling_2_over_1']:.3f} ({one_s:.1f} s / {two_s:.1f} s) |\n"
          f"| evaluation metrics, 1 and 2 actors | fid {one['fid']:.3f} / {two['fid']:.3f}, kld {one['kld']:.4f} / {two['kld']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
