"""Shared fixtures: a tiny seeded UNet, the reference DDIM scheduler, the Fashion-MNIST files, the README's
quickstart run."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's quickstart command, verbatim, from a fresh working directory (relative --out, Ray backend,
    a new local cluster), as a user whose environment is activated runs it: (its OUT, the finished process).
    The README test reads its console; the end-to-end tests read its outputs (copy OUT to change it)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        quickstart_command(), shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return cwd / "runs" / "smoke", done
