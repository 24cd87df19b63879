"""Throughput benchmark: what the Ray runtime costs or saves, each figure a ratio measured side by side.

    python -m benchmarks.throughput            # about 30 minutes on 2 cores (p3 runs the whole cpu preset twice)
    python -m benchmarks.throughput --short    # p3 on 2 tasks x 60 steps: about 8 minutes

- p1_trainer_ratio: trainer step time (1 thread) with gd replay from 1 sampler actor (1 thread, the other
  core), divided by a finetune step on the same 2B items; next to it the same ratio with replay made inline
  on the trainer (the reference's way). Rounds alternate the three modes; medians over rounds.
- p2_sampler_scaling: replay items/s of 2 sampler actors divided by 1 (1 thread each).
- p3_ray_vs_inline: wall time of a whole ``cpu``-preset gd run through the Ray runtime divided by the same
  run in one process (``--short``: 2 tasks x 60 steps, 200 evaluation samples).
- object_store_s: ray.put + ray.get of one replay batch, next to the step time.
- samplers_needed: from the measured teacher forward and trainer step times, the sampler actors one trainer
  needs for gd with 2, 10 and 100 teacher steps: ceil((n + 1) * t_forward(B) / t_step(2B)).

Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from benchmarks.common import RESULTS, machine
from distcl.config import load_config
from distcl.data import DataStream
from distcl.launch import run
from distcl.models import build_scheduler, build_unet, save_checkpoint
from distcl.replay import InlineReplay, Teacher
from distcl.runtime.samplers import RemoteReplay, SamplerPool
from distcl.seeding import noise_seed
from distcl.teachers import TeacherFiles
from distcl.training import make_optimizer, train_task

STEPS = 12  # trainer steps per measurement
ROUNDS = 3


def trainer_steps(cfg, student, images, replay, task=1) -> float:
    """Median seconds per train step over STEPS steps (replay wait included)."""
    optimizer, _ = make_optimizer(student, cfg.train)
    rows = train_task(
        student,
        optimizer,
        DataStream(images, cfg.train.batch_size, cfg.seed, task),
        replay,
        task=task,
        steps=STEPS,
        train_cfg=cfg.train,
        scheduler=build_scheduler(cfg.model),
        noise_seed=noise_seed(0, task),
        device=torch.device("cpu"),
        progress=False,
    )
    return statistics.median(r["step_s"] for r in rows[1:])  # the first step warms up


def replay_rate(actors, teacher: list, batches: int, batch_size: int) -> float:
    """Replay items per second from ``actors`` (a deep enough window that no actor idles)."""
    stream = RemoteReplay(actors, 1, teacher, 0, 1, batches, depth=2 * len(actors), timeout_s=600)
    stream.get(0)  # warm up: teacher loaded, first batch made
    start = time.perf_counter()
    for step in range(1, batches):
        stream.get(step)
    return (batches - 1) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="p3 on a shortened run (2 tasks x 60 steps)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(preset="cpu", overrides=["train.log_every=1", "runtime.num_samplers=1"])
    B = cfg.train.batch_size
    work = Path(tempfile.mkdtemp(prefix="distcl-throughput-"))
    torch.manual_seed(0)
    teacher_unet = build_unet(cfg.model).eval()
    save_checkpoint(teacher_unet, build_scheduler(cfg.model), work / "teacher")
    teacher = Teacher(teacher_unet.requires_grad_(False), build_scheduler(cfg.model), cfg.train.teacher_steps)
    size = teacher_unet.config.sample_size
    images_B = torch.rand(4 * B, 1, size, size) * 2 - 1  # data of the gd runs: B real items per step
    images_2B = torch.rand(8 * B, 1, size, size) * 2 - 1  # finetune on the same 2B items per step

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    teacher_files = [ray.put(TeacherFiles.read(cfg, work / "teacher"))]
    results = {"machine": machine(), "batch_size": B, "model": cfg.model.preset, "teacher_steps": 2}
    try:
        pool = SamplerPool(cfg, B)
        replay_rate(pool.actors, teacher_files, 2, B)  # start the actor before timing
        modes = {"finetune_2B": [], "gd_actors": [], "gd_inline": []}
        for _ in range(ROUNDS):
            student = build_unet(cfg.model)
            ft_cfg = load_config(
                preset="cpu", overrides=["train.strategy=finetune", "train.batch_size=128", "train.log_every=1"]
            )
            modes["finetune_2B"].append(trainer_steps(ft_cfg, student, images_2B, None))
            stream = RemoteReplay(pool.actors, 1, teacher_files, 0, 1, STEPS, depth=4, timeout_s=600)
            modes["gd_actors"].append(trainer_steps(cfg, build_unet(cfg.model), images_B, stream))
            inline = InlineReplay(teacher, "gd", B, cfg.seed, 1)
            modes["gd_inline"].append(trainer_steps(cfg, build_unet(cfg.model), images_B, inline))
        step = {mode: statistics.median(times) for mode, times in modes.items()}
        results["step_s"] = step
        results["step_s_rounds"] = modes
        results["p1_trainer_ratio"] = {
            "actors": step["gd_actors"] / step["finetune_2B"],
            "inline": step["gd_inline"] / step["finetune_2B"],
            "goal_actors": "<= 1.05",
        }

        one = replay_rate(pool.actors, teacher_files, 10, B)
        pool.stop()
        two_cfg = load_config(preset="cpu", overrides=["runtime.num_samplers=2"])
        pool = SamplerPool(two_cfg, B)
        replay_rate(pool.actors, teacher_files, 4, B)
        two = replay_rate(pool.actors, teacher_files, 20, B)
        pool.stop()
        results["p2_sampler_scaling"] = {"items_s_1": one, "items_s_2": two, "ratio": two / one, "goal": ">= 1.8"}

        batch = InlineReplay(teacher, "gd", B, cfg.seed, 1).get(0)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            ray.get(ray.put(batch))
            times.append(time.perf_counter() - start)
        results["object_store_s"] = {
            "put_get_median": statistics.median(times),
            "batch_mb": sum(t.numel() * t.element_size() for t in vars(batch).values()) / 2**20,
            "step_s_gd_actors": step["gd_actors"],
        }

        x = torch.randn(B, 1, size, size)
        t = torch.full((B,), 500)
        with torch.no_grad():
            teacher_unet(x, t)
            start = time.perf_counter()
            for _ in range(5):
                teacher_unet(x, t)
            forward = (time.perf_counter() - start) / 5
        results["samplers_needed"] = {
            "teacher_forward_s": forward,
            "trainer_step_s": step["finetune_2B"],
            **{f"gd_{n}_steps": math.ceil((n + 1) * forward / step["finetune_2B"]) for n in (2, 10, 100)},
        }

        short = ["data.num_tasks=2", "train.max_steps=60", "eval.num_samples=200"] if args.short else []
        p3 = short + ["runtime.num_samplers=1", "train.strategy=gd", "train.teacher_steps=2"]
        torch.set_num_threads(threads)  # the in-process run uses every core, as a user's would
        inline_cfg = load_config(preset="cpu", overrides=p3 + ["runtime.backend=inline"])
        start = time.perf_counter()
        run(inline_cfg, work / "inline", progress=False)
        inline_s = time.perf_counter() - start
        ray_cfg = load_config(preset="cpu", overrides=p3)
        start = time.perf_counter()
        run(ray_cfg, work / "ray", progress=False)
        ray_s = time.perf_counter() - start
        results["p3_ray_vs_inline"] = {
            "inline_s": inline_s,
            "ray_s": ray_s,
            "ratio": ray_s / inline_s,
            "run": "cpu preset, gd" + (", 2 tasks x 60 steps" if args.short else ""),
            "goal": "<= 1.0",
        }
    finally:
        ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=2))
    print(
        f"| figure | value | goal |\n|---|---|---|\n"
        f"| p1 trainer ratio, replay from actors | {results['p1_trainer_ratio']['actors']:.3f} | <= 1.05 |\n"
        f"| p1 trainer ratio, replay inline | {results['p1_trainer_ratio']['inline']:.3f} | - |\n"
        f"| p2 sampler scaling, 2 vs 1 actors | {results['p2_sampler_scaling']['ratio']:.3f} | >= 1.8 |\n"
        f"| p3 Ray / inline wall time | {results['p3_ray_vs_inline']['ratio']:.3f} | <= 1.0 |\n"
        f"| object store put+get per batch (s) | {results['object_store_s']['put_get_median']:.4f} | - |\n"
        f"| trainer step, gd with actors (s) | {step['gd_actors']:.4f} | - |"
    )
    print("sampler actors needed per trainer:", {k: v for k, v in results["samplers_needed"].items()})


if __name__ == "__main__":
    main()
