"""cluster.yaml rehearsed on this machine: its local twin (Ray's autoscaler, fake nodes of the file's node types)
scales from zero for a smoke job on an RGB image folder (``ray job submit``, relative --out, a PID replay sampler
distilled on the Train workers, the continual classifier), loses the sampler node mid-task (a spot reclaim),
replaces it, and the run ends with the inline run's metrics; ``--down`` leaves no process of the twin behind."""

import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import DDIMPipeline

from distcl.cli import main
from distcl.config import load_config
from distcl.runtime.twin import (
    TWIN_ENV,
    node_type_of,
    processes_with,
    ray_state,
    start_twin,
    stop_twin,
    twin_nodes,
)
from tests.image_data import write_folder
from tests.ray_jobs import ROOT, follow, status, submit
from tests.references import inline_beside

pytestmark = pytest.mark.slow

SHORT = [
    "data.source=image_folder",  # RGB: the user's own images, on Ray (a folder written by the test)
    "data.tasks=[[red, blue], [green]]",
    "train.batch_size=8",
    "train.max_steps=40",
    "eval.num_samples=20",
    "eval.steps=2",
    "runtime.checkpoint_every=10",
    "runtime.num_samplers=1",
    "classifier.enabled=true",
    "classifier.epochs=0.2",
    "replay_sampler.method=pid",
    "replay_sampler.iterations=3",
    "replay_sampler.batch_size=8",
]
ON_NODE_TYPES = ["runtime.worker_resource=trainer_slot", "runtime.sampler_resource=sampler_slot"]


def test_the_twin_scales_from_zero_survives_a_lost_sampler_node_and_trains_the_inline_run(tmp_path):
    folder = write_folder(tmp_path / "colours", per_class=10)
    short = [*SHORT, f"data.data_dir={folder}"]
    twin = start_twin(ROOT / "cluster.yaml", idle_timeout_s=10, max_node_cpus=1)
    try:
        assert twin_nodes(twin.name) == {}  # min_workers: 0
        assert "GPU" not in twin.worker_types["gpu_trainer"]["resources"]  # none on this machine: runs on CPU
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the jobs' python: the project's
        env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
        # relative --out: the job's driver runs in its own copy of the working dir, and writes there
        job = submit(
            twin.address,
            env,
            [
                "python",
                "jobs/train_cl.py",
                "--preset",
                "smoke",
                "--out",
                "runs/twin",
                *[a for o in short + ON_NODE_TYPES for a in ("--set", o)],
            ],
        )
        # the inline run, with 1 thread as the Train worker and the sampler actor compute, while the twin scales up
        reference = tmp_path / "inline"
        inline = load_config(preset="smoke", overrides=short + ["runtime.backend=inline", "device=cpu"])
        beside = inline_beside(inline, reference)
        logs, reclaimed = [], None
        with follow(twin.address, env, job) as console:
            for line in console.stdout:
                logs.append(line)
                # mid-task (the line arrives a little late), while the sampler node serves replay
                if reclaimed is None and "task 1 step 1/40" in line:
                    sampler = [n for n, t in twin_nodes(twin.name).items() if t == "sampler"]
                    assert len(sampler) == 1
                    reclaimed = sampler[0]
                    assert main(["cluster", "local", "--preempt", "sampler", str(ROOT / "cluster.yaml")]) == 0
        beside.result()
        assert "succeeded" in status(twin.address, env, job).lower(), "".join(logs[-60:])
        assert reclaimed is not None, "".join(logs[-60:])
        console = "".join(logs)
        out = Path(re.search(r"\[distcl\] done: (\S+)/metrics.parquet", console).group(1))
        assert out.is_absolute() and out.parts[-2:] == ("runs", "twin")
        assert "pid pid step 3/3" in console and "pid pid: 3 iterations" in console  # on the Train worker
        assert (out / "replay_sampler" / "task_0" / "pid.json").is_file()

        nodes = ray_state(twin.address, "nodes")
        types = {n["node_id"]: node_type_of(n["resources_total"], twin.worker_types) for n in nodes}
        alive = {n["node_id"] for n in nodes if n["state"] == "ALIVE"}
        assert sorted(types.values()) == ["gpu_trainer", "ray.head.default", "sampler", "sampler"], types
        assert reclaimed not in alive and len(alive) == 4 - 1  # the reclaimed sampler node replaced
        placement = json.loads((out / "placement.json").read_text())
        trainer = next(n for n, t in types.items() if t == "gpu_trainer")
        replacement = next(n for n, t in types.items() if t == "sampler" and n != reclaimed)
        assert placement["task_0"] == {"train_workers": [trainer], "samplers": [reclaimed]}
        assert placement["task_1"] == {"train_workers": [trainer], "samplers": [replacement]}
        started = {
            name: len(ray_state(twin.address, "actors", f"class_name={name}"))
            for name in ("TeacherSampler", "RayTrainWorker")
        }
        assert started == {"TeacherSampler": 1, "RayTrainWorker": 1}  # once per run: the sampler restarted

        ours, inline = (
            pd.read_parquet(d / "metrics.parquet").sort_values(["task", "metric"]) for d in (out, reference)
        )
        assert {"accuracy", "fid"} <= set(ours.metric)
        assert ours[["task", "metric"]].values.tolist() == inline[["task", "metric"]].values.tolist()
        assert ours.value.tolist() == pytest.approx(inline.value.tolist(), rel=1e-4, abs=1e-6)
        images = DDIMPipeline.from_pretrained(out / "task_1")(
            batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        assert images.shape == (2, 16, 16, 3)  # an RGB checkpoint diffusers samples
        trained_s = float(re.search(r"task 1 \(.*\): trained 40 steps in ([\d.]+)s", console).group(1))
        assert trained_s > 10  # it waited for the replacement node (about 5 s without a reclaim)
    finally:
        stop_twin(twin.name)
    assert processes_with(TWIN_ENV, twin.name) == []
