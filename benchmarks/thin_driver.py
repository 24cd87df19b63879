"""Thin-driver benchmark: how much of a Ray run's CPU its driver uses, what the Ray backend costs against
``--inline``, and how one task's evaluation scales over sampler actors. Every run starts from nothing (a new
cluster for each Ray run), the two runs of a ratio one after the other on the same machine.

    python -m benchmarks.thin_driver                       # about 40 minutes on 2 cores
    python -m benchmarks.thin_driver --parts smoke,p3      # only these figures; the others are kept from the file

Every cpu-preset run here has gd with 2 teacher steps (the preset's until 2026-12-03; 10 since), so the figures
measured before and after compare.

- driver_cpu_share (part ``nodes``): CPU seconds of the driver process (this one) / the machine's busy CPU
  seconds over the same time (/proc/stat; the machine runs nothing else), for the cpu preset's gd run with the
  continual classifier, shortened to 2 tasks x 60 steps, on a simulated 3-node cluster
  (ray.cluster_utils.Cluster: a 0-CPU head, a sampler node, a trainer node).
- smoke_ray_over_inline (part ``smoke``): wall time of the smoke preset on Ray (a new local cluster) / the same
  run ``--inline``; ``ray_fixed_s``: the Ray run's seconds before its first training step and after its last
  evaluation that the inline run does not spend (its wall time less the inline run's).
- p3_ray_over_inline (part ``p3``): the same for the whole cpu preset's gd run (5 tasks x 500 steps), 1 sampler
  actor (``--short``: 2 tasks x 60 steps). Every run also records ``first_replay_wait_s``: how long the first
  step of each task after the first waited for its replay batch (from the run's train log).
- threads (part ``threads``, no goal): whether a Train worker computing on 2 torch threads
  (``runtime.worker_threads``) beside the sampler actor's 1 uses the 2 cores better than on the 1 CPU it holds:
  wall times of the cpu preset's gd run on 2 tasks x 150 steps, 1 sampler actor, with 1 and with 2 worker
  threads, and with 2 under OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at once instead of spinning), one after
  the other.
- cores (part ``cores``, no goal): whether this machine's cores work apart, at the cpu preset's gd (2 teacher
  steps, batch 64): median seconds of the Train worker's gd step (the student on B data and B replay items)
  and of making one replay batch, each in a process of 1 torch thread, alone and then both at once (as the Ray
  run's Train worker and sampler actor); of the inline run's step (the replay batch, then the gd step) in one
  process on 2 threads; and of a first task's step (no replay) on 1 thread (the Train worker's) and on 2 (the
  inline run's). The conditions take turns in short windows, round after round. The Ray layout takes a gd step
  per max(step, replay) of the two at once.
- eval_scaling_2_over_1 (part ``eval``): wall time of one evaluation at the ``paper`` model size (the 42.9 M UNet,
  randomly initialised: the cost does not depend on the weights) of 200 samples x 10 DDIM steps and 500 test
  images, on 1 sampler actor / on 2 (1 CPU each); both metrics are written, and must be equal.

Writes benchmarks/results/thin_driver.json; each part carries the machine and date it was measured on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from ray.cluster_utils import Cluster

from benchmarks.common import RESULTS, machine
from benchmarks.readme_results import thin_driver_table
from distcl.config import load_config
from distcl.data import cache_dir, load_dataset, select
from distcl.evaluation import Evaluator, metrics_from_chunks
from distcl.launch import run
from distcl.models import build_scheduler, build_unet
from distcl.replay import Teacher, make_replay
from distcl.runtime.cluster import environment
from distcl.runtime.samplers import SamplerPool
from distcl.seeding import seeded_generator
from distcl.training import continual_terms, optimise

P3 = ["runtime.num_samplers=1", "train.teacher_steps=2"]  # the cpu preset's gd as measured before 2026-12-03
SHORT = ["data.num_tasks=2", "train.max_steps=60"]
THREADS = P3 + ["data.num_tasks=2", "train.max_steps=150"]
PARTS = ("smoke", "p3", "nodes", "eval", "threads", "cores")
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
    log = pd.read_parquet(out / "train_log.parquet")
    first = log[(log.step == 0) & (log.task > 0)].sort_values("task")  # the replay wait of each task's first step
    return {
        "wall_s": wall,
        "driver_cpu_s": driver,
        "machine_cpu_s": total,
        "first_replay_wait_s": first.replay_wait_s.tolist(),
    }


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


def thread_runs(work: Path) -> dict:
    """``timed_run`` of the THREADS run on Ray with 1 and 2 Train worker threads (and 2, OpenMP waiting passively:
    the local cluster's processes inherit the variable)."""
    runs = {}
    for name, extra, env in [
        ("worker_threads_1", [], {}),
        ("worker_threads_2", ["runtime.worker_threads=2"], {}),
        ("worker_threads_2_passive", ["runtime.worker_threads=2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    ]:
        with environment(env):
            runs[name] = timed_run("cpu", THREADS + extra, work / name)
    return runs


CORES_ROUNDS, CORES_WINDOW_S = 8, 3.0  # rounds of every condition, seconds of each timed window
CORES_CONDITIONS = {  # name: {process: kind} run at once for one window
    "train_alone": {"one": "train"},
    "replay_alone": {"other": "replay"},
    "beside": {"one": "train", "other": "replay"},
    "inline_2_threads": {"two": "inline"},
    "first_task_1_thread": {"one": "first"},
    "first_task_2_threads": {"two": "first"},
}
CORES_THREADS = {"one": 1, "other": 1, "two": 2}  # torch threads of each process


def timing_process(threads: int, commands, out) -> None:
    """On ``threads`` torch threads, at the cpu preset's gd (2 teacher steps): for each (kind, seconds) command,
    ``kind`` (train: the gd step on a fixed replay batch; replay: making a replay batch; inline: both, one after
    the other; first: a first task's step, no replay) repeated for ``seconds``, its step times put on ``out``;
    None ends it. Ready (every kind warmed up) when it puts an empty list."""
    torch.set_num_threads(threads)
    cfg = load_config(preset="cpu", overrides=P3)
    student, scheduler = build_unet(cfg.model), build_scheduler(cfg.model)
    teacher = Teacher(build_unet(cfg.model).eval(), scheduler, cfg.train.teacher_steps)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr)
    B, size = cfg.train.batch_size, student.config.sample_size
    x0 = torch.randn(B, 1, size, size, generator=seeded_generator(0, "x0"))
    count = 0

    def replay():
        return make_replay(teacher, "gd", B, seeded_generator(0, "replay", count))

    def train(batch) -> None:
        terms = lambda step: continual_terms(  # noqa: E731
            student, x0, batch, task=1, train_cfg=cfg.train, scheduler=scheduler, generator=seeded_generator(1, step)
        )
        optimise(student, optimizer, terms, count + 1, start=count, grad_clip=cfg.train.grad_clip, progress=False)

    fixed = replay()
    work = {
        "train": lambda: train(fixed),
        "replay": replay,
        "inline": lambda: train(replay()),
        "first": lambda: train(None),
    }
    for kind in work.values():
        kind()
    out.put([])
    for kind, seconds in iter(commands.get, None):
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            began = time.perf_counter()
            work[kind]()
            count += 1
            times.append(time.perf_counter() - began)
        out.put(times)


def cores() -> dict:
    """Median step seconds of each of CORES_CONDITIONS, the conditions taking turns in CORES_ROUNDS rounds (the
    machine's speed drifts: each round sees every condition within a few seconds)."""
    ctx = multiprocessing.get_context("spawn")
    queues = {name: (ctx.Queue(), ctx.Queue()) for name in CORES_THREADS}
    procs = [
        ctx.Process(target=timing_process, args=(CORES_THREADS[name], commands, out))
        for name, (commands, out) in queues.items()
    ]
    for proc in procs:
        proc.start()
    for _, out in queues.values():
        out.get()
    times: dict[str, list[float]] = {}
    for _ in range(CORES_ROUNDS):
        for name, condition in CORES_CONDITIONS.items():
            for process, kind in condition.items():
                queues[process][0].put((kind, CORES_WINDOW_S))
            for process, kind in condition.items():
                times.setdefault(f"{name}/{kind}", []).extend(queues[process][1].get())
    for commands, _ in queues.values():
        commands.put(None)
    for proc in procs:
        proc.join()
    return {
        "run": f"cpu preset, gd with 2 teacher steps, batch {load_config(preset='cpu', overrides=P3).train.batch_size}",
        "rounds": CORES_ROUNDS,
        "window_s": CORES_WINDOW_S,
        **{f"{key.replace('/', '_')}_s": float(np.median(values)) for key, values in times.items()},
    }


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


def eval_scaling() -> dict:
    """One evaluation at the paper model size on 1 sampler actor, then on 2."""
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
    return {
        "model": "paper",
        "samples": 200,
        "steps": 10,
        "real_images": len(test.labels),
        "chunks": len(job.chunks()),
        "one_sampler_s": one_s,
        "two_samplers_s": two_s,
        "metrics_one": one,
        "metrics_two": two,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--short", action="store_true", help="p3 on 2 tasks x 60 steps")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown} (allowed: {', '.join(PARTS)})")
    path = RESULTS / "thin_driver.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "measured": {}}
    results.setdefault("measured", {part: results.get("machine") for part in PARTS})  # a file from before parts
    work = Path(tempfile.mkdtemp(prefix="distcl-thin-driver-"))
    runs, p3 = results["runs"], P3 + (SHORT if args.short else [])
    if "smoke" in parts:
        runs["smoke_inline"] = timed_run("smoke", ["runtime.backend=inline"], work / "smoke-inline")
        runs["smoke_ray"] = timed_run("smoke", [], work / "smoke-ray")
        results["smoke_ray_over_inline"] = runs["smoke_ray"]["wall_s"] / runs["smoke_inline"]["wall_s"]
        results["ray_fixed_s"] = runs["smoke_ray"]["wall_s"] - runs["smoke_inline"]["wall_s"]
    if "p3" in parts:
        runs["p3_inline"] = timed_run("cpu", p3 + ["runtime.backend=inline"], work / "p3-inline")
        runs["p3_ray"] = timed_run("cpu", p3, work / "p3-ray")
        results["p3_run"] = "cpu preset, gd with 2 teacher steps, 1 sampler actor" + (
            ", 2 tasks x 60 steps" if args.short else ""
        )
        results["p3_ray_over_inline"] = runs["p3_ray"]["wall_s"] / runs["p3_inline"]["wall_s"]
    if "nodes" in parts:
        runs["three_nodes"] = on_three_nodes(P3 + SHORT + ON_NODES, work / "three-nodes")
        results["driver_cpu_share"] = runs["three_nodes"]["driver_cpu_s"] / runs["three_nodes"]["machine_cpu_s"]
    if "threads" in parts:
        results["threads"] = {
            "run": "cpu preset, gd with 2 teacher steps, 1 sampler actor, 2 tasks x 150 steps",
            **thread_runs(work),
        }
    if "cores" in parts:
        results["cores"] = cores()
    if "eval" in parts:
        results["eval"] = eval_scaling()
        results["eval_scaling_2_over_1"] = results["eval"]["one_sampler_s"] / results["eval"]["two_samplers_s"]
    for part in parts:
        results["measured"][part] = machine()
    results.pop("machine", None)  # (a single machine for every part, before parts were measured apart)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print("\n".join(thin_driver_table(results)))


if __name__ == "__main__":
    main()
