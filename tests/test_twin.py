"""cluster.yaml rehearsed on this machine: its local twin (Ray's autoscaler, fake nodes of the file's node types)
scales from zero for a smoke job on an RGB image folder (``ray job submit``, relative --out, a PID replay sampler
distilled on the Train workers, the continual classifier), loses the sampler node before the task it serves
replay to (a spot reclaim), replaces it, and the run ends with the inline run's metrics; ``--down`` leaves no
process of the twin behind. The test waits on the events it asserts (a file of the run, Ray's node and actor
states), never on a console line's timing."""

import json
import os
import re
import sys
import time
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
    twin_temp_dir,
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


def wait_for(what: str, check, timeout_s: float = 600.0, every_s: float = 0.5):
    """``check()``'s first truthy value, polled; fails naming ``what`` after ``timeout_s`` (a bound on a stuck run,
    generous: on 2 busy cores the job took 4 minutes to reach task 1)."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g}s"
        time.sleep(every_s)
    return found


@pytest.mark.timeout(1200)
def test_the_twin_scales_from_zero_survives_a_lost_sampler_node_and_trains_the_inline_run(tmp_path, capsys):
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
        with follow(twin.address, env, job) as console:
            # The spot reclaim between the tasks, on the run directory's event (not a console line, which can
            # arrive after the task it reports has ended): task 1's fast replay sampler is distilled, so task 0
            # has trained on the sampler node, and every replay batch of task 1 is still to be made.
            sessions = Path(twin_temp_dir(twin.name)) / "session_latest" / "runtime_resources" / "working_dir_files"
            distilled = wait_for(
                "task 1's replay sampler", lambda: list(sessions.glob("*/runs/twin/replay_sampler/task_0/pid.json"))
            )
            out = distilled[0].parents[2].resolve()  # session_latest is a link to the session
            reclaimed = [n for n, t in twin_nodes(twin.name).items() if t == "sampler"]
            assert len(reclaimed) == 1
            reclaimed = reclaimed[0]
            capsys.readouterr()
            assert main(["cluster", "local", "--preempt", "sampler", str(ROOT / "cluster.yaml")]) == 0
            report = capsys.readouterr().out
            assert re.fullmatch(
                rf"\[distcl\] node {reclaimed} \(sampler\) reclaimed: [1-9]\d* processes killed\n", report
            )

            def nodes() -> dict[str, dict]:
                return {n["node_id"]: n for n in ray_state(twin.address, "nodes")}

            # the events the rest rests on: the node marked dead, a new sampler node up, the actor restarted on it
            wait_for("dead reclaimed node", lambda: nodes()[reclaimed]["state"] == "DEAD", every_s=1)
            replacement = wait_for(
                "replacement sampler node",
                lambda: [
                    n
                    for n, node in nodes().items()
                    if n != reclaimed
                    and node["state"] == "ALIVE"
                    and node_type_of(node["resources_total"], twin.worker_types) == "sampler"
                ],
                every_s=1,
            )
            assert len(replacement) == 1
            replacement = replacement[0]
            restarted = wait_for(
                "sampler actor restarted on the replacement",
                lambda: [
                    a
                    for a in ray_state(twin.address, "actors", "class_name=TeacherSampler")
                    if a["node_id"] == replacement and a["num_restarts"] >= 1
                ],
                every_s=1,
            )
            assert len(restarted) == 1
            logs = console.stdout.read().splitlines(keepends=True)  # until the job ends
        beside.result()
        assert "succeeded" in status(twin.address, env, job).lower(), "".join(logs[-60:])
        console = "".join(logs)
        done = Path(re.search(r"\[distcl\] done: (\S+)/metrics.parquet", console).group(1))
        assert done == out and out.is_absolute() and out.parts[-2:] == ("runs", "twin")
        assert "pid pid step 3/3" in console and "pid pid: 3 iterations" in console  # on the Train worker
        assert (out / "replay_sampler" / "task_0" / "pid.json").is_file()

        every = nodes()  # alive or dead: the idle timeout may have taken the nodes down since the job ended
        types = {n: node_type_of(node["resources_total"], twin.worker_types) for n, node in every.items()}
        assert sorted(types.values()) == ["gpu_trainer", "ray.head.default", "sampler", "sampler"], types
        assert "health check failed" in every[reclaimed]["state_message"]  # lost, not scaled down
        placement = json.loads((out / "placement.json").read_text())
        trainer = next(n for n, t in types.items() if t == "gpu_trainer")
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
    finally:
        stop_twin(twin.name)
    assert processes_with(TWIN_ENV, twin.name) == []
