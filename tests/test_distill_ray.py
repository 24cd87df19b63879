"""Distillation on Ray Train: two DDP workers, each on half of every step's batch, and a worker fault with a
restart from the last checkpoint, train the same students as one process; ``jobs/distill.py pid`` as the
driver of a Ray job runs it (a job's submission: test_twin.py)."""

import json
import runpy
import sys

import pytest
import ray
from safetensors.torch import load_file

from distcl.cli import main
from distcl.config import ModelConfig, ProgressiveConfig, RuntimeConfig
from distcl.distill import distill, fit_inline
from distcl.models import build_scheduler, save_checkpoint
from distcl.runtime.distill import RayDistillFit
from distcl.runtime.workers import FAULT_ENV
from distcl.settings import ConfigError
from tests.ray_jobs import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def teacher_dir(tmp_path, unet):
    save_checkpoint(unet, build_scheduler(ModelConfig()), tmp_path / "teacher")
    return tmp_path / "teacher"


def weights(directory):
    return load_file(directory / "unet" / "diffusion_pytorch_model.safetensors")


def distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt().item()


def losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_two_ray_workers_with_a_fault_train_the_inline_students(cluster, teacher_dir, tmp_path, monkeypatch):
    cfg = ProgressiveConfig(start_steps=2, target_steps=1, iterations=6, batch_size=4, lr=1e-3)
    quiet = dict(progress=False, log=lambda _: None)
    inline = distill("progressive", teacher_dir, tmp_path / "inline", cfg, fit_inline, **quiet)
    marker = tmp_path / "fault_happened"
    monkeypatch.setenv(FAULT_ENV, f"{tmp_path / 'ray' / 'steps_1'}:3:{marker}")  # after the checkpoint at step 1
    fit = RayDistillFit(RuntimeConfig(num_workers=2, checkpoint_every=2, max_failures=1))
    try:
        on_ray = distill("progressive", teacher_dir, tmp_path / "ray", cfg, fit, **quiet)
    finally:
        fit.close()
    assert marker.exists()
    assert [p.name for p in on_ray] == [p.name for p in inline] == ["steps_1"]
    start = weights(teacher_dir)
    for a, b in zip(inline, on_ray):
        ours, theirs = weights(a), weights(b)
        # equal up to float reordering, which Adam's m / sqrt(v) amplifies where gradients are ~0: compare the
        # gap with the update itself (workers on the same rows, a half batch, would miss by tens of percent)
        assert distance(ours, theirs) < 1e-2 * distance(ours, start)
        start = ours
        assert losses(a / "log.jsonl") == pytest.approx(losses(b / "log.jsonl"), rel=1e-4)
        assert len(losses(b / "log.jsonl")) == 6  # the restarted worker group logged each step once
    with pytest.raises(ConfigError, match="batch_size"):
        fit.check(5)


def test_the_distill_job_entrypoint_trains_the_inline_pid_student(cluster, teacher_dir, tmp_path, monkeypatch):
    """``python jobs/distill.py pid`` as a job's driver runs it (in this process: the cluster is joined, as
    inside a job): with a relative --out, in its working dir, the losses of one process."""
    pid = ["--set", "iterations=3", "--set", "batch_size=4", "--set", "grid_points=20"]
    inline = tmp_path / "pid_inline"
    assert (
        main(
            ["distill", "pid", "--teacher", str(teacher_dir), "--out", str(inline), "--inline", "--device", "cpu", *pid]
        )
        == 0
    )
    odd = ["distill", "pid", "--teacher", str(teacher_dir), "--out", str(tmp_path / "odd"), "--workers", "2"]
    assert main([*odd, *pid, "--set", "batch_size=3"]) == 2  # 3 into 2 workers: refused before Ray starts
    assert not (tmp_path / "odd").exists()
    monkeypatch.chdir(tmp_path)
    argv = ["jobs/distill.py", "pid", "--teacher", str(teacher_dir), "--out", "runs/pid", *pid]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="__main__")
    assert done.value.code == 0
    assert losses(tmp_path / "runs" / "pid" / "log.jsonl") == pytest.approx(losses(inline / "log.jsonl"), rel=1e-4)
