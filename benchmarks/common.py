"""Shared by the benchmark scripts: the machine's description and the results folder."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import scipy.stats

from distcl.devices import describe_host
from distcl.rundir import REAL_DATA

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def machine(day: datetime.date | None = None) -> str:
    """This machine (distcl.devices.describe_host) and ``day`` (default: today)."""
    return f"{describe_host()}; {(day or datetime.date.today()).isoformat()}"


def machine_type(stamp: str) -> str:
    """A :func:`machine` stamp without its date: the kind of machine (CPU model, cores, memory, GPU, versions)."""
    return stamp.rsplit("; ", 1)[0]


def paired_test(diffs: Sequence[float], level: float = 0.95) -> Optional[int]:
    """Two-sided paired t-test of per-seed differences: +1 (mean significantly above 0), -1 (below), 0 (within
    noise: |mean| <= t_{(1+level)/2, n-1} * se, se = sd / sqrt(n)); None for fewer than 2 differences."""
    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        return None
    mean, se = diffs.mean(), diffs.std(ddof=1) / np.sqrt(len(diffs))
    bound = scipy.stats.t.ppf((1 + level) / 2, len(diffs) - 1) * se
    return 1 if mean > bound else -1 if mean < -bound else 0


def stamped(rows: pd.DataFrame, wall_s: float, machine: str, tag: str, preset: str) -> pd.DataFrame:
    """A run's rows for quality.parquet: its wall time (none on its real-data floor, which took no run of its own),
    the machine it ran on, its tag and preset."""
    rows = rows.assign(wall_s=wall_s, machine=machine, tag=tag, preset=preset)
    return rows.assign(wall_s=rows.wall_s.where(rows.strategy != REAL_DATA))


QUALITY_ORDER = ["tag", "strategy", "seed", "task", "metric"]  # a row of quality.parquet


@contextlib.contextmanager
def quality_results(path: Path):
    """``with quality_results(path) as results: results.rows = ...``: quality.parquet's rows (empty if none), read
    and, when ``rows`` was assigned, written back under an exclusive lock on ``path``.lock, so the benchmark
    scripts that fold runs into it take turns and none loses another's rows; written sorted by QUALITY_ORDER
    (folding the same runs again gives the same file) and atomically (an interrupted write leaves the previous
    file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        holder = QualityRows(pd.read_parquet(path) if path.exists() else pd.DataFrame())
        yield holder
        if holder.changed:
            tmp = path.with_name(f".{path.name}.tmp")
            holder.rows.sort_values(QUALITY_ORDER, kind="stable").reset_index(drop=True).to_parquet(tmp)
            os.replace(tmp, path)


class QualityRows:
    """The rows :func:`quality_results` read; assigning ``rows`` marks them to be written back."""

    def __init__(self, rows: pd.DataFrame):
        self._rows, self.changed = rows, False

    @property
    def rows(self) -> pd.DataFrame:
        return self._rows

    @rows.setter
    def rows(self, rows: pd.DataFrame) -> None:
        self._rows, self.changed = rows, True
