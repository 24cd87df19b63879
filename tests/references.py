"""The inline runs that the Ray tests compare against, computed beside the Ray run they check."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from distcl.config import RunConfig
from distcl.continual import run_continual


def inline_beside(cfg: RunConfig, out: Path) -> Future:
    """An inline run of ``cfg`` into ``out`` in a thread of this process (on the tests' 1 torch thread, as the
    Ray workers compute: conftest.py; ``.result()`` waits for it): it computes while a Ray run waits for nodes,
    actors and imports."""
    run = partial(run_continual, progress=False, log=lambda _: None)
    return ThreadPoolExecutor(1, thread_name_prefix="inline-reference").submit(run, cfg, out)
