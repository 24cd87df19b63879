"""Teachers: the frozen model after task k-1 with its replay settings, its fast replay sampler (distilled from it
when ``replay_sampler.method`` asks for one), and its files as bytes for the object store."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import UNet2DModel

from distcl.config import FAST_SAMPLER_STRATEGIES, PIDConfig, ProgressiveConfig, RunConfig
from distcl.distill import Fit, distill, fast_sampler
from distcl.models import build_scheduler, build_unet, load_unet, require_checkpoint
from distcl.progressive import stage_dir
from distcl.replay import Teacher
from distcl.rundir import replay_sampler_dir
from distcl.seeding import derive_seed


def uses_fast_sampler(cfg: RunConfig) -> bool:
    return cfg.replay_sampler.method != "ddim" and cfg.train.strategy in FAST_SAMPLER_STRATEGIES


def distill_replay_sampler(
    cfg: RunConfig, teacher_dir: Path, fit: Fit, progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Distil (or find, on resume) the fast replay sampler of the teacher at ``teacher_dir``; its draws are seeded
    by (run seed, teacher)."""
    rs = cfg.replay_sampler
    seed = derive_seed(cfg.seed, "replay_sampler", Path(teacher_dir).name)
    if rs.method == "pid":
        settings = PIDConfig(iterations=rs.iterations, batch_size=rs.batch_size, lr=rs.lr, seed=seed)
    else:  # v students, data-free
        settings = ProgressiveConfig(
            start_steps=rs.start_steps,
            target_steps=rs.steps,
            parameterisation="v",
            iterations=rs.iterations,
            batch_size=rs.batch_size,
            lr=rs.lr,
            seed=seed,
        )
    return distill(rs.method, teacher_dir, replay_sampler_dir(teacher_dir), settings, fit, progress=progress, log=log)[
        -1
    ]


def teacher_of(cfg: RunConfig, unet: UNet2DModel, sampler: Optional[Callable] = None) -> Teacher:
    """``unet``, frozen, as ``cfg``'s teacher: its DDIM replay settings, partial generation's t' and the run's
    precision (every teacher is built here: the replay's, LwF's, inline or on Ray)."""
    t = cfg.train
    frozen = unet.eval().requires_grad_(False)
    return Teacher(
        frozen, build_scheduler(cfg.model), t.teacher_steps, t.teacher_eta, sampler, cfg.runtime.precision, t.partial_t
    )


def lwf_teacher(cfg: RunConfig, state: dict[str, torch.Tensor], device: torch.device | str) -> Teacher:
    """LwF's teacher from the weights ``state`` of the model after task k-1 (a Train worker's starting weights)."""
    unet = build_unet(cfg.model, cfg.data.image_channels)
    unet.load_state_dict(state)
    return teacher_of(cfg, unet.to(device))


def load_teacher(cfg: RunConfig, teacher_dir: Path, device: torch.device | str) -> Teacher:
    """The frozen teacher saved at ``teacher_dir`` with its replay settings, and its fast sampler when
    ``replay_sampler.method`` asks for one (distilled beforehand by ``distill_replay_sampler``)."""
    unet = load_unet(teacher_dir, cfg.model, device, cfg.data.image_channels)
    sampler = None
    if uses_fast_sampler(cfg):
        rs = cfg.replay_sampler
        sampler = fast_sampler(rs.method, replay_sampler_dir(teacher_dir), device, rs.steps)
    return teacher_of(cfg, unet, sampler)


@dataclass(frozen=True)
class TeacherFiles:
    """The checkpoint files of a teacher (OUT/task_<k>) and of the fast replay sampler it uses, by path relative to
    OUT: plain bytes, so that sampler actors on any node get the teacher through the object store."""

    name: str  # task_<k>
    files: dict[str, bytes]

    @classmethod
    def read(cls, cfg: RunConfig, teacher_dir: Path) -> TeacherFiles:
        teacher_dir = Path(teacher_dir)
        require_checkpoint(teacher_dir)  # a clear error here, in the driver (the run loaded it as its student)
        dirs = [teacher_dir]
        if uses_fast_sampler(cfg):
            rs = cfg.replay_sampler
            sampler_dir = replay_sampler_dir(teacher_dir)
            dirs.append(stage_dir(sampler_dir, rs.steps) if rs.method == "progressive" else sampler_dir)
        root = teacher_dir.parent
        files = {str(p.relative_to(root)): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}
        return cls(teacher_dir.name, files)

    def load(self, cfg: RunConfig, device: torch.device | str) -> Teacher:
        """:func:`load_teacher` on a private copy of the files."""
        with tempfile.TemporaryDirectory(prefix="distcl-teacher-") as root:
            for name, data in self.files.items():
                path = Path(root) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return load_teacher(cfg, Path(root) / self.name, device)
