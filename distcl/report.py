"""Parquet results -> Markdown tables and PNG plots (no LaTeX needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PLOTTED_METRICS = ("fid", "kld", "accuracy")


def load_metrics(out: Path) -> pd.DataFrame:
    """A run's metrics and, when written, the "real data" rows of their floor (real images scored as samples)."""
    path = Path(out) / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {out} a distcl run directory?")
    real = Path(out) / "real_metrics.parquet"
    return pd.concat([pd.read_parquet(p) for p in (path, real) if p.is_file()], ignore_index=True)


def task_classes(out: Path) -> Optional[list[list[str]]]:
    """Each task's class names (OUT/tasks.json; None for a run from before it was written)."""
    path = Path(out) / "tasks.json"
    return json.loads(path.read_text())["classes"] if path.is_file() else None


def metrics_table(df: pd.DataFrame, classes: Optional[list[list[str]]] = None) -> str:
    """One row per (run, strategy, task), one column per metric (not the per-task accuracies behind
    ``forgetting``), and each task's new classes when known, as a Markdown table."""
    df = df[~df.metric.str.startswith("accuracy_task")]
    wide = df.pivot_table(index=["run", "strategy", "task"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    if classes is not None:
        wide.insert(3, "classes", [", ".join(classes[k]) for k in wide.task])
    return wide.to_markdown(index=False, floatfmt=".4f")


def plot_metrics(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``<metric>.png``: the metric against task, one line per (run, strategy)."""
    paths = []
    for metric in PLOTTED_METRICS:
        sub = df[df.metric == metric]
        if sub.empty:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (run, strategy), group in sub.groupby(["run", "strategy"]):
            group = group.sort_values("task")
            ax.plot(group.task, group.value, marker="o", label=f"{run} ({strategy})")
        ax.set_xlabel("task")
        ax.set_ylabel(metric.upper())
        ax.set_xticks(sorted(sub.task.unique()))
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
