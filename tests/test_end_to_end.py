"""End-to-end runs through the CLI and the driver on the real Debian Fashion-MNIST files, in one process
(``--inline``; the same runs on Ray are in test_runtime.py)."""
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from diffusers import DDIMPipeline
from safetensors.torch import load_file

from distcl.config import load_config
from distcl.continual import load_teacher, run_continual, train_task_inline
from distcl.distill import fast_sampler
from distcl.training import NonFiniteLossError

pytestmark = pytest.mark.slow


def distcl(*args):
    return subprocess.run([sys.executable, "-m", "distcl.cli", *args], capture_output=True, text=True, timeout=600)


def weights(task_dir):
    return load_file(task_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = distcl("run", "--preset", "smoke", "--inline", "--out", str(out), "--no-progress",
                    "--set", "classifier.enabled=true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result


def test_smoke_writes_every_output(smoke):
    out, result = smoke
    for k in range(5):
        assert f"task {k}" in result.stdout
        assert (out / f"task_{k}" / "model_index.json").is_file()
        assert (out / "samples" / f"task_{k}.png").is_file()
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert {"run", "seed", "strategy", "task", "metric", "value"} <= set(metrics.columns)
    assert sorted(metrics.task.unique()) == [0, 1, 2, 3, 4]
    assert {"fid", "kld", "tv"} <= set(metrics.metric)
    assert (metrics.strategy == "gd").all() and (metrics.seed == 42).all()
    fid = metrics[metrics.metric == "fid"].value
    assert fid.notna().all() and (fid > 0).all()
    log = pd.read_parquet(out / "train_log.parquet")
    assert {"task", "step", "loss", "loss_data", "loss_replay", "step_s", "replay_wait_s"} <= set(log.columns)
    assert (log[log.task == 0].loss_replay == 0).all() and (log[log.task > 0].loss_replay > 0).all()
    assert load_config(out / "config.yaml").train.strategy == "gd"


def test_smoke_trains_the_continual_classifier(smoke):
    out, result = smoke
    metrics = pd.read_parquet(out / "metrics.parquet")
    accuracy = metrics[metrics.metric == "accuracy"].set_index("task").value
    assert list(accuracy.index) == [0, 1, 2, 3, 4]
    assert accuracy[0] > 0.6  # above chance (0.5) on pullover vs shirt, seed 42's hard first task
    assert ((accuracy > 0) & (accuracy <= 1)).all()
    forgetting = metrics[metrics.metric == "forgetting"].set_index("task").value
    assert forgetting[0] == 0 and forgetting.between(-1, 1).all()
    log = pd.read_parquet(out / "classifier_log.parquet")
    assert (log[log.task == 0].loss_replay == 0).all() and (log[log.task > 0].loss_replay > 0).all()
    assert all((out / "classifier" / f"task_{k}.pt").is_file() for k in range(5))
    report = distcl("report", str(out))
    assert report.returncode == 0 and "accuracy" in report.stdout and "accuracy_task" not in report.stdout
    assert (out / "accuracy.png").is_file()


def test_pipeline_loads_the_last_task(smoke):
    out, _ = smoke
    pipe = DDIMPipeline.from_pretrained(out / "task_4")
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 1)


def test_report(smoke):
    out, _ = smoke
    result = distcl("report", str(out))
    assert result.returncode == 0, result.stderr
    assert "| run" in result.stdout and "fid" in result.stdout and result.stdout.count("| smoke") == 5
    assert (out / "fid.png").stat().st_size > 1000 and (out / "kld.png").is_file()


def test_resume_retrains_nothing_done_and_reproduces(smoke):
    out, _ = smoke
    before = weights(out / "task_4")
    again = distcl("run", "--preset", "smoke", "--inline", "--out", str(out), "--no-progress",
                   "--set", "classifier.enabled=true")  # fmt: skip
    assert again.returncode == 0 and "trained" not in again.stdout and "evaluated" not in again.stdout
    # an interrupted run: task 4 neither saved nor evaluated -> only task 4 runs, to the same weights
    shutil.rmtree(out / "task_4")
    metrics = pd.read_parquet(out / "metrics.parquet")
    metrics[metrics.task != 4].to_parquet(out / "metrics.parquet")
    resumed = distcl("run", "--preset", "smoke", "--inline", "--out", str(out), "--no-progress",
                     "--set", "classifier.enabled=true")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("trained") == 1 and "task 4 (3, 7): trained" in resumed.stdout
    after = weights(out / "task_4")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(pd.read_parquet(out / "metrics.parquet").task.unique()) == [0, 1, 2, 3, 4]


def test_other_config_on_same_out_is_refused(smoke):
    out, _ = smoke
    result = distcl("run", "--preset", "smoke", "--inline", "--out", str(out), "--set", "train.replay_lambda=1.0")
    assert result.returncode == 2 and "train.replay_lambda" in result.stderr


SHORT = ["data.num_tasks=2", "data.train_per_class=20", "data.test_per_class=20", "train.batch_size=8",
         "train.epochs=1.0", "train.max_steps=null", "eval.num_samples=20", "eval.steps=2"]  # fmt: skip


@pytest.mark.parametrize("strategy", ["finetune", "joint", "gr", "partial_generation", "gaussian", "lwf"])
def test_every_strategy_runs(strategy, tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT + [f"train.strategy={strategy}"])
    run_continual(cfg, tmp_path, progress=False, log=lambda _: None)
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    steps = log.groupby("task").step.max() + 1
    assert steps[0] == 5 and steps[1] == (10 if strategy == "joint" else 5)  # joint sees tasks 0..k
    assert (log[log.task == 1].loss_replay > 0).all() == (strategy not in ("finetune", "joint"))
    assert sorted(pd.read_parquet(tmp_path / "metrics.parquet").task.unique()) == [0, 1]


def test_diverged_task_is_never_saved(tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT)

    def diverging(spec):
        if spec.task == 1:
            spec.images = spec.images * float("nan")
        return train_task_inline(spec)

    with pytest.raises(NonFiniteLossError, match="task 1 step 0"):
        run_continual(cfg, tmp_path, train_fn=diverging, progress=False, log=lambda _: None)
    assert (tmp_path / "task_0").is_dir() and not (tmp_path / "task_1").exists()
    assert not list(tmp_path.glob(".task_*"))
    assert sorted(pd.read_parquet(tmp_path / "metrics.parquet").task.unique()) == [0]


def test_fast_replay_sampler_is_distilled_from_each_teacher_and_kept_on_resume(tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT + [
        "replay_sampler.method=progressive", "replay_sampler.start_steps=4", "replay_sampler.steps=2",
        "replay_sampler.iterations=3", "replay_sampler.batch_size=4"])  # fmt: skip
    logs = []
    run_continual(cfg, tmp_path, progress=False, log=logs.append)
    student = tmp_path / "replay_sampler" / "task_0" / "steps_2"
    assert DDIMPipeline.from_pretrained(student).scheduler.config.prediction_type == "v_prediction"
    assert not (tmp_path / "replay_sampler" / "task_1").exists()  # the last task teaches no one
    teacher = load_teacher(cfg, tmp_path / "task_0", "cpu")
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(teacher.sample(x_T, None), fast_sampler("progressive", student.parent, "cpu", 2)(x_T))
    assert any("progressive steps_2" in line for line in logs)
    shutil.rmtree(tmp_path / "task_1")
    logs.clear()
    run_continual(cfg, tmp_path, progress=False, log=logs.append)  # task 1 again: its replay sampler is found
    assert not any("progressive steps_" in line for line in logs) and (tmp_path / "task_1").is_dir()

