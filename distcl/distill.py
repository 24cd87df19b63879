"""Fast-sampling distillation of a distcl teacher, run as units of optimisation that are the same in this process
and on Ray Train (distcl.runtime.distill): progressive distillation's halving stages (OUT/steps_<n>/) or the PID
student (OUT/).

A unit is a model, a loss of (model, step, shard) and a save. Step k's random draws depend only on (seed, k) and
are made for the whole batch; worker r of W takes the rows ``slice(r, None, W)`` of them. With equal shards, the
mean of the workers' gradients (DDP) is the whole batch's gradient, so any number of workers trains the same
model, up to float rounding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from distcl.config import PIDConfig, ProgressiveConfig
from distcl.diffusion import ddim_sample
from distcl.models import load_pipeline_parts
from distcl.pid import STUDENT_FILE, load_pid_student, pid_unit
from distcl.progressive import stage_dir, stage_unit
from distcl.settings import ConfigError
from distcl.training import DistillUnit, optimise

METHODS = {"progressive": ProgressiveConfig, "pid": PIDConfig}
SETTINGS_FILE = "distill.json"
MethodConfig = Union[ProgressiveConfig, PIDConfig]
X0Sampler = Callable[[torch.Tensor], torch.Tensor]  # x_T ~ N(0, I) -> x0_hat in [-1, 1]


@dataclass
class UnitSpec:
    """What builds a unit anywhere (a Ray Train worker too): the method, the teacher, OUT, the settings and the PD
    stage's student step count n (None for PID)."""

    method: str
    teacher: Path
    out: Path
    cfg: MethodConfig
    n: Optional[int] = None

    @property
    def name(self) -> str:
        return f"steps_{self.n}" if self.method == "progressive" else "pid"

    @property
    def output(self) -> Path:
        return stage_dir(self.out, self.n) if self.method == "progressive" else self.out

    @property
    def done(self) -> bool:
        """The unit's output is complete (both are written last: an atomic rename, pid.json)."""
        return self.output.is_dir() if self.method == "progressive" else (self.output / STUDENT_FILE).is_file()

    def build(self, device: torch.device | str, images: Optional[torch.Tensor] = None) -> DistillUnit:
        if self.method == "progressive":
            return stage_unit(self.teacher, self.out, self.n, self.cfg, device, images)
        return pid_unit(self.teacher, self.out, self.cfg, device)


INLINE_READ_EVERY = 10  # steps between host reads of the loss (the progress bar's)
Fit = Callable[[UnitSpec, Optional[torch.Tensor], bool], tuple[DistillUnit, list[dict]]]


def fit_inline(
    spec: UnitSpec, images: Optional[torch.Tensor], progress: bool, device: torch.device | str = "cpu"
) -> tuple[DistillUnit, list[dict]]:
    """Train the unit in this process on the whole batch."""
    unit = spec.build(device, images)
    optimizer = torch.optim.Adam(unit.model.parameters(), lr=unit.lr)
    rows = optimise(
        unit.model,
        optimizer,
        lambda step: {"loss": unit.loss(unit.model, step, slice(None))},
        unit.iterations,
        grad_clip=1.0,
        read_every=INLINE_READ_EVERY,
        progress=progress,
        desc=f"distil {spec.method} {spec.name}",
    )
    return unit, rows


def distill(
    method: str,
    teacher: Path,
    out: Path,
    cfg: MethodConfig,
    fit: Fit,
    images: Optional[torch.Tensor] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_unit: Optional[Callable[[UnitSpec, list[dict]], None]] = None,
) -> list[Path]:
    """Distil the eps teacher at ``teacher`` by ``method`` into ``out``; returns the outputs (PD: one per stage).
    Units already done are skipped (resume); OUT/distill.json records the settings, and an OUT that holds a
    distillation with other settings is refused. ``on_unit(spec, rows)`` follows each unit trained and saved."""
    if method not in METHODS:
        raise ConfigError("method", f"{method!r} (allowed: {', '.join(METHODS)})")
    if method == "progressive" and cfg.data == "fmnist" and images is None:
        raise ConfigError("data", "fmnist needs the training images (--data-dir)")
    teacher, out = Path(teacher).resolve(), Path(out).resolve()  # both travel to Ray Train workers
    unet, scheduler = load_pipeline_parts(teacher)
    if unet.config.out_channels != unet.config.in_channels or scheduler.config.prediction_type != "epsilon":
        raise ConfigError("--teacher", f"{teacher} is not a distcl eps-prediction checkpoint")
    settings = {"method": method, "teacher": str(teacher), **asdict(cfg)}
    record = out / SETTINGS_FILE
    if record.exists() and json.loads(record.read_text()) != settings:
        raise ConfigError("--out", f"{out} holds a distillation with other settings (use another --out)")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))
    stages = cfg.stages() if method == "progressive" else [None]
    specs = [UnitSpec(method, teacher, out, cfg, n) for n in stages]
    for spec in specs:  # in order: PD stage n's teacher is stage 2n's output
        if spec.done:
            continue
        unit, rows = fit(spec, images, progress)
        unit.save(rows)
        log(
            f"[distcl] {method} {spec.name}: {unit.iterations} iterations, last loss {rows[-1]['loss']:.4f} "
            f"-> {spec.output}"
        )
        if on_unit is not None:
            on_unit(spec, rows)
    return [spec.output for spec in specs]


def fast_sampler(method: str, out: Path, device: torch.device | str = "cpu", steps: Optional[int] = None) -> X0Sampler:
    """The sampler distilled into ``out`` as a map x_T -> x0_hat: its ``steps``-step PD student (DDIM with the
    student's own scheduler) or its PID student (one step, z = T x_T)."""
    if method == "pid":
        return load_pid_student(out, device).generate
    unet, scheduler = load_pipeline_parts(stage_dir(out, steps), device)
    unet.eval().requires_grad_(False)

    def sample(x_T: torch.Tensor) -> torch.Tensor:
        return ddim_sample(unet, scheduler, x_T, steps, 0.0, None).clamp(-1, 1)

    return sample
