"""The Ray runtime on a real local cluster: determinism over sampler counts, killed actors and drivers, resume, jobs."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from safetensors.torch import load_file

from distcl.cli import main
from distcl.config import ConfigError, load_config
from distcl.continual import (
    InlineBackend,
    TeacherFiles,
    distill_replay_sampler,
    inline_image_replay,
    load_teacher,
    run_continual,
    task_dir,
)
from distcl.data import DEBIAN_DIR, build_scenario, cache_dir, load_fashion_mnist
from distcl.evaluation import Evaluator, metrics_from_chunks
from distcl.distill import fit_inline
from distcl.models import build_scheduler, build_unet, load_unet, save_checkpoint
from distcl.pid import load_pid_student
from distcl.replay import Teacher
from distcl.runtime import pipeline
from distcl.runtime.samplers import RemoteReplay, SamplerPool, classifier_replay
from distcl.training import InlineReplay, indexed_replay

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
# on the CPU, whatever the machine has: the bitwise claims are the CPU's (README, Determinism)
SHORT = ["data.num_tasks=2", "data.train_per_class=40", "data.test_per_class=20", "train.batch_size=8",
         "train.max_steps=12", "eval.num_samples=20", "eval.steps=2", "runtime.checkpoint_every=4",
         "runtime.num_samplers=1", "device=cpu", "runtime.use_gpu=false"]  # fmt: skip


def config(*extra):
    return load_config(preset="smoke", overrides=SHORT + list(extra))


def weights(out, k):
    return load_file(task_dir(out, k) / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b, atol=0.0):
    """Bitwise equal (atol 0), or equal up to float reordering (thread counts differ between processes)."""
    return a.keys() == b.keys() and all(torch.allclose(a[key], b[key], rtol=0, atol=atol) for key in a)


def keep_task_0(src, dst):
    """A copy of run ``src`` as it was after task 0 (saved and evaluated): a run to resume at task 1."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("task_1", "ray_train"))
    for table in ("metrics.parquet", "train_log.parquet"):
        df = pd.read_parquet(dst / table)
        df[df.task == 0].to_parquet(dst / table)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False)  # the jobs test starts its own head
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "run"
    run_continual(config("runtime.backend=inline"), out, progress=False, log=lambda _: None)
    return out


def test_killed_sampler_is_restarted_and_its_batches_reissued(cluster, inline_run):
    cfg = config("runtime.num_samplers=2")
    pool = SamplerPool(cfg, batch_size=8)
    try:
        teacher = [ray.put(TeacherFiles.read(cfg, task_dir(inline_run, 0)))]
        stream = RemoteReplay(pool.actors, 1, teacher, rank=0, world=1, steps=10, depth=4, timeout_s=120)
        pid = ray.get(pool.actors[0].where.remote())["pid"]
        got = [stream.get(s) for s in range(3)]  # steps 3..6 now in flight
        ray.kill(pool.actors[0], no_restart=False)
        got += [stream.get(s) for s in range(3, 10)]
        assert ray.get(pool.actors[0].where.remote())["pid"] != pid  # restarted
    finally:
        pool.stop()
    unet = load_unet(task_dir(inline_run, 0), cfg.model).eval()
    reference = InlineReplay(Teacher(unet, build_scheduler(cfg.model), 2), "gd", 8, cfg.seed, 1)
    for step, batch in enumerate(got):
        expected = reference.get(step)
        assert torch.equal(batch.timesteps, expected.timesteps)
        assert torch.allclose(batch.inputs, expected.inputs, atol=1e-4)  # the actor computes with 1 thread
        assert torch.allclose(batch.targets, expected.targets, atol=1e-4)


def test_samplers_draw_gd_replay_with_the_distilled_student(cluster, inline_run, tmp_path):
    cfg = config("replay_sampler.method=pid", "replay_sampler.iterations=2", "replay_sampler.batch_size=4",
                 "runtime.num_samplers=2")  # fmt: skip
    teacher_dir = tmp_path / "task_0"
    shutil.copytree(task_dir(inline_run, 0), teacher_dir)
    distill_replay_sampler(cfg, teacher_dir, fit_inline, progress=False, log=lambda _: None)
    pool = SamplerPool(cfg, batch_size=8)
    try:
        teacher = [ray.put(TeacherFiles.read(cfg, teacher_dir))]  # with its fast sampler's files
        got = ray.get([pool.actors[i % 2].make.remote(1, teacher, i) for i in range(2)])
    finally:
        pool.stop()
    fast, plain = load_teacher(cfg, teacher_dir, "cpu"), load_teacher(config(), teacher_dir, "cpu")
    for index, batch in enumerate(got):
        expected = indexed_replay(fast, "gd", 8, cfg.seed, 1, index)
        assert torch.allclose(batch.inputs, expected.inputs, atol=1e-4)
        assert torch.allclose(batch.targets, expected.targets, atol=1e-4)
        assert not torch.allclose(batch.inputs, indexed_replay(plain, "gd", 8, cfg.seed, 1, index).inputs, atol=1e-2)


def test_classifier_replay_images_come_from_the_samplers(cluster, inline_run, tmp_path):
    cfg = config("classifier.enabled=true", "classifier.batch_size=4", "classifier.replay_steps=2")
    pool = SamplerPool(cfg, batch_size=8)
    try:
        remote = classifier_replay(pool.actors, cfg, 1, [ray.put(TeacherFiles.read(cfg, task_dir(inline_run, 0)))], 3)
        got = [remote.get(s) for s in range(3)]
    finally:
        pool.stop()
    inline = inline_image_replay(cfg, 1, task_dir(inline_run, 0), steps=3)
    for step, images in enumerate(got):
        assert images.shape == (4, 1, 16, 16)
        assert torch.allclose(images, inline.get(step), atol=1e-4)


def test_evaluation_on_1_and_2_samplers_equals_inline_and_survives_a_killed_sampler(cluster, inline_run):
    cfg = config("data.test_per_class=50", "eval.num_samples=160", "eval.batch_size=40")  # 4 + 5 chunks
    splits = load_fashion_mnist(DEBIAN_DIR)
    test = build_scenario(splits, cfg.data, cfg.seed, 16).test_split(1)
    evaluator = Evaluator(cfg.eval, splits["train"], splits["test"], cache_dir(), torch.device("cpu"), progress=False)
    job = evaluator.job(1, cfg.seed, cfg.model, load_unet(task_dir(inline_run, 1), cfg.model).state_dict(), test, 16)
    inline, inline_grid = metrics_from_chunks(InlineBackend(torch.device("cpu")).evaluate(job, False), test.labels)
    for n in (1, 2):
        pool = SamplerPool(config(f"runtime.num_samplers={n}"), batch_size=8)
        try:
            chunks = pool.evaluate(job)
            got = [next(chunks)]
            pid = ray.get(pool.actors[-1].where.remote())["pid"]
            if n == 2:
                ray.kill(pool.actors[-1], no_restart=False)  # its queued chunks are retried on the restarted actor
            got += list(chunks)
            assert (ray.get(pool.actors[-1].where.remote())["pid"] != pid) == (n == 2)
        finally:
            pool.stop()
        assert sorted((r.chunk.kind, r.chunk.start) for r in got) == sorted((c.kind, c.start) for c in job.chunks())
        metrics, grid = metrics_from_chunks(got, test.labels)
        assert metrics == pytest.approx(inline, rel=1e-4) and (grid.int() - inline_grid.int()).abs().max() <= 1


def test_a_raising_sampler_is_a_clear_error(cluster, inline_run, tmp_path):
    pool = SamplerPool(config(), batch_size=8)
    try:
        stream = RemoteReplay(pool.actors, 1, [ray.put(TeacherFiles("task_0", {}))], 0, 1, steps=4, depth=2,
                              timeout_s=60)  # fmt: skip
        with pytest.raises(Exception, match="no diffusers checkpoint at .*task_0"):
            stream.get(0)
    finally:
        pool.stop()
    with pytest.raises(FileNotFoundError, match="no diffusers checkpoint at .*no-teacher"):  # read in the driver
        TeacherFiles.read(config(), tmp_path / "no-teacher")


def test_layout_larger_than_the_cluster_is_refused(cluster):
    with pytest.raises(ConfigError, match=r"runtime: the layout needs 9 CPU but the cluster has 4 .*num_samplers=8"):
        pipeline.check_layout(pipeline.connect(config("runtime.num_samplers=8")))
    for gpus in ("runtime.use_gpu=true", "runtime.sampler_gpus=1"):  # this cluster has no GPU
        assert pipeline.connect(config(gpus)).runtime.use_gpu is (gpus == "runtime.use_gpu=true")
        with pytest.raises(ConfigError, match=r"needs 1 GPU but the cluster has 0"):
            pipeline.check_layout(pipeline.connect(config(gpus)))
    assert pipeline.connect(config("runtime.use_gpu=null")).runtime.use_gpu is False


def test_mismatched_teacher_checkpoint_is_refused(inline_run):
    with pytest.raises(ValueError, match="another architecture than model.preset 'small'.*sample_size 16"):
        load_unet(task_dir(inline_run, 0), config("model.preset=small").model)
    with pytest.raises(FileNotFoundError, match="no diffusers checkpoint"):
        load_unet(inline_run / "nope", config().model)


def _private(cmd, **kwargs):
    """Run ``cmd`` in a private PID namespace: killing it ends every process it started, and nothing else."""
    return subprocess.Popen(["unshare", "-pf", "--mount-proc", "--kill-child=SIGKILL", *cmd], **kwargs)


def test_a_ray_run_through_a_killed_driver_trains_the_inline_student_bitwise(cluster, inline_run, tmp_path):
    """Task 1 on Ray, from the inline run's task-0 model, by a driver that joins the cluster (as a Ray job's does)
    with 1 sampler actor, is killed mid-task, and is run again with 2 sampler actors: it trains the student of the
    inline run, bitwise (both compute with 1 thread). (A fault in a Train worker, which restarts the worker group
    from the same checkpoints: test_distill_ray.py.)"""
    long = ["train.max_steps=40", "runtime.checkpoint_every=10"]
    reference = tmp_path / "reference"
    keep_task_0(inline_run, reference)  # task 0 as the run's (the config's diff is max_steps alone)
    (reference / "config.yaml").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Train worker and the sampler actors
    try:
        run_continual(config("runtime.backend=inline", *long), reference, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    task_1 = pd.read_parquet(reference / "train_log.parquet").query("task == 1")

    out = tmp_path / "killed"
    keep_task_0(reference, out)
    cmd = [sys.executable, "-m", "distcl.cli", "run", "--preset", "smoke", "--out", str(out), "--no-progress"]
    cmd += [arg for o in SHORT + long for arg in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # SIGKILL, as a lost node or an OOM kill: a driver joining a cluster starts no process of its own
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    snapshot = out / "ray_train" / "workers" / "checkpoint_manager_snapshot.json"  # a checkpoint is registered
    while not snapshot.exists() and time.time() < deadline:
        assert driver.poll() is None, "the driver ended before its first checkpoint"
        time.sleep(0.2)
    killed_at = time.time()
    driver.kill()
    driver.wait()
    assert not task_dir(out, 1).exists()
    resumed = subprocess.run([*cmd, "--set", "runtime.num_samplers=2"], capture_output=True, text=True, timeout=300,
                             env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    print(f"driver killed, resumed run finished {time.time() - killed_at:.1f}s later")
    assert "task 0" not in resumed.stdout.replace("task 0 (", "")  # task 0 not redone
    recoveries = re.findall(r"task 1: recovered at step (\d+)", resumed.stdout)
    assert len(recoveries) == 1 and int(recoveries[0]) in (10, 20, 30), resumed.stdout[-4000:]  # at a checkpoint
    assert same_weights(weights(out, 1), weights(reference, 1))
    assert not same_weights(weights(out, 1), weights(out, 0), atol=1e-4)
    assert not (out / "ray_train").exists() or not any((out / "ray_train").iterdir())
    on_ray = pd.read_parquet(out / "train_log.parquet").query("task == 1")
    assert on_ray.step.tolist() == task_1.step.tolist()  # no duplicated rows
    assert (on_ray.replay_wait_s < on_ray.step_s).all() and (on_ray.replay_wait_s > 0).any()  # waits are timed


def losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _submit(address: str, env: dict, entrypoint: list[str]) -> str:
    """``ray job submit --no-wait`` of ``entrypoint`` from the repository root: the job id."""
    submit = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--no-wait", "--",
                             *entrypoint], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1],
                            timeout=120)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(0)


def _wait(address: str, env: dict, job_id: str, timeout_s: float) -> tuple[str, str]:
    """Follow the job's logs to its end (one ``ray job logs --follow``, not a ``ray`` process per poll): (status,
    logs)."""
    logs = subprocess.run([RAY, "job", "logs", "--address", address, "--follow", job_id], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s).stdout  # fmt: skip
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout  # fmt: skip
    return status, logs


def test_run_with_a_fast_replay_sampler_and_a_distillation_as_ray_jobs(tmp_path):
    """jobs/train_cl.py: gd with a PID replay sampler distilled on Ray Train in the job (the continual classifier
    on Ray is in test_multinode.py);
    jobs/distill.py: ``distcl distill pid`` on a Train worker, side by side with it on the same cluster: the
    losses of one process (two DDP workers and a fault: test_distill_ray.py)."""
    gcs, dashboard, agent, client = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rj")  # short: Ray's socket paths must fit 107 bytes
    # as a user whose environment is activated: `ray` and the jobs' `python` are the project's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    head = _private([RAY, "start", "--head", "--block", "--num-cpus", "4", "--port", str(gcs),
                     "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
                     "--ray-client-server-port", str(client), "--temp-dir", temp_dir, "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    overrides = SHORT + ["replay_sampler.method=pid", "replay_sampler.iterations=3", "replay_sampler.batch_size=8"]
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.time() < deadline, "the head node did not come up"
            time.sleep(1)
        # relative --out: the job's driver runs in its own copy of the working dir, and writes there
        train_job = _submit(address, env, ["python", "jobs/train_cl.py", "--preset", "smoke", "--out",
                                           "runs/job-smoke", *[a for o in overrides for a in ("--set", o)]])  # fmt: skip
        teacher = tmp_path / "teacher"  # the two jobs run side by side on the cluster
        save_checkpoint(build_unet(config().model), build_scheduler(config().model), teacher)
        pid = ["--set", "iterations=3", "--set", "batch_size=4", "--set", "grid_points=20"]
        distill_job = _submit(address, env, ["python", "jobs/distill.py", "pid", "--teacher", str(teacher), "--out",
                                             "runs/pid", *pid])  # fmt: skip
        inline = tmp_path / "pid_inline"
        assert main(["distill", "pid", "--teacher", str(teacher), "--out", str(inline), "--inline", "--device", "cpu",
                     *pid]) == 0  # fmt: skip
        odd = ["distill", "pid", "--teacher", str(teacher), "--out", str(tmp_path / "odd"), "--workers", "2"]
        assert main([*odd, *pid, "--set", "batch_size=3"]) == 2  # 3 into 2 workers: refused before Ray starts
        status, logs = _wait(address, env, train_job, 480)
        assert "succeeded" in status.lower(), status + logs[-3000:]
        out = Path(re.search(r"\[distcl\] done: (\S+)/metrics.parquet", logs).group(1))
        assert out.is_absolute() and out.parts[-2:] == ("runs", "job-smoke")
        status, pid_logs = _wait(address, env, distill_job, 240)
        assert "succeeded" in status.lower(), status + pid_logs[-3000:]
        pid_out = Path(re.search(r"\[distcl\] done: (\S+)", pid_logs).group(1))
        metrics = pd.read_parquet(out / "metrics.parquet")
        assert sorted(metrics.task.unique()) == [0, 1] and "task 1 evaluated" in logs
        assert (out / "replay_sampler" / "task_0" / "pid.json").is_file() and "pid pid: 3 iterations" in logs
        assert "pid pid step 3/3" in logs  # progress from the Train worker
        assert pid_out.is_absolute() and pid_out.parts[-2:] == ("runs", "pid") and "pid pid: 3 iterations" in pid_logs
        assert losses(pid_out / "log.jsonl") == pytest.approx(losses(inline / "log.jsonl"), rel=1e-4)
        assert load_pid_student(pid_out).sample(4, torch.Generator().manual_seed(0)).shape == (4, 1, 16, 16)
    finally:
        head.send_signal(signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
