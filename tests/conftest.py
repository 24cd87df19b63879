"""Shared fixtures: a tiny seeded UNet, the reference DDIM scheduler, the Fashion-MNIST files, the README's
quickstart run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from distcl.config import ModelConfig
from distcl.data import DEBIAN_DIR
from distcl.models import build_scheduler
from tests.readme import quickstart_command

# The tests compute on 1 thread, as the Ray Train workers and the sampler actors do (cpus_per_worker =
# sampler_cpus = 1): so an inline reference run is bitwise the Ray run it checks. It is also faster here: the
# quickstart's run goes on beside the unit tests, and two threads of this process competing with its processes
# for the 2 cores made single tests up to 14x slower.
torch.set_num_threads(1)


def reads_quickstart(item: pytest.Item) -> bool:
    return "quickstart" in item.fixturenames


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """An 8x8 UNet2DModel with two blocks: fast enough to run many forwards in a unit test."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture
def unet() -> UNet2DModel:
    return tiny_unet()


@pytest.fixture
def scheduler():
    return build_scheduler(ModelConfig())


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The Debian package's Fashion-MNIST files (`apt-get install dataset-fashion-mnist`; .ci/run installs it)."""
    assert all(
        (DEBIAN_DIR / f"{stem}.gz").is_file()
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ), f"Fashion-MNIST missing from {DEBIAN_DIR}: apt-get install -y dataset-fashion-mnist"
    return DEBIAN_DIR


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole modules in this order: those without a slow test, those that read the quickstart's run, the other
    slow ones. The quickstart starts with the session (``_quickstart_started``) and runs beside the unit tests
    (its readers last instead, so that it also overlapped the first Ray tests, measured 636 s against 614 s)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def rank(module: list[pytest.Item]) -> int:
        if not any(item.get_closest_marker("slow") for item in module):
            return 0
        return 1 if any(map(reads_quickstart, module)) else 2

    items[:] = [item for module in sorted(modules.values(), key=rank) for item in module]


@pytest.fixture(scope="session", autouse=True)
def _quickstart_started(request, tmp_path_factory):
    """The README's quickstart command, verbatim, started at the session's first test when a collected test
    needs it, from a fresh working directory (relative --out, Ray backend, a new local cluster), as a user whose
    environment is activated runs it: (its working directory, the process, its console file) or None."""
    if not any(map(reads_quickstart, request.session.items)):
        yield None
        return
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    console = cwd.parent / "quickstart_console"
    console.mkdir()
    with open(console / "stdout", "w") as stdout, open(console / "stderr", "w") as stderr:
        process = subprocess.Popen(
            quickstart_command(), shell=True, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    yield cwd, process, console
    if process.poll() is None:  # a session that ended before it did (-x, Ctrl-C): the shell, distcl, its cluster
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def quickstart(_quickstart_started) -> tuple[Path, subprocess.CompletedProcess]:
    """The quickstart's run, finished: (its OUT, the finished process with its console). The README test reads
    its console; the end-to-end tests read its outputs (copy OUT to change it)."""
    cwd, process, console = _quickstart_started
    process.wait(timeout=600)
    done = subprocess.CompletedProcess(
        process.args, process.returncode, (console / "stdout").read_text(), (console / "stderr").read_text()
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return cwd / "runs" / "smoke", done
