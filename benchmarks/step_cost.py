"""What gd's replay costs over gr's (the paper: about one teacher forward per replay item), from the train logs of
short runs side by side on this machine's CPU. For each seed, one inline run of gd and one of gr (the cpu preset with
the benchmark sweep's 2 teacher steps, 2 tasks x STEPS steps, the continual classifier off, a small evaluation;
which strategy goes first alternates with the seed), the median step time of task 1 (the one with replay: the
inline step makes its replay, so gd's step holds the teacher's target forward that gr's does not) and of the time
it spent making its replay, from each run's train log (a row every step), and, between the two runs in the same
process, one teacher forward of a training batch (the first run's task-0 model; the median of FORWARDS).

    python -m benchmarks.step_cost            # about 3 minutes a seed on 2 cores

Writes benchmarks/results/step_cost.json: per seed the step and replay medians of both and the forward, and the
machine. A seed already there, measured on this machine type, is kept (the script resumes).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import RESULTS, machine, machine_type
from distcl.config import load_config
from distcl.launch import run
from distcl.models import load_unet
from distcl.rundir import task_dir

SEEDS = (42, 69, 1714, 1, 2, 3)
STEPS = 150
FORWARDS = 30
RUN = [
    "runtime.backend=inline",
    "device=cpu",  # where the teacher forward is timed too
    "train.teacher_steps=2",
    "data.num_tasks=2",
    f"train.max_steps={STEPS}",
    "train.log_every=1",  # every step's time in the train log
    "classifier.enabled=false",
    "eval.num_samples=100",
]
PATH = RESULTS / "step_cost.json"


def task1_medians(out: Path) -> tuple[float, float]:
    """The median step time of task 1 in run ``out`` and the median time its steps spent making their replay."""
    log = pd.read_parquet(out / "train_log.parquet")
    task1 = log[log.task == 1]
    return float(task1.step_s.median()), float(task1.replay_wait_s.median())


def teacher_forward_s(cfg, teacher_dir: Path) -> float:
    """The median time of one forward of the model at ``teacher_dir`` on a training batch (no gradients)."""
    unet = load_unet(teacher_dir, cfg.model, "cpu", cfg.data.image_channels).eval()
    size, batch = unet.config.sample_size, cfg.train.batch_size
    x = torch.randn(batch, cfg.data.image_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)
    times = []
    with torch.no_grad():
        unet(x, t)  # warm-up
        for _ in range(FORWARDS):
            began = time.perf_counter()
            unet(x, t)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="distcl-step-cost-"))
    here, description = machine(), f"cpu preset, inline, 2 teacher steps, 2 tasks x {STEPS} steps; task 1's median step"
    old = json.loads(PATH.read_text()) if PATH.exists() else {}
    same = old.get("run") == description and machine_type(old.get("machine", "")) == machine_type(here)
    rows = old["seeds"] if same else []
    for i, seed in enumerate(SEEDS):
        if any(r["seed"] == seed for r in rows):
            continue
        order = ("gd", "gr") if i % 2 == 0 else ("gr", "gd")
        row = {"seed": seed, "order": "/".join(order)}
        for strategy in order:
            cfg = load_config(preset="cpu", overrides=RUN + [f"seed={seed}", f"train.strategy={strategy}"])
            out = work / f"{strategy}-{seed}"
            run(cfg, out, progress=False, log=lambda _: None)
            row[f"{strategy}_step_s"], row[f"{strategy}_replay_s"] = task1_medians(out)
            if strategy == order[0]:
                row["teacher_forward_s"] = teacher_forward_s(cfg, task_dir(out, 0))
        rows.append(row)
        print(
            f"seed {seed}: gd {row['gd_step_s'] * 1000:.1f} ms, gr {row['gr_step_s'] * 1000:.1f} ms, "
            f"gd - gr {(row['gd_step_s'] - row['gr_step_s']) * 1000:.1f} ms (making the replay: "
            f"{(row['gd_replay_s'] - row['gr_replay_s']) * 1000:.1f} ms), one teacher forward "
            f"{row['teacher_forward_s'] * 1000:.1f} ms",
            flush=True,
        )
        RESULTS.mkdir(parents=True, exist_ok=True)  # after every seed: an interrupted run keeps what it measured
        PATH.write_text(json.dumps({"run": description, "seeds": rows, "machine": here}, indent=2))


if __name__ == "__main__":
    main()
