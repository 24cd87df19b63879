"""Sweeps: a search space over run-config fields (YAML), validated before any trial starts, and the tables made
from the trials' run directories: one row per trial, mean and standard error over seeds, the best configs.

    name: quick
    preset: smoke                   # every trial starts from this preset (and/or `config: base.yaml`)
    base: {data: {num_tasks: 5}}    # run-config fields set in every trial
    search: grid                    # grid: every combination of the lists; random: num_samples draws
    params:                         # dotted run-config field -> a list, or a distribution (random search)
      train.replay_lambda: [0.5, 3.0]
      seed: [42, 69]
      train.teacher_eta: {uniform: [0.0, 1.0]}
    metric: fid                     # reported after every task (the time axis); mode: min
    scheduler: none                 # asha: stop trials whose metric is bad after grace_period tasks
    max_concurrent_trials: 2
    trial_cpus: 0.01                # the trial's driver; its Train workers and samplers: the runtime section
    trial_gpus: 0.25                # an inline trial's GPU share (default: 1 on a cluster with GPUs)

Ray Tune runs it (distcl.runtime.tune); everything here is plain Python and pandas.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import pandas as pd
import yaml
from annotated_types import Ge

from distcl.config import PRESETS, RunConfig, check_name, load_config
from distcl.settings import ConfigError, Count, Int, NonNegative, Positive, Text, check_field, from_dict, settings

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SUMMARY_METRICS = ("fid", "kld", "tv")  # final-task metrics aggregated over seeds, with fid_auc


def reported_metrics() -> tuple[str, ...]:
    """What a trial reports after every task: the evaluation metrics and the running FID area."""
    from distcl.evaluation import METRICS

    return (*METRICS, "fid_auc")


def fid_auc(fids: list[float]) -> float:
    """Area under the FID-per-task curve by the trapezoid rule over tasks 0..K: sum_k (f_k + f_{k+1}) / 2
    (f_0 for one task)."""
    return float(fids[0]) if len(fids) == 1 else float(np.trapezoid(fids))


@settings
class SweepConfig:
    """A sweep file: the trials' base config, the search space over its fields, the search and the scheduler.
    ``validate()`` checks what needs the trials' configs (after ``config:`` is resolved against the file)."""

    name: Text = "sweep"
    preset: Optional[Literal[tuple(PRESETS)]] = None  # a distcl.config preset every trial starts from
    config: Optional[Text] = None  # a run-config file every trial starts from (relative to the sweep file)
    base: dict = field(default_factory=dict)  # run-config fields set in every trial (a nested mapping)
    search: Literal["grid", "random"] = "grid"
    num_samples: Count = 1  # random search: configs drawn (grid: 1, make seed an axis to repeat)
    seed: Annotated[Int, Ge(0)] = 0  # random search: the draws
    params: dict = field(default_factory=dict)  # dotted field -> list of values | {distribution: args}
    metric: Text = "fid"  # one of reported_metrics()
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["none", "asha"] = "none"
    grace_period: Count = 1  # asha: tasks every trial runs before it may be stopped
    reduction_factor: Annotated[Int, Ge(2)] = 2  # asha
    max_concurrent_trials: Count = 1
    trial_cpus: Optional[Positive] = None  # None: 0.01 with the Ray backend (Train holds the cores), else 1
    trial_gpus: Optional[NonNegative] = None  # None: inline trials 1 on a cluster with GPUs (device auto/cuda), else 0

    def validate(self) -> None:
        check_name(self.name, "name")
        check_field(
            self.metric in reported_metrics(),
            "metric",
            f"{self.metric!r} is not reported by any trial (allowed: {', '.join(reported_metrics())})",
        )
        check_field(
            self.search == "random" or self.num_samples == 1,
            "num_samples",
            f"{self.num_samples} (allowed with grid search: 1; repeat runs with a seed axis)",
        )
        check_field(
            bool(self.params),
            "params",
            "empty search space (allowed: a mapping of run-config fields, e.g. train.replay_lambda, to a list "
            f"of values or to one of {{{', '.join(DISTRIBUTIONS)}: ...}})",
        )
        base = self.trial_config({})
        check_field(
            self.scheduler != "asha" or self.grace_period <= base.data.num_tasks,
            "grace_period",
            f"{self.grace_period} (allowed with asha: <= data.num_tasks = {base.data.num_tasks})",
        )
        for key, spec in self.params.items():
            for value in self._values_to_check(key, spec):
                try:
                    self.trial_config({key: value})
                except ConfigError as err:
                    raise ConfigError(f"params.{key}", f"value {value!r} is not valid: {err}") from None

    def _values_to_check(self, key: str, spec: Any) -> list:
        name = f"params.{key}"
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(name, "empty list of values (allowed: at least one value)")
            return spec
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(
                name, f"{spec!r} (allowed: a list of values, or one of {{{', '.join(DISTRIBUTIONS)}: ...}})"
            )
        if self.search == "grid":
            raise ConfigError(name, f"{spec!r}: distributions need search: random (allowed with grid: a list)")
        ((kind, args),) = spec.items()
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(name, f"choice needs a non-empty list, got {args!r}")
            return args
        ok = isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
        if not ok or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            positive = " and low > 0" if kind == "loguniform" else ""
            raise ConfigError(name, f"{kind} needs [low, high] with low < high{positive}, got {args!r}")
        return [args[0], args[1] - 1] if kind == "randint" else list(args)

    def num_trials(self) -> int:
        """Trials the search makes: the product of the grid's list lengths, or ``num_samples`` random draws."""
        if self.search == "random":
            return self.num_samples
        return math.prod(len(values) for values in self.params.values()) * self.num_samples

    def trial_config(self, values: dict[str, Any], name: Optional[str] = None) -> RunConfig:
        """The run config of the trial with ``values`` (dotted field -> value) on top of preset, config, base."""
        overrides = [f"{key}={json.dumps(value)}" for key, value in flatten(self.base).items()]
        overrides += [f"{key}={json.dumps(value)}" for key, value in values.items()]
        if name is not None:
            overrides.append(f"name={json.dumps(name)}")
        return load_config(self.config, self.preset, overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; a ``config:`` path is taken relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("sweep", f"file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("sweep", f"{path} is not valid YAML: {err}") from None
    sweep = from_dict(SweepConfig, data)
    if sweep.config is not None and not Path(sweep.config).is_absolute():
        sweep.config = str((path.parent / sweep.config).resolve())
    sweep.validate()
    # The trials read their configs in Tune's working directories: the directories that the preset, config file
    # or base name are fixed here, made absolute against this process's working directory (distcl.config).
    resolved = sweep.trial_config({})
    if resolved.cache_dir is not None:
        sweep.base["cache_dir"] = resolved.cache_dir
    if resolved.data.data_dir is not None:
        sweep.base.setdefault("data", {})["data_dir"] = resolved.data.data_dir
    return sweep


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"section.field": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trial_slug(values: dict[str, Any]) -> str:
    """A directory name for a trial: ``replay_lambda=0.5_seed=42`` (sorted by field)."""

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("/", "-").replace(" ", "")

    return "_".join(f"{key.rsplit('.', 1)[-1]}={fmt(values[key])}" for key in sorted(values))


def trial_row(values: dict[str, Any], run_dir: Path, num_tasks: int, error: bool) -> dict[str, Any]:
    """One row of sweep.parquet: the trial's params, status (completed | stopped | error), per-task metrics
    ``<metric>_task<k>``, the final task's ``<metric>_final`` and ``fid_auc`` (only when every task finished)."""
    row: dict[str, Any] = {
        **copy.deepcopy(values),
        "run_dir": str(run_dir),
        "status": "error" if error else "stopped",
        "tasks_done": 0,
    }
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return row
    metrics = pd.read_parquet(path)
    wide = metrics.pivot_table(index="task", columns="metric", values="value").sort_index()
    for k, task_values in wide.iterrows():
        for metric, value in task_values.items():
            row[f"{metric}_task{k}"] = float(value)
    row["tasks_done"] = len(wide)
    if len(wide) == num_tasks:
        row["status"] = "error" if error else "completed"
        for metric in wide.columns:
            row[f"{metric}_final"] = float(wide[metric].iloc[-1])
        row["fid_auc"] = fid_auc(wide["fid"].tolist())
    return row


def summarize(trials: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Mean and standard error over seeds of the final metrics and fid_auc, per config (params but seed);
    trials that did not finish every task are left out."""
    group = [p for p in params if p != "seed"]
    done = trials[trials.status == "completed"]
    columns = [f"{m}_final" for m in SUMMARY_METRICS] + ["fid_auc"]
    if done.empty:
        return pd.DataFrame(columns=[*group, "seeds", *[f"{c}_{s}" for c in columns for s in ("mean", "se")]])
    grouped = done.groupby(group, dropna=False) if group else done.groupby(lambda _: 0)
    rows = []
    for key, sub in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group, key)) if group else {}
        row["seeds"] = int(sub["seed"].nunique()) if "seed" in sub else len(sub)
        for c in columns:
            row[f"{c}_mean"] = float(sub[c].mean())
            row[f"{c}_se"] = float(sub[c].std(ddof=1) / math.sqrt(len(sub))) if len(sub) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def best_configs(summary: pd.DataFrame, mode: str = "min") -> dict[str, dict[str, Any]]:
    """The best config by final FID and by the area under the FID-per-task curve."""
    if summary.empty:
        return {}
    pick = (lambda s: s.idxmin()) if mode == "min" else (lambda s: s.idxmax())
    return {
        "final_fid": summary.loc[pick(summary["fid_final_mean"])].to_dict(),
        "fid_auc": summary.loc[pick(summary["fid_auc_mean"])].to_dict(),
    }


def summary_markdown(sweep: SweepConfig, summary: pd.DataFrame, trials: pd.DataFrame) -> str:
    """The Markdown summary: one row per config (mean ± standard error over seeds), then the best ones."""
    group = [p for p in sweep.params if p != "seed"]
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"{len(trials)} trials ({(trials.status == 'completed').sum()} completed); "
        "final-task metrics and FID area, mean ± standard error over seeds.",
        "",
    ]
    if summary.empty:
        return "\n".join(lines + ["No trial finished every task."])
    head = [*group, "seeds", "final FID", "final KLD", "final TV", "FID area"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pm(row, c):
        se = row[f"{c}_se"]
        return f"{row[f'{c}_mean']:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")

    for _, row in summary.iterrows():
        cells = [str(row[g]) for g in group] + [str(int(row["seeds"]))]
        cells += [pm(row, c) for c in ("fid_final", "kld_final", "tv_final", "fid_auc")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for criterion, row in best_configs(summary, sweep.mode).items():
        config = ", ".join(f"{g}={row[g]}" for g in group) or "(the only config)"
        lines.append(f"- best by {criterion.replace('_', ' ')}: {config}")
    return "\n".join(lines) + "\n"


def plot_final_fid(sweep: SweepConfig, summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Final FID against lambda (else the first numeric param), one line per value of the other params (the
    number of teacher steps, eta, ...)."""
    group = [p for p in sweep.params if p != "seed"]
    numeric = [p for p in group if pd.api.types.is_numeric_dtype(summary[p])] if not summary.empty else []
    if not numeric:
        return None
    x = "train.replay_lambda" if "train.replay_lambda" in numeric else numeric[0]
    others = [p for p in group if p != x]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, sub in summary.groupby(others) if others else [((), summary)]:
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{o.rsplit('.', 1)[-1]}={v}" for o, v in zip(others, key)) or "final FID"
        sub = sub.sort_values(x)
        ax.errorbar(
            sub[x], sub["fid_final_mean"], yerr=sub["fid_final_se"].fillna(0), marker="o", capsize=3, label=label
        )
    ax.set_xlabel(x)
    ax.set_ylabel("final FID (mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
