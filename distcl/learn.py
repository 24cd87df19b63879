"""Learning after the run: ``distcl learn OUT --data-dir NEW`` appends the classes in NEW as the next task of the
run in OUT (several tasks with ``data.tasks``). The teacher is OUT's newest task and the new task's training data
is NEW's alone: the earlier tasks' data is never read (what their evaluation needs is in OUT: distcl.evalstore,
and the evaluation network OUT/eval_net.pt).

What an append may change: training settings (``train``, ``replay_sampler``, ``classifier``), the data of the
new task (``data`` but its ``source`` and ``channels``), where it runs (``runtime``, ``device``, ``tracking``).
What it may not: ``name``, ``seed``, ``model``, ``data.source``, ``data.channels``, ``eval`` (the model and its
metrics stay those of the run), nor ``train.strategy: joint`` (it trains on every earlier task's data). Each
appended task's config is kept in OUT/task_configs/task_<k>.yaml (the first run's tasks: OUT/config.yaml).

Watching an inbox (``distcl learn OUT --watch INBOX``): each arrival is a folder of class folders that holds a
READY file once it is complete (write it last; a half-copied arrival is never read); it becomes the next task.
An arrival whose classes OUT has learned is skipped, so a restarted watch trains no arrival twice.

Classes are named: an image folder's new class folders get the next labels; a class already trained cannot come
back as new (more images of a trained class are refused, naming it). A learn stopped mid-task is resumed by the
same command: the task left unfinished is the one it trains, never a finished one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from distcl.config import RunConfig, absolute_paths, apply_overrides, deep_update
from distcl.data import Dataset, Files, Scenario, Split, list_image_folder, resolve_tasks, select
from distcl.rundir import task_dir
from distcl.settings import ConfigError, from_dict

TASK_CONFIGS = "task_configs"
READY = "READY"  # an arrival in a watched inbox is complete once it holds this file (written after every image)
KEPT = ("name", "seed", "model", "data.source", "data.channels", "eval")  # what an append may not change


def task_config_path(out: Path, k: int) -> Path:
    return Path(out) / TASK_CONFIGS / f"task_{k}.yaml"


def tasks_state(out: Path) -> dict:
    """OUT/tasks.json: {"tasks": [[label, ...], ...], "classes": [[name, ...], ...], "class_names": [...]}."""
    return json.loads((Path(out) / "tasks.json").read_text())


def trained_tasks(out: Path) -> int:
    """How many tasks OUT holds trained (task_0 .. task_<n-1>)."""
    n = 0
    while task_dir(out, n).is_dir():
        n += 1
    return n


def newest_config(out: Path) -> dict:
    """The config of OUT's newest trained task: its task_configs file, else the first run's config.yaml."""
    n = trained_tasks(out)
    path = task_config_path(out, n - 1)
    return yaml.safe_load((path if path.is_file() else Path(out) / "config.yaml").read_text())


def ready_arrivals(inbox: Path) -> list[Path]:
    """The arrivals in ``inbox`` (folders of class folders) that hold their READY file, by name: a folder still
    being copied has none and is never read."""
    return sorted(p for p in Path(inbox).iterdir() if p.is_dir() and (p / READY).is_file())


def learned(out: Path, arrival: Path) -> bool:
    """Every class folder of ``arrival`` is a class of one of OUT's trained tasks (it was appended before)."""
    state = tasks_state(out)
    trained = {name for names in state["classes"][: trained_tasks(out)] for name in names}
    return {p.name for p in Path(arrival).iterdir() if p.is_dir()} <= trained


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def require_run(out: Path) -> None:
    if not ((out / "config.yaml").is_file() and (out / "tasks.json").is_file() and trained_tasks(out) > 0):
        raise ConfigError("OUT", f"{out} is not a distcl run with a trained task (allowed: a --out of distcl run)")


def learn_config(out: Path, data_dir: Optional[str], overrides: list[str]) -> RunConfig:
    """The config of the task(s) an append adds to ``out``: its newest task's config, NEW's data (``data.tasks``
    cleared unless set), then ``overrides``; refused (ConfigError, nothing written) where a kept field changes."""
    out = Path(out)
    require_run(out)
    base = RunConfig().to_dict()
    deep_update(base, newest_config(out))
    merged = copy.deepcopy(base)
    merged["data"].update({"tasks": None, "num_tasks": None, "data_dir": data_dir})
    apply_overrides(merged, overrides)
    for field in KEPT:
        if _get(merged, field) != _get(base, field):
            raise ConfigError(
                field,
                f"{_get(base, field)!r} -> {_get(merged, field)!r}: an append keeps the run's model and evaluation "
                "(allowed to change: train, replay_sampler, classifier, data but source and channels, runtime, "
                "device, tracking)",
            )
    cfg = absolute_paths(from_dict(RunConfig, merged))
    if cfg.train.strategy == "joint":
        raise ConfigError(
            "train.strategy",
            "'joint' trains on every earlier task's data, which an append does not have "
            "(allowed: gd, gr, partial_generation, gaussian, lwf, finetune)",
        )
    if cfg.classifier.enabled and cfg.classifier.resolved_strategy(cfg.train.strategy) == "joint":
        raise ConfigError("classifier.strategy", "'joint' needs the earlier tasks' data (allowed: replay, finetune)")
    if cfg.data.source == "image_folder":
        check_field_folder(cfg)
    return cfg


def check_field_folder(cfg: RunConfig) -> None:
    if cfg.data.data_dir is None:
        raise ConfigError("--data-dir", "missing: an append to an image-folder run reads its new classes from one")
    list_image_folder(Path(cfg.data.data_dir), cfg.data.test_fraction)  # missing, empty: ConfigError


def append_scenario(out: Path, cfg: RunConfig, dataset: Dataset, sample_size: int) -> Scenario:
    """OUT's tasks, then the new ones from ``dataset`` (NEW), over the run's class list (an image folder's new
    classes appended to it); only the new classes' images are in its splits. A task that an earlier learn left
    unfinished must be the one asked for again (it is resumed)."""
    state = tasks_state(out)
    old = [tuple(t) for t in state["tasks"]]
    done = trained_tasks(out)
    names = list(state.get("class_names") or dataset.class_names)
    if cfg.data.source == "image_folder":
        names += [n for n in dataset.class_names if n not in names]
        to_run = torch.tensor([names.index(n) for n in dataset.class_names], dtype=torch.long)
        dataset = _relabelled(dataset, to_run, names)
        if cfg.data.tasks is None:
            new = [tuple(int(to_run[c]) for c in range(len(to_run)))]
        else:
            new = resolve_tasks(cfg.data, cfg.seed, names)
    else:
        if cfg.data.tasks is None:
            untrained = [n for c, n in enumerate(names) if all(c not in t for t in old[:done])]
            raise ConfigError(
                "data.tasks",
                f"null: name the new task's classes, e.g. --set 'data.tasks=[[{untrained[0]}]]' "
                f"(allowed: classes not trained yet: {', '.join(untrained)})",
            )
        new = resolve_tasks(cfg.data, cfg.seed, names)
    trained = {c: j for j, t in enumerate(old[:done]) for c in t}
    for c in (c for t in new for c in t):
        if c in trained:
            untrained = [n for i, n in enumerate(names) if i not in trained]
            raise ConfigError(
                "data.tasks" if cfg.data.tasks is not None else "--data-dir",
                f"class {names[c]!r} was trained in task {trained[c]}: more images of a trained class are not a "
                f"new task (allowed: classes not trained yet{': ' + ', '.join(untrained) if untrained else ''})",
            )
    pending = old[done:]
    if pending and pending != new[: len(pending)]:
        raise ConfigError(
            "--data-dir",
            f"{out} has task {done} ({', '.join(names[c] for c in pending[0])}) left unfinished by an earlier "
            "learn: rerun that learn to finish it (allowed: the same classes)",
        )
    used = [c for t in new for c in t]
    files = dataset.train_files
    return Scenario(
        tasks=old[:done] + new,
        train=select(dataset.train, used, cfg.data.train_per_class),
        test=select(dataset.test, used, cfg.data.test_per_class),
        sample_size=sample_size,
        class_names=names,
        train_files=files.select(used, cfg.data.train_per_class) if files is not None else None,
    )


def _relabelled(dataset: Dataset, to_run: torch.Tensor, names: list[str]) -> Dataset:
    """``dataset`` with its labels mapped to the run's (``to_run[local label]``)."""
    files = dataset.train_files
    return Dataset(
        dataset.source,
        *(Split(s.images, to_run[s.labels]) for s in (dataset.train, dataset.test)),
        names,
        Files(files.paths, to_run[files.labels]) if files is not None else None,
    )
