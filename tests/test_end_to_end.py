"""End-to-end runs through the CLI and the driver on the real Debian Fashion-MNIST files: the README's quickstart
(on Ray, the session's ``quickstart`` fixture) resumed in one process, the continual classifier and every strategy
``--inline``."""

import fcntl
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMPipeline
from safetensors.torch import load_file

from distcl.backend import InlineBackend
from distcl.cli import main
from distcl.config import load_config
from distcl.continual import run_continual
from distcl.distill import fast_sampler
from distcl.settings import ConfigError
from distcl.teachers import load_teacher
from distcl.training import NonFiniteLossError

pytestmark = pytest.mark.slow


def weights(task_dir):
    return load_file(task_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def smoke(quickstart):
    """The quickstart's run: ``distcl run --preset smoke --out runs/smoke`` (Ray)."""
    return quickstart


CLASSIFIER = [
    "--preset",
    "smoke",
    "--inline",
    "--no-progress",
    "--set",
    "classifier.enabled=true",
    "--set",
    "data.num_tasks=2",
    "--set",
    "train.max_steps=10",
    "--set",
    "eval.num_samples=50",
    "--set",
    "eval.steps=2",
    "--set",
    "classifier.replay_steps=2",
]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "run"
    assert main(["run", "--out", str(out), *CLASSIFIER]) == 0
    return out


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


def test_the_continual_classifier_is_trained_evaluated_and_reported(classifier_run, capsys):
    out = classifier_run
    metrics = pd.read_parquet(out / "metrics.parquet")
    accuracy = metrics[metrics.metric == "accuracy"].set_index("task").value
    assert list(accuracy.index) == [0, 1]
    assert accuracy[0] > 0.6  # above chance (0.5) on pullover vs shirt, seed 42's hard first task
    assert ((accuracy > 0) & (accuracy <= 1)).all()
    forgetting = metrics[metrics.metric == "forgetting"].set_index("task").value
    assert forgetting[0] == 0 and forgetting.between(-1, 1).all()
    log = pd.read_parquet(out / "classifier_log.parquet")
    assert (log[log.task == 0].loss_replay == 0).all() and (log[log.task > 0].loss_replay > 0).all()
    assert all((out / "classifier" / f"task_{k}.pt").is_file() for k in range(2))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "accuracy" in report and "accuracy_task" not in report
    assert (out / "accuracy.png").is_file()


def test_pipeline_loads_the_last_task(smoke):
    out, _ = smoke
    pipe = DDIMPipeline.from_pretrained(out / "task_4")
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 1)


def test_report(smoke, capsys):
    out, _ = smoke
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "| run" in report and "fid" in report and report.count("| smoke") == 10
    assert report.count("| real data ") == 5 and "| Pullover, Shirt " in report  # each task's floor and classes
    assert (out / "fid.png").stat().st_size > 1000 and (out / "kld.png").is_file()


def test_a_ray_run_resumed_inline_retrains_nothing_done_and_reproduces(smoke, tmp_path, capsys):
    out = tmp_path / "smoke"
    shutil.copytree(smoke[0], out)
    before, metrics = weights(out / "task_4"), pd.read_parquet(out / "metrics.parquet")
    command = ["run", "--preset", "smoke", "--inline", "--out", str(out), "--no-progress"]
    assert main(command) == 0
    again = capsys.readouterr().out
    assert "trained" not in again and "evaluated" not in again
    # an interrupted run: task 4 neither saved nor evaluated -> only task 4 runs, to the same weights and metrics
    shutil.rmtree(out / "task_4")
    metrics[metrics.task != 4].to_parquet(out / "metrics.parquet")
    assert main(command) == 0  # on the tests' 1 thread, as the Ray Train worker and the sampler actors (conftest.py)
    resumed = capsys.readouterr().out
    assert resumed.count("trained") == 1 and "task 4 (3, 7): trained" in resumed
    after = weights(out / "task_4")
    # bitwise on the CPU; with a GPU (device auto) the Ray run trained there on the samplers' CPU replay and the
    # inline rerun on its own GPU replay: equal up to float rounding (README, Determinism)
    cpu = not torch.cuda.is_available()
    assert all(
        torch.equal(before[k], after[k]) if cpu else torch.allclose(before[k], after[k], atol=1e-2) for k in before
    )
    again = pd.read_parquet(out / "metrics.parquet")
    assert sorted(again.task.unique()) == [0, 1, 2, 3, 4]
    assert again.set_index(["task", "metric"]).value.to_dict() == pytest.approx(
        metrics.set_index(["task", "metric"]).value.to_dict(), rel=1e-4 if cpu else 5e-2
    )  # on Ray, then inline


def test_other_config_on_same_out_is_refused(smoke, capsys):
    out, _ = smoke
    assert main(["run", "--preset", "smoke", "--inline", "--out", str(out), "--set", "train.replay_lambda=1.0"]) == 2
    assert "train.replay_lambda" in capsys.readouterr().err


SHORT = [
    "data.num_tasks=2",
    "data.train_per_class=20",
    "data.test_per_class=20",
    "train.batch_size=8",
    "train.epochs=1.0",
    "train.max_steps=null",
    "eval.num_samples=20",
    "eval.steps=2",
    "device=cpu",
]


@pytest.mark.parametrize("strategy", ["finetune", "joint", "gr", "partial_generation", "gaussian", "lwf"])
def test_every_strategy_runs(strategy, tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT + [f"train.strategy={strategy}"])
    run_continual(cfg, tmp_path, progress=False, log=lambda _: None)
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    steps = log.groupby("task").step.max() + 1
    assert steps[0] == 5 and steps[1] == (10 if strategy == "joint" else 5)  # joint sees tasks 0..k
    # after task 1's first step (there lwf's student still is its frozen copy: the term can be exactly 0)
    moved = log[(log.task == 1) & (log.step > 0)]
    assert len(moved) and (moved.loss_replay > 0).all() == (strategy not in ("finetune", "joint"))
    assert sorted(pd.read_parquet(tmp_path / "metrics.parquet").task.unique()) == [0, 1]


def test_a_bf16_deterministic_run_trains_close_to_fp32_and_cannot_resume_in_fp32(tmp_path):
    quiet = dict(progress=False, log=lambda _: None)
    run_continual(load_config(preset="smoke", overrides=SHORT), tmp_path / "fp32", **quiet)
    half = load_config(preset="smoke", overrides=SHORT + ["runtime.precision=bf16", "runtime.deterministic=true"])
    try:
        run_continual(half, tmp_path / "bf16", **quiet)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    full, bf16 = (pd.read_parquet(tmp_path / run / "train_log.parquet") for run in ("fp32", "bf16"))
    assert not full.loss.equals(bf16.loss) and np.allclose(full.loss, bf16.loss, rtol=0.1)
    with pytest.raises(ConfigError, match="runtime.precision"):  # results depend on it: no mixed resume
        run_continual(load_config(preset="smoke", overrides=SHORT), tmp_path / "bf16", **quiet)


def test_a_driver_killed_during_an_evaluation_redoes_only_that_evaluation(tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT)
    quiet = dict(progress=False, log=lambda _: None)
    run_continual(cfg, tmp_path / "whole", **quiet)

    class KilledInEvaluation(InlineBackend):
        def evaluate(self, job, progress):
            if job.task == 1:
                raise KeyboardInterrupt  # what a driver sees of Ctrl-C; a SIGKILL leaves the same files
            return super().evaluate(job, progress)

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_continual(cfg, out, KilledInEvaluation(torch.device("cpu")), **quiet)
    assert (out / "task_1").is_dir() and sorted(pd.read_parquet(out / "metrics.parquet").task.unique()) == [0]
    logs = []
    run_continual(cfg, out, progress=False, log=logs.append)
    assert not any("trained" in line for line in logs) and any("task 1 evaluated" in line for line in logs)
    assert pd.read_parquet(out / "metrics.parquet").equals(pd.read_parquet(tmp_path / "whole" / "metrics.parquet"))


def test_overlapping_work_finished_after_a_stop_is_not_saved_and_a_rerun_redoes_it(tmp_path):
    """A backend that overlaps (as Ray's): the evaluation of task 0 runs in the driver's second thread while task 1
    trains; Ctrl-C during task 1, the evaluation ending after it: nothing of it is saved, and a rerun ends with the
    metrics of a run never stopped."""
    cfg = load_config(preset="smoke", overrides=SHORT)
    quiet = dict(progress=False, log=lambda _: None)
    run_continual(cfg, tmp_path / "whole", **quiet)

    class Overlapping(InlineBackend):
        overlaps = True
        evaluating, stopped = threading.Event(), threading.Event()

        def evaluate(self, job, progress):
            results = super().evaluate(job, progress)
            self.evaluating.set()
            assert self.stopped.wait(120)
            return results

        def train_task(self, spec):
            if spec.task == 1:
                assert self.evaluating.wait(120)
                raise KeyboardInterrupt
            return super().train_task(spec)

    out, backend = tmp_path / "stopped", Overlapping(torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        run_continual(cfg, out, backend, **quiet)
    backend.stopped.set()  # the evaluation of task 0 ends now, after the driver stopped
    for thread in threading.enumerate():
        if thread.name.startswith("distcl-after-task"):
            thread.join(timeout=120)
    assert (out / "task_0").is_dir() and not (out / "task_1").exists() and not (out / "metrics.parquet").exists()
    logs = []
    run_continual(cfg, out, progress=False, log=logs.append)
    assert sum("trained" in line for line in logs) == 1 and any("task 0 evaluated" in line for line in logs)
    assert pd.read_parquet(out / "metrics.parquet").equals(pd.read_parquet(tmp_path / "whole" / "metrics.parquet"))


def test_diverged_task_is_never_saved(tmp_path):
    cfg = load_config(preset="smoke", overrides=SHORT)

    class Diverging(InlineBackend):
        def train_task(self, spec):
            if spec.task == 1:
                spec.images = spec.images * float("nan")
            return super().train_task(spec)

    with pytest.raises(NonFiniteLossError, match="task 1 step 0"):
        run_continual(cfg, tmp_path, Diverging(torch.device("cpu")), progress=False, log=lambda _: None)
    assert (tmp_path / "task_0").is_dir() and not (tmp_path / "task_1").exists()
    assert not list(tmp_path.glob(".task_*"))
    assert sorted(pd.read_parquet(tmp_path / "metrics.parquet").task.unique()) == [0]


def test_fast_replay_sampler_is_distilled_from_each_teacher_and_kept_on_resume(tmp_path):
    cfg = load_config(
        preset="smoke",
        overrides=SHORT
        + [
            "replay_sampler.method=progressive",
            "replay_sampler.start_steps=4",
            "replay_sampler.steps=2",
            "replay_sampler.iterations=3",
            "replay_sampler.batch_size=4",
        ],
    )
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


def test_a_second_driver_on_the_same_out_is_refused_and_a_failed_start_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another driver's lock (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1234 on elsewhere\n")
        held.flush()
        assert main(["run", "--preset", "smoke", "--inline", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another distcl run (pid 1234 on elsewhere)" in err[0], err
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written
    fresh = tmp_path / "fresh"
    assert (
        main(
            [
                "run",
                "--preset",
                "smoke",
                "--inline",
                "--out",
                str(fresh),
                "--no-progress",
                "--data-dir",
                str(tmp_path / "no-data"),
            ]
        )
        == 1
    )
    assert "no-data" in capsys.readouterr().err and not fresh.exists()
