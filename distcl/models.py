"""The UNet of a preset (diffusers UNet2DModel), the DDIM scheduler factory, and checkpoints (DDIMPipeline folders)."""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from distcl.config import UNET_PRESETS
from distcl.settings import ConfigError

# diffusers' from_pretrained turns torch.nn.init off for the whole process (no_init_weights) while it builds a
# model: a model initialised meanwhile in another thread would keep uninitialised memory. Loading here and the
# seeded initialisations (:func:`seeded_init`) take turns under this lock (a Ray run's driver loads task k while
# its second thread initialises the continual classifier).
INIT_LOCK = threading.RLock()


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Models built inside are initialised from torch's global RNG seeded with ``seed``, whatever other threads
    load or seed meanwhile."""
    with INIT_LOCK:
        torch.manual_seed(seed)
        yield


def build_unet(model_cfg, channels: int = 1) -> UNet2DModel:
    """A freshly initialised UNet2DModel of the configured preset with ``channels`` in and out (a run's:
    ``data.image_channels``); seed it first (:func:`seeded_init`) or load weights into it."""
    return UNet2DModel(**unet_spec(model_cfg, channels))


def unet_spec(model_cfg, channels: int = 1) -> dict:
    """The UNet2DModel arguments of the configured preset and sample size."""
    kwargs = dict(UNET_PRESETS[model_cfg.preset], in_channels=channels, out_channels=channels)
    if model_cfg.sample_size is not None:
        kwargs["sample_size"] = model_cfg.sample_size
    return kwargs


def save_checkpoint(unet: UNet2DModel, scheduler: DDIMScheduler, directory: Path) -> None:
    """``DDIMPipeline(unet, scheduler).save_pretrained`` into a temporary folder, then an atomic rename."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, directory)


def require_checkpoint(directory: Path) -> None:
    """FileNotFoundError unless ``directory`` holds a DDIMPipeline folder's UNet."""
    if not (Path(directory) / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers checkpoint at {directory} (expected {directory}/unet/config.json)")


def read_unet(unet_dir: Path) -> UNet2DModel:
    """``UNet2DModel.from_pretrained`` under INIT_LOCK and without low_cpu_mem_usage: that path builds the model
    under accelerate's init_empty_weights, which patches torch.nn.Module for the whole process, so a module built
    meanwhile in another thread (a sampler actor trains the classifier while it loads a teacher) would get meta
    tensors."""
    with INIT_LOCK:
        return UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)


def load_unet(directory: Path, model_cfg, device: torch.device | str = "cpu", channels: int = 1) -> UNet2DModel:
    """The UNet saved at ``directory`` (a DDIMPipeline folder), checked to be the configured architecture."""
    directory = Path(directory)
    require_checkpoint(directory)
    unet = read_unet(directory / "unet")
    expected = unet_spec(model_cfg, channels)
    wrong = {k: (unet.config[k], v) for k, v in expected.items() if _plain(unet.config[k]) != _plain(v)}
    if wrong:
        detail = ", ".join(f"{k} {got} (run: {want})" for k, (got, want) in wrong.items())
        raise ValueError(
            f"checkpoint {directory} is another architecture than model.preset {model_cfg.preset!r}: {detail}"
        )
    return unet.to(device)


def load_pipeline_parts(directory: Path, device: torch.device | str = "cpu") -> tuple[UNet2DModel, DDIMScheduler]:
    """The UNet and DDIM scheduler of a DDIMPipeline folder (any architecture); ConfigError when it is none."""

    directory = Path(directory)
    if not (directory / "unet" / "config.json").is_file() or not (directory / "scheduler").is_dir():
        raise ConfigError(
            "--teacher",
            f"{directory} is not a distcl / diffusers DDIMPipeline checkpoint "
            "(expected unet/config.json and scheduler/ in it)",
        )
    unet = read_unet(directory / "unet").to(device)
    return unet, DDIMScheduler.from_pretrained(directory / "scheduler")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def build_scheduler(model_cfg) -> DDIMScheduler:
    """DDIM as in the reference: linear betas, epsilon prediction, trailing timesteps, x0 clipped to [-1, 1]."""
    return DDIMScheduler(
        num_train_timesteps=model_cfg.num_train_timesteps,
        beta_start=model_cfg.beta_start,
        beta_end=model_cfg.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=model_cfg.rescale_zero_terminal_snr,
    )
