"""README.md's commands as a user types them: every ``distcl`` line parses with the real CLI, and the quickstart
runs verbatim (Ray backend, relative ``--out``) from a fresh working directory."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest

from distcl.cli import build_parser
from tests.readme import README, ROOT, bash_blocks

JOBS = {  # entrypoint -> command
    "jobs/train_cl.py": "run",
    "jobs/learn.py": "learn",
    "jobs/sweep.py": "tune",
    "jobs/distill.py": "distill",
}


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            found.append(words[:cut])
            words = words[cut + 1 :]
    return found


def distcl_argv(words: list[str]) -> list[str] | None:
    """The ``distcl`` arguments of a command: ``distcl ...`` itself, or a job entrypoint ``python jobs/x.py ...``
    (after ``ray job submit ... --``)."""
    if "--" in words:
        words = words[words.index("--") + 1 :]
    if words[:1] == ["distcl"]:
        return words[1:]
    if words[:1] == ["python"] and len(words) > 1 and words[1] in JOBS:
        return [JOBS[words[1]], *words[2:]]
    return None


def readme_commands() -> list[list[str]]:
    return [argv for block in bash_blocks(README) for words in commands(block) if (argv := distcl_argv(words))]


def test_the_readme_has_its_commands():
    assert len(readme_commands()) >= 10
    assert bash_blocks(README)[0].strip() == "./install.sh && distcl run --preset smoke --out runs/smoke"
    assert bash_blocks(README)[1].strip() == "./install.sh && .venv/bin/python -m pytest -q"


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:  # argparse's way of refusing
        pytest.fail(f"distcl {' '.join(argv)} does not parse (exit {err.code})")


def test_ci_runs_the_readme_test_command():
    assert bash_blocks(README)[1].strip().split("&& ", 1)[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_quickstart_runs_as_written_on_ray(quickstart):
    """The quickstart's main command, verbatim, from a fresh working directory (relative --out, Ray backend):
    every task saved and evaluated, a readable console."""
    out, done = quickstart
    console = done.stdout + done.stderr
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics.task.unique()) == [0, 1, 2, 3, 4]
    assert all((out / f"task_{k}" / "unet" / "config.json").is_file() for k in range(5))
    lines = [line for line in console.splitlines() if line.strip()]
    repeated = [a for a, b in zip(lines, lines[1:]) if a == b]
    assert not repeated, f"lines printed twice in a row: {repeated[:3]}"
    for internal in (
        "PreemptionWatcher",
        "Checkpoint successfully created",
        "Reporting training result",
        "Setting up process group",
    ):
        assert internal not in console
    assert sum("[distcl] task 4 step" in line for line in lines) >= 1  # the Train worker's progress
