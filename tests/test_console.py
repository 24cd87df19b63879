"""A run's lines as they happen: the CLI's lines reach a redirected file while the run goes on, OUT/run.log keeps
them (appended on resume, each start stamped), and progress lines say when a task and the run will end."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcl.console import StepLines, duration, run_log, time_left

ROOT = Path(__file__).parents[1]


def test_durations_and_the_time_left_at_the_rate_so_far():
    assert [duration(s) for s in (0, 41.6, 60, 185, 7620)] == ["0s", "42s", "1m00s", "3m05s", "2h07m"]
    assert time_left(30, 3, 7) == "30s elapsed, ~1m10s left"
    assert time_left(5, 0, 7) == "5s elapsed, time left unknown"


def test_step_lines_every_few_seconds_and_at_the_last_step():
    lines = []
    on_step = StepLines("task 2", 4, lines.append, every_s=3600)
    for step in range(4):
        on_step(step, [{"step": step, "loss": 0.5 / (step + 1)}])
    assert len(lines) == 1 and re.fullmatch(
        r"\[distcl\] task 2 step 4/4: loss 0\.1250, \d+s elapsed, ~0s left", lines[0]
    )
    on_step = StepLines("task 0", 3, lines.append, every_s=0)
    on_step(0, [])  # a step whose row is not read yet: no line
    on_step(1, [{"step": 1, "loss": 1.0}])
    assert lines[-1].startswith("[distcl] task 0 step 2/3: loss 1.0000, ") and "left" in lines[-1]


def test_the_run_log_keeps_complete_lines_as_a_terminal_shows_them(tmp_path, capsys):
    out = tmp_path / "run"
    with run_log(out, "first"):
        print("before OUT exists")
        out.mkdir()
        print("[distcl] task 0 done")
        sys.stderr.write("\r progress 10%\r progress 90%\r\x1b[36m(RayTrainWorker pid=1)\x1b[0m step 5/5\n")
        sys.stderr.write("half a line")
    with pytest.raises(RuntimeError):
        with run_log(out, "second"):
            print("resumed")
            raise RuntimeError("a failure")
    lines = (out / "run.log").read_text().splitlines()
    assert re.match(r"==== first started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lines[0])
    assert lines[1:5] == ["before OUT exists", "[distcl] task 0 done", "(RayTrainWorker pid=1) step 5/5", "half a line"]
    assert lines[5].startswith("==== second started") and lines[6] == "resumed"
    assert lines[7] == "==== second stopped: RuntimeError: a failure" and len(lines) == 8
    console = capsys.readouterr()
    assert "before OUT exists" in console.out and "half a line" in console.err  # the console keeps them too


def test_a_run_refused_before_it_made_out_leaves_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError):
        with run_log(out, "refused"):
            print("checking the config")
            raise ValueError("bad input")
    assert not out.exists()


@pytest.mark.slow
def test_a_redirected_run_shows_each_task_as_it_ends_and_keeps_its_log(tmp_path):
    out, console = tmp_path / "runs" / "x", tmp_path / "console.txt"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONUNBUFFERED", None)
    quick = ["data.num_tasks=3", "train.max_steps=10", "eval.num_samples=50", "eval.steps=2"]
    cmd = [
        "distcl",
        "run",
        "--preset",
        "smoke",
        "--inline",
        *[a for q in quick for a in ("--set", q)],
        "--out",
        str(out),
    ]
    with open(console, "w") as stdout:
        process = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while "[distcl] task 0 evaluated" not in console.read_text():
            assert process.poll() is None, console.read_text()[-3000:]  # it ended before the line arrived
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert process.poll() is None  # the line is in the file while tasks 1 and 2 are still to come
    finally:
        assert process.wait(timeout=300) == 0, console.read_text()[-3000:]
    text = console.read_text()
    assert re.search(r"\[distcl\] task 0 step 10/10: loss [\d.]+, \d+s elapsed, ~0s left", text)
    assert re.search(r"\[distcl\] task 0 \(.*\): trained 10 steps .*; run: 1/3 tasks, \S+ elapsed, ~\S+ left", text)
    log = (out / "run.log").read_text().splitlines()
    assert log[0].startswith("==== smoke (inline) started")
    ours = [line for line in text.splitlines() if line.startswith("[distcl]") and "done:" not in line]
    assert [line for line in log if line.startswith("[distcl]")] == ours
    assert subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT).returncode == 0  # resumed: nothing to train
    again = (out / "run.log").read_text().splitlines()
    assert again[: len(log)] == log and again[len(log)].startswith("==== smoke (inline) started")
