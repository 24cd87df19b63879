"""cluster.yaml's local twin under load, with a timeline: a smoke job from zero nodes, the same job with a sampler
node and then a trainer node reclaimed mid-task, the scale-down after each, and a Tune sweep (tuning/twin.yaml)
that grows the twin to its most nodes.

    python benchmarks/autoscale.py          # about 10 minutes on 2 cores

The node count per type over time comes from Ray's state API (each node's start and end time), the run's phases
from the job's console (timestamped as its lines arrive: up to a second late). Prints a table, writes
benchmarks/results/autoscale.json and autoscale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, machine  # noqa: E402
from distcl import launch  # noqa: E402
from distcl.config import load_config  # noqa: E402
from distcl.runtime.twin import (  # noqa: E402
    HEAD_TYPE,
    node_type_of,
    preempt,
    ray_state,
    start_twin,
    stop_twin,
    twin_nodes,
)
from tests.ray_jobs import ROOT, follow, status, submit  # noqa: E402

RUN = [
    "data.num_tasks=2",
    "data.train_per_class=40",
    "data.test_per_class=20",
    "train.batch_size=8",
    "train.max_steps=40",
    "eval.num_samples=20",
    "eval.steps=2",
    "runtime.checkpoint_every=10",
    "runtime.num_samplers=1",
    "classifier.enabled=true",
    "classifier.epochs=0.2",
]
ON_NODE_TYPES = ["runtime.worker_resource=trainer_slot", "runtime.sampler_resource=sampler_slot"]
PHASES = [
    ("first training step", r"task 0 step 1/"),
    ("task 0 end", r"task 0 evaluated"),
    ("task 1 end", r"task 1 evaluated"),
]


def node_intervals(twin, since: float) -> list[dict]:
    """The twin's worker nodes started after ``since``: type, start and end (None: alive) in seconds."""
    rows = []
    for node in ray_state(twin.address, "nodes"):
        kind = node_type_of(node["resources_total"], twin.worker_types)
        start = pd.Timestamp(node["start_time_ms"]).timestamp()
        end = pd.Timestamp(node["end_time_ms"]).timestamp() if node["state"] == "DEAD" else None
        if kind != HEAD_TYPE and start >= since - 1:
            rows.append({"node_id": node["node_id"], "type": kind, "start": start, "end": end})
    return sorted(rows, key=lambda r: r["start"])


def wait_for_scale_down(twin, timeout_s: float = 180) -> float:
    """Seconds until no worker node of the twin is left (its processes, read from /proc: cheap)."""
    start = time.time()
    while twin_nodes(twin.name) and time.time() - start < timeout_s:
        time.sleep(0.5)
    return time.time()


def job(twin, env, entrypoint: list[str], reclaim: str | None = None, at: str = "task 1 step 1/40") -> dict:
    """Submit, follow, reclaim a node of type ``reclaim`` when ``at`` shows up; the events (epoch seconds)."""
    events = {"submitted": time.time()}
    job_id = submit(twin.address, env, entrypoint)
    lines = []
    with follow(twin.address, env, job_id) as console:
        for line in console.stdout:
            lines.append(line)
            for phase, pattern in PHASES:
                if phase not in events and re.search(pattern, line):
                    events[phase] = time.time()
            if reclaim and "node lost" not in events and at in line:
                events["node lost"] = time.time()
                events["lost node"] = preempt(twin.name, reclaim).split()[1]
    events["finished"] = time.time()
    events["status"] = "succeeded" if "succeeded" in status(twin.address, env, job_id).lower() else "failed"
    events["console"] = "".join(lines)
    return events


def scenario(twin, env, out: Path, reclaim: str | None, reference: pd.DataFrame) -> dict:
    args = [a for o in RUN + ON_NODE_TYPES for a in ("--set", o)]
    ev = job(twin, env, ["python", "jobs/train_cl.py", "--preset", "smoke", "--out", str(out), *args], reclaim)
    scaled_down = wait_for_scale_down(twin)
    nodes = node_intervals(twin, ev["submitted"])
    result = {
        "reclaimed": reclaim,
        "status": ev["status"],
        "nodes": nodes,
        "events": {k: v for k, v in ev.items() if isinstance(v, float)},
    }
    t0 = ev["submitted"]
    result["submit_to_first_step_s"] = ev["first training step"] - t0
    result["wall_s"] = ev["finished"] - t0
    result["scale_down_s"] = max(n["end"] or scaled_down for n in nodes) - ev["finished"]
    result["recovered_at"] = re.findall(r"task 1: recovered at step (\d+)", ev["console"])
    if reclaim:
        back = [n for n in nodes if n["type"] == reclaim and n["start"] > ev["node lost"]]
        result["replace_s"] = back[0]["start"] - ev["node lost"] if back else None
        result["lost_node"] = ev["lost node"]
    ours = pd.read_parquet(out / "metrics.parquet").set_index(["task", "metric"]).value
    result["max_abs_metric_diff_vs_inline"] = float((ours - reference).abs().max())
    result["metrics"] = {f"task{t} {m}": v for (t, m), v in ours.items()}
    return result


def sweep(twin, env, out: Path) -> dict:
    ev = job(twin, env, ["python", "jobs/sweep.py", "tuning/twin.yaml", "--out", str(out)])
    scaled_down = wait_for_scale_down(twin)
    nodes = node_intervals(twin, ev["submitted"])
    trials = pd.read_parquet(out / "sweep.parquet")
    times = sorted({n["start"] for n in nodes} | {n["end"] or scaled_down for n in nodes})
    alive = max(sum(n["start"] <= t < (n["end"] or scaled_down) for n in nodes) for t in times) if nodes else 0
    return {
        "status": ev["status"],
        "nodes": nodes,
        "events": {"submitted": ev["submitted"], "finished": ev["finished"]},
        "trials": len(trials),
        "completed": int((trials.status == "completed").sum()),
        "max_nodes_alive": alive,
        "max_nodes": sum(t["max_workers"] for t in twin.worker_types.values()),
        "wall_s": ev["finished"] - ev["submitted"],
    }


def plot(results: dict, path: Path) -> None:
    runs = list(results["runs"].items()) + [("tune sweep", results["tune"])]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), sharex=False)
    for ax, (name, run) in zip(axes, runs):
        t0 = run["events"]["submitted"]
        end = max([n["end"] or run["events"]["finished"] for n in run["nodes"]] + [run["events"]["finished"]])
        grid = [t0 + i * 0.5 for i in range(int((end - t0) / 0.5) + 20)]
        for kind in sorted({n["type"] for n in run["nodes"]}):
            count = [
                sum(n["type"] == kind and n["start"] <= t < (n["end"] or end + 10) for n in run["nodes"]) for t in grid
            ]
            ax.step([t - t0 for t in grid], count, where="post", label=kind)
        for i, (label, t) in enumerate(sorted(run["events"].items(), key=lambda e: e[1])):
            ax.axvline(t - t0, color="grey", lw=0.8, ls="--")
            ax.text(t - t0, ax.get_ylim()[1] * (0.95 - 0.45 * (i % 2)), label, rotation=90, fontsize=7, va="top")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("nodes")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds since the job was submitted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default=str(ROOT / "cluster.yaml"))
    parser.add_argument("--idle-timeout-s", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distcl-autoscale-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Train worker and the sampler actor compute
    launch.run(
        load_config(preset="smoke", overrides=RUN + ["runtime.backend=inline", "device=cpu"]),
        work / "inline",
        progress=False,
        log=lambda _: None,
    )
    torch.set_num_threads(threads)
    reference = pd.read_parquet(work / "inline" / "metrics.parquet").set_index(["task", "metric"]).value
    twin = start_twin(args.cluster, idle_timeout_s=args.idle_timeout_s, max_node_cpus=1, max_nodes_per_type=2)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the jobs' python: the project's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    try:
        runs = {}
        for name, reclaim in (
            ("uninterrupted", None),
            ("sampler node reclaimed", "sampler"),
            ("trainer node reclaimed", "gpu_trainer"),
        ):
            print(f"[autoscale] {name} ...", flush=True)
            runs[name] = scenario(twin, env, work / name.replace(" ", "_"), reclaim, reference)
        print("[autoscale] tune sweep ...", flush=True)
        tune = sweep(twin, env, work / "sweep")
    finally:
        stop_twin(twin.name)
    results = {
        "machine": machine(),
        "cluster": "cluster.yaml, twin with 1 CPU per node, at most 2 nodes per type, "
        f"idle timeout {args.idle_timeout_s:g} s",
        "runs": runs,
        "tune": tune,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoscale.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "autoscale.png")
    rows = [
        [
            name,
            r["status"],
            f"{r['submit_to_first_step_s']:.1f}",
            f"{r.get('replace_s') or 0:.1f}",
            ",".join(r["recovered_at"]) or "-",
            f"{r['scale_down_s']:.1f}",
            f"{r['wall_s']:.1f}",
            f"{r['max_abs_metric_diff_vs_inline']:.2g}",
        ]
        for name, r in runs.items()
    ]
    print(
        tabulate(
            rows,
            headers=[
                "run",
                "status",
                "submit->1st step s",
                "node replaced in s",
                "resumed at step",
                "scale-down s",
                "wall s",
                "max |metric - inline|",
            ],
        )
    )
    print(
        f"tune: {tune['completed']}/{tune['trials']} trials completed, at most {tune['max_nodes_alive']} of "
        f"{tune['max_nodes']} nodes alive at once, {tune['wall_s']:.0f} s"
    )
    print(f"wrote {RESULTS / 'autoscale.json'} and {RESULTS / 'autoscale.png'}")


if __name__ == "__main__":
    main()
