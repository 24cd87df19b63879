"""Ray jobs as a user submits them, from the repository root: ``ray job submit --no-wait`` and the job's end."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from distcl.runtime.twin import RAY_CLI

ROOT = Path(__file__).parents[1]


def submit(address: str, env: dict, entrypoint: list[str]) -> str:
    """``ray job submit --no-wait`` of ``entrypoint`` with the repository as working dir: the job id."""
    done = subprocess.run(
        [str(RAY_CLI), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait", "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout + done.stderr).group(0)


def follow(address: str, env: dict, job_id: str) -> subprocess.Popen:
    """``ray job logs --follow``: its stdout yields the job's console lines until the job ends."""
    return subprocess.Popen(
        [str(RAY_CLI), "job", "logs", "--address", address, "--follow", job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def status(address: str, env: dict, job_id: str) -> str:
    return subprocess.run(
        [str(RAY_CLI), "job", "status", "--address", address, job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ).stdout
