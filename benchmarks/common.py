"""Shared by the benchmark scripts: the machine's description and the results folder."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def machine(day: datetime.date | None = None) -> str:
    """CPU model, cores, memory, GPU (if any), Python and torch versions, and ``day`` (default: today)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}; {(day or datetime.date.today()).isoformat()}"
    )


QUALITY_ORDER = ["tag", "strategy", "seed", "task", "metric"]  # a row of quality.parquet


def write_quality(results: pd.DataFrame, path: Path) -> None:
    """Write quality.parquet's rows sorted by QUALITY_ORDER (folding the same runs again gives the same file) and
    atomically (an interrupted write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    results.sort_values(QUALITY_ORDER, kind="stable").reset_index(drop=True).to_parquet(tmp)
    os.replace(tmp, path)
