"""Shared by the benchmark scripts: the machine's description and the results folder."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pandas as pd

from distcl.devices import describe_host

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def machine(day: datetime.date | None = None) -> str:
    """This machine (distcl.devices.describe_host) and ``day`` (default: today)."""
    return f"{describe_host()}; {(day or datetime.date.today()).isoformat()}"


QUALITY_ORDER = ["tag", "strategy", "seed", "task", "metric"]  # a row of quality.parquet


def write_quality(results: pd.DataFrame, path: Path) -> None:
    """Write quality.parquet's rows sorted by QUALITY_ORDER (folding the same runs again gives the same file) and
    atomically (an interrupted write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    results.sort_values(QUALITY_ORDER, kind="stable").reset_index(drop=True).to_parquet(tmp)
    os.replace(tmp, path)
