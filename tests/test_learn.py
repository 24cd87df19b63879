"""Learning after the run (``distcl learn``): an append trains NEW's classes with the earlier tasks' data deleted,
evaluates every class seen so far from what OUT keeps, resumes when killed; bad input is refused in one line with
OUT unchanged; and on Fashion-MNIST, one run plus four appends are the one-command five-task run, weight for
weight and metric for metric."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import DDIMPipeline

from distcl.cli import main
from distcl.evalstore import STORE
from distcl.rundir import out_lock
from tests.image_data import COLOURS, write_folder

ROOT = Path(__file__).parents[1]
QUICK = ["train.max_steps=6", "train.batch_size=8", "eval.num_samples=24", "eval.steps=2", "model.preset=tiny"]
FOLDER = ["--inline", "--no-progress", "--set", "data.source=image_folder", *[a for q in QUICK for a in ("--set", q)]]


def split_folder(root: Path, per_class: int = 10) -> tuple[Path, Path]:
    """The test folder's colours as two arrivals: red and blue first, green later."""
    everything = write_folder(root / "all", per_class=per_class)
    first, later = root / "first", root / "later"
    for name in COLOURS:
        shutil.copytree(everything / name, (later if name == "green" else first) / name)
    return first, later


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished one-task run on the first folder (red, blue): its OUT and the folders."""
    root = tmp_path_factory.mktemp("learn")
    first, later = split_folder(root)
    out = root / "run"
    assert main(["run", "--data-dir", str(first), "--out", str(out), *FOLDER, "--set", "data.tasks=[[blue, red]]"]) == 0
    return out, first, later


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_an_append_trains_new_classes_with_the_old_data_gone_and_resumes(first_run, tmp_path):
    out, first, later = first_run
    out = Path(shutil.copytree(out, tmp_path / "run"))
    shutil.rmtree(first)  # the earlier task's images are gone
    cmd = [sys.executable, "-m", "distcl.cli", "learn", str(out), "--data-dir", str(later), *FOLDER]
    slow = [*cmd, "--set", "train.max_steps=400"]
    killed = subprocess.Popen(slow, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "task_configs" / "task_1.yaml").is_file():  # the task's config is kept before it trains
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (out / "task_1").exists()
    other = later.parent / "other" / "yellow"
    shutil.copytree(later / "green", other)
    refused = subprocess.run([*cmd[:6], str(other.parent), *FOLDER], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "task 1 (green) left unfinished by an earlier learn" in refused.stderr
    done = subprocess.run(slow, cwd=ROOT, capture_output=True, text=True)  # the same learn again: it resumes
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "task_1" / "model_index.json").is_file()
    assert json.loads((out / "tasks.json").read_text())["classes"] == [["blue", "red"], ["green"]]
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics.task.unique()) == [0, 1] and metrics.value.notna().all()
    assert set(metrics[metrics.task == 0].evaluator) != set(metrics[metrics.task == 1].evaluator)  # green: a new net
    evaluator = json.loads((out / "evaluator.json").read_text())
    assert evaluator["classifier"]["num_classes"] == 3 and evaluator["classifier_id"] in set(metrics.evaluator)
    floor = pd.read_parquet(out / "real_metrics.parquet").query("task == 1").set_index("metric").value
    assert floor.gen_in_seen > 0.9  # the floor of all three classes, the first two from OUT's records
    assert sorted(p.name for p in (out / STORE).iterdir()) == ["class_0.pt", "class_1.pt", "class_2.pt"]
    assert (out / "task_configs" / "task_1.yaml").read_text().count("max_steps: 400") == 1
    images = DDIMPipeline.from_pretrained(out / "task_1")(batch_size=2, num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 16, 16, 3)
    # every task scored again by the network that knows all three classes, into a table of its own
    assert main(["evaluate", str(out), "--device", "cpu", "--no-progress"]) == 0
    rescored = pd.read_parquet(out / "rescored_metrics.parquet")
    assert set(rescored.evaluator) == {evaluator["classifier_id"]} and sorted(rescored.task.unique()) == [0, 1]
    ours = rescored.query("task == 1 and strategy != 'real data'").set_index("metric").value
    theirs = metrics.query("task == 1").set_index("metric").value
    assert ours.to_dict() == pytest.approx(theirs.to_dict(), rel=1e-6)  # the same network, the same numbers
    assert pd.read_parquet(out / "metrics.parquet").equals(metrics)  # never rewritten


@pytest.mark.parametrize(
    "case, extra, field",
    [
        ("joint", ["--set", "train.strategy=joint"], "train.strategy: 'joint' trains on every earlier task's data"),
        ("model", ["--set", "model.preset=small"], "model: "),
        ("seed", ["--set", "seed=7"], "seed: 42 -> 7: an append keeps the run's model and evaluation"),
        ("missing", ["--data-dir", "/nonexistent/new"], "data.data_dir: /nonexistent/new is not a directory"),
        ("empty", "empty", "data.data_dir: "),
        ("trained", "trained", "class 'red' was trained in task 0: more images of a trained class are not a new"),
        ("unreadable", "unreadable", "zz.png is not a readable image"),
        ("not a run", "not a run", "OUT: "),
        ("held", "held", "--out: "),
    ],
)
def test_bad_input_is_refused_in_one_line_and_out_is_unchanged(first_run, tmp_path, capsys, case, extra, field):
    out, _, later = first_run
    before = snapshot(out)
    target, data = out, later
    if extra == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif extra == "trained":
        data = tmp_path / "again"
        shutil.copytree(later / "green", data / "red")
    elif extra == "unreadable":
        data = tmp_path / "broken"
        shutil.copytree(later, data)
        (data / "green" / "zz.png").write_bytes(b"not an image")
    elif extra == "not a run":
        target = tmp_path / "nothing"
        target.mkdir()
    args = ["learn", str(target), "--data-dir", str(data), *FOLDER, *(extra if isinstance(extra, list) else [])]
    capsys.readouterr()
    if extra == "held":
        with out_lock(out):
            code = subprocess.run([sys.executable, "-m", "distcl.cli", *args], cwd=ROOT, capture_output=True, text=True)
        err = code.stderr.strip().splitlines()
        code = code.returncode
    else:
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("distcl: config error: "), err
    assert field in err[0], err[0]
    if extra != "held":  # the lock's holder line is the test's own process there
        assert snapshot(out) == before


@pytest.mark.slow
def test_one_run_and_four_appends_are_the_five_task_run(tmp_path):
    quick = [
        "--inline",
        "--no-progress",
        *[a for q in ("train.max_steps=8", "eval.num_samples=40") for a in ("--set", q)],
    ]
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    assert main(["run", "--preset", "smoke", "--out", str(whole), *quick]) == 0
    tasks = json.loads((whole / "tasks.json").read_text())["tasks"]
    assert main(["run", "--preset", "smoke", "--out", str(grown), "--set", "data.num_tasks=1", *quick]) == 0
    for task in tasks[1:]:
        assert main(["learn", str(grown), "--set", f"data.tasks=[{list(task)}]", *quick]) == 0
    for k in range(5):
        ours, theirs = (DDIMPipeline.from_pretrained(d / f"task_{k}").unet.state_dict() for d in (grown, whole))
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), f"task {k}'s weights differ"
    for table in ("metrics.parquet", "real_metrics.parquet"):
        ours, theirs = (
            pd.read_parquet(d / table).sort_values(["task", "metric"]).reset_index(drop=True) for d in (grown, whole)
        )
        pd.testing.assert_frame_equal(ours, theirs)
    assert json.loads((grown / "tasks.json").read_text()) == json.loads((whole / "tasks.json").read_text())
    assert sorted(os.listdir(grown / "task_configs")) == [f"task_{k}.yaml" for k in range(1, 5)]


@pytest.mark.slow
def test_a_watch_appends_each_complete_arrival_once_and_survives_a_restart(first_run, tmp_path):
    out, _, later = first_run
    out, inbox = Path(shutil.copytree(out, tmp_path / "run")), tmp_path / "inbox"
    inbox.mkdir()
    cmd = [sys.executable, "-m", "distcl.cli", "learn", str(out), "--watch", str(inbox), "--poll-s", "0.2", *FOLDER]

    def watching(log: Path) -> subprocess.Popen:
        # Ctrl-C as a user's terminal sends it: SIGINT at its default (a suite started as a background job of a
        # non-interactive shell ignores SIGINT, its children inherit that, and Python then never raises
        # KeyboardInterrupt: two clean-clone runs timed out here)
        def interruptible() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=interruptible)

    def wait(what, check, process: subprocess.Popen, log: Path, timeout_s: float = 300):
        deadline = time.monotonic() + timeout_s
        while not check():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {what}: {log.read_text()[-3000:]}"
            time.sleep(0.2)

    first = watching(tmp_path / "first.log")
    try:
        wait(
            "waiting line",
            lambda: "waiting for an arrival" in (tmp_path / "first.log").read_text(),
            first,
            tmp_path / "first.log",
        )
        shutil.copytree(later, inbox / "summer")  # still being copied: no READY yet
        time.sleep(2)
        assert not (out / "task_configs").exists()  # a half-copied arrival is never read
        (inbox / "summer" / "READY").touch()
        wait("task 1", lambda: (out / "task_1" / "model_index.json").is_file(), first, tmp_path / "first.log")
        wait(
            "metrics of task 1",
            lambda: 1 in set(pd.read_parquet(out / "metrics.parquet").task),
            first,
            tmp_path / "first.log",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    trained = (out / "task_1" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    autumn = inbox / "autumn" / "yellow"
    shutil.copytree(later / "green", autumn)
    (inbox / "autumn" / "READY").touch()
    second = watching(tmp_path / "second.log")  # restarted: summer is learned, autumn is next
    try:
        wait("task 2", lambda: (out / "task_2" / "model_index.json").is_file(), second, tmp_path / "second.log")
        idle = lambda: "waiting for an arrival" in (tmp_path / "second.log").read_text().split("arrival autumn")[-1]  # noqa: E731
        wait("the watch waiting again", idle, second, tmp_path / "second.log")
        second.send_signal(signal.SIGINT)  # Ctrl-C while it waits
        assert second.wait(timeout=60) == 130
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert (out / "task_1" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == trained
    assert json.loads((out / "tasks.json").read_text())["classes"] == [["blue", "red"], ["green"], ["yellow"]]
