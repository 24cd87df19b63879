"""A run on the backend its config names: the choice made at the face (the CLI, the job entrypoints, a Tune
trial), so that the core (distcl.continual) never imports the Ray shell."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from distcl.config import RunConfig
from distcl.continual import run_continual


def run(cfg: RunConfig, out: Path, progress: bool = True, log: Callable[[str], None] = print,
        on_task: Optional[Callable[[int, dict[str, float]], None]] = None) -> Path:  # fmt: skip
    """Run ``cfg`` on its ``runtime.backend``: Ray (distcl.runtime.pipeline) or this process
    (distcl.continual.run_continual); the metrics table's path."""
    if cfg.runtime.backend == "ray":
        from distcl.runtime.pipeline import run as run_on_ray  # Ray is imported only when asked for

        return run_on_ray(cfg, out, progress=progress, log=log, on_task=on_task)
    return run_continual(cfg, out, progress=progress, log=log, on_task=on_task)
