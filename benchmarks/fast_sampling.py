"""Fast-sampling benchmark: FID and KLD (all 10 classes) of a teacher's DDIM at 1, 2, 4, 8 and 16 steps, of its
progressive-distillation students at every stage (16 -> 8 -> 4 -> 2 -> 1 steps) and of its PID one-step student,
all sampled from the same seeds and scored by the same evaluator, with the floor (``real data``: real training images
of every class scored as samples).

    python -m benchmarks.fast_sampling      # teacher: the quality benchmark's joint run (all classes), seed 42
    python -m benchmarks.fast_sampling --teacher runs/sweeps/benchmark/runs/seed=42_strategy=joint/task_4

Writes benchmarks/results/fast_sampling.parquet (method, steps, metric, value, train_s, iterations: updates per
PD stage or of PID, machine, teacher) and
benchmarks/results/fast_sampling_fid.png (FID against sampling steps, one line per method).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import RESULTS, machine
from benchmarks.quality import strategy_run
from distcl.config import PIDConfig, ProgressiveConfig, load_config
from distcl.data import build_scenario, cache_dir, load_dataset, select
from distcl.devices import resolve_device
from distcl.distill import distill, fit_inline
from distcl.evaluation import Evaluator, generate
from distcl.launch import run
from distcl.models import load_pipeline_parts
from distcl.pid import load_pid_student
from distcl.rundir import REAL_DATA
from distcl.seeding import seeded_generator

DDIM_STEPS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher",
        help="a task_<k>/ checkpoint (default: the final model of the quality "
        "benchmark's joint run, seed 42, made or resumed here)",
    )
    parser.add_argument("--work", default="runs/fast_sampling", help="distilled students (resumable)")
    parser.add_argument("--pd-iterations", type=int, default=300, help="updates per halving stage")
    parser.add_argument("--pid-iterations", type=int, default=2000)
    args = parser.parse_args()

    if args.teacher is None:
        joint, out = strategy_run("joint", 42)
        run(joint, out)  # done already: it is only read
        args.teacher = out / f"task_{joint.data.num_tasks - 1}"
    teacher_dir, work = Path(args.teacher), Path(args.work)
    cfg = load_config(teacher_dir.parent / "config.yaml")  # the teacher's run: its data, model, evaluation
    device = resolve_device(cfg.device)
    unet, scheduler = load_pipeline_parts(teacher_dir, device)
    size = unet.config.sample_size
    dataset = load_dataset(cfg.data, cfg.cache_dir, size)
    scenario = build_scenario(dataset, cfg.data, cfg.seed, size)
    test = scenario.test_split(cfg.data.num_tasks - 1)
    evaluator = Evaluator(cfg.eval, dataset, size, cache_dir(cfg.cache_dir), device, False)
    n = cfg.eval.num_samples
    rows = []

    iterations = {"ddim": 0, "progressive": args.pd_iterations, "pid": args.pid_iterations}

    def score(method: str, steps: int, samples: torch.Tensor, train_s: float) -> None:
        metrics = evaluator.score(samples, test, RESULTS / "fast_sampling" / f"{method}_{steps}.png")
        rows.extend(
            {
                "method": method,
                "steps": steps,
                "metric": m,
                "value": v,
                "train_s": train_s,
                "iterations": iterations[method],
            }
            for m, v in metrics.items()
        )
        print(f"{method:12s} {steps:3d} steps: fid {metrics['fid']:.2f}, kld {metrics['kld']:.3f}", flush=True)

    def seeds() -> torch.Generator:
        return seeded_generator(cfg.seed, "fast_sampling")  # the same x_T for every sampler (PID: z = T x_T)

    for steps in DDIM_STEPS:
        score("ddim", steps, generate(unet.eval(), scheduler, n, steps, 0.0, cfg.eval.batch_size, seeds(), False), 0.0)

    pd_cfg = ProgressiveConfig(
        start_steps=16,
        target_steps=1,
        parameterisation="v",
        iterations=args.pd_iterations,
        batch_size=64,
        lr=5e-4,
        data="fmnist",
        seed=cfg.seed,
    )
    images = scenario.train_images(cfg.data.num_tasks - 1, joint=True)
    start = time.perf_counter()
    fit = partial(fit_inline, device=device)
    stages = distill("progressive", teacher_dir, work / "progressive", pd_cfg, fit, images)
    pd_s = (time.perf_counter() - start) / len(stages)
    for steps, directory in zip(pd_cfg.stages(), stages):
        student, student_scheduler = load_pipeline_parts(directory, device)
        score(
            "progressive",
            steps,
            generate(student.eval(), student_scheduler, n, steps, 0.0, cfg.eval.batch_size, seeds(), False),
            pd_s,
        )

    pid_cfg = PIDConfig(iterations=args.pid_iterations, batch_size=32, lr=2e-4, seed=cfg.seed)
    start = time.perf_counter()
    distill("pid", teacher_dir, work / "pid", pid_cfg, fit)
    pid_s = time.perf_counter() - start
    score("pid", 1, load_pid_student(work / "pid", device).sample(n, seeds()), pid_s)
    last = cfg.data.num_tasks - 1  # the floor: real training images of every class scored as samples
    floor = evaluator.real_data(select(scenario.train, scenario.seen_classes(last), None), test, size, cfg.seed, last)
    rows.extend(
        {"method": REAL_DATA, "steps": 0, "metric": m, "value": v, "train_s": 0.0, "iterations": 0}
        for m, v in floor.items()
    )

    results = pd.DataFrame(rows).assign(machine=machine(), teacher=str(teacher_dir))
    RESULTS.mkdir(parents=True, exist_ok=True)
    results.to_parquet(RESULTS / "fast_sampling.parquet")
    print(table(results))
    plot(results, RESULTS / "fast_sampling_fid.png")


def table(results: pd.DataFrame) -> str:
    wide = results.pivot_table(index=["method", "steps"], columns="metric", values="value").reset_index()
    return wide[["method", "steps", "fid", "kld", "tv"]].to_markdown(index=False, floatfmt=".3f")


def plot(results: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    fid = results[results.metric == "fid"]
    for method, sub in fid[fid.method != REAL_DATA].groupby("method"):
        sub = sub.sort_values("steps")
        ax.plot(sub.steps, sub.value, marker="o", label=method)
    for value in fid[fid.method == REAL_DATA].value:
        ax.axhline(value, color="k", linestyle="--", label="real data (the floor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # one DDIM step is orders of magnitude off; the floor sits near 3
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel("FID (Fashion-MNIST CNN features)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
