"""Shared fixtures: a tiny seeded UNet and the reference DDIM scheduler."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from distcl.config import ModelConfig
from distcl.data import DEBIAN_DIR
from distcl.models import build_scheduler


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
    assert all((DEBIAN_DIR / f"{stem}.gz").is_file() for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
    )), f"Fashion-MNIST missing from {DEBIAN_DIR}: apt-get install -y dataset-fashion-mnist"  # fmt: skip
    return DEBIAN_DIR
