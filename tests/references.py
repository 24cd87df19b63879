"""The inline runs that the Ray tests compare against, computed beside the Ray run they check."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from distcl.config import RunConfig
from distcl.continual import run_continual


def _run_with_one_thread(cfg: RunConfig, out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Train workers and the sampler actors compute
    try:
        run_continual(cfg, out, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def inline_beside(cfg: RunConfig, out: Path) -> Future:
    """An inline run of ``cfg`` into ``out`` with 1 thread, in a thread of this process (``.result()`` waits for
    it): it computes while a Ray run waits for nodes, actors and imports."""
    return ThreadPoolExecutor(1, thread_name_prefix="inline-reference").submit(_run_with_one_thread, cfg, out)
