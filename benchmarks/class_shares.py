"""Which classes a run's final generator draws (#14: does gd at lambda 3 lose the newest task?): the final task's
evaluation of each given run, made again inline (the same seeded samples, so the same FID and KLD as its
metrics.parquet, checked), and the share of its samples that the evaluation classifier labels as each task's
classes, next to the share the test images have; and the same samples scored by the network of the older
evaluation (trained at 28x28, the model's samples and the test images taken through the model's size and
resized to 28 by the network: ``fid_28``, ``kld_28``), the metric before #14's fix.

    python -m benchmarks.class_shares runs/sweeps/benchmark/runs/*    # -> benchmarks/results/class_shares.json

Runs already in the file are kept (the same run directory measured again is replaced), each with the machine and
date it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import REPO, RESULTS, machine
from distcl.backend import InlineBackend
from distcl.config import load_config
from distcl.data import build_scenario, cache_dir, load_dataset, to_model_range
from distcl.evaluation import Evaluator, LoadedNets, metrics_from_chunks
from distcl.models import load_unet
from distcl.rundir import all_tasks_evaluated, task_dir

OLD_SIZE = 28  # the older evaluation's network: trained on 28x28 images, whatever the model's size


def class_shares(run_dir: Path) -> dict:
    """The run's final-task shares per task: of its generated samples and of the test images as the evaluation
    network labels them (both taken through the model's resolution), next to the test images' true share; the
    recomputed FID and KLD."""
    cfg = load_config(run_dir / "config.yaml")
    cpu = torch.device("cpu")
    last = cfg.data.num_tasks - 1
    model = load_unet(task_dir(run_dir, last), cfg.model, cpu, cfg.data.image_channels)
    size = model.config.sample_size
    dataset = load_dataset(cfg.data, cfg.cache_dir, size)
    scenario = build_scenario(dataset, cfg.data, cfg.seed, size)
    test = scenario.test_split(last)

    def evaluate(evaluator: Evaluator) -> tuple[dict, list]:
        """The run's final evaluation (its seeded samples) scored by ``evaluator``'s network."""
        job = evaluator.job(last, cfg.seed, cfg.model, model.state_dict(), test, size)
        results = InlineBackend(cpu).evaluate(job, False)
        return metrics_from_chunks(results, test.labels, scenario.num_classes)[0], results

    evaluator = Evaluator(cfg.eval, dataset, size, cache_dir(cfg.cache_dir), cpu, progress=False)
    metrics, results = evaluate(evaluator)
    older = Evaluator(
        cfg.eval, load_dataset(cfg.data, cfg.cache_dir, OLD_SIZE), OLD_SIZE, cache_dir(cfg.cache_dir), cpu, False
    )
    metrics_28, _ = evaluate(older)
    generated = torch.cat(
        [r.labels for r in sorted(results, key=lambda r: r.chunk.start) if r.chunk.kind == "generated"]
    )
    saved = pd.read_parquet(run_dir / "metrics.parquet").query("task == @last").set_index("metric").value
    labelled = LoadedNets(evaluator.nets, cpu).labels(to_model_range(test.images, size))  # the floor
    shares = []
    for k, classes in enumerate(scenario.tasks):
        classes_t = torch.tensor(classes)
        shares.append(
            {
                "task": k,
                "classes": scenario.task_names(k),
                "generated": float(torch.isin(generated, classes_t).float().mean()),
                "test": float(torch.isin(test.labels, classes_t).float().mean()),
                "test_labelled": float(torch.isin(labelled, classes_t).float().mean()),
            }
        )
    return {
        "run": run_name(run_dir),
        "strategy": cfg.train.strategy,
        "replay_lambda": cfg.train.replay_lambda,
        "teacher_steps": cfg.train.teacher_steps,
        "seed": cfg.seed,
        "samples": len(generated),
        "fid": metrics["fid"],
        "kld": metrics["kld"],
        "fid_saved": float(saved["fid"]),
        "kld_saved": float(saved["kld"]),
        "fid_28": metrics_28["fid"],
        "kld_28": metrics_28["kld"],
        "shares": shares,
    }


def label(run: dict) -> str:
    """gd lambda 3 (2 steps) seed 42; finetune seed 42."""
    if run["strategy"] in ("finetune", "joint"):
        return f"{run['strategy']} seed {run['seed']}"
    return f"{run['strategy']} lambda {run['replay_lambda']:g} ({run['teacher_steps']} steps) seed {run['seed']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--results", type=Path, default=RESULTS / "class_shares.json")
    args = parser.parse_args()
    runs = [class_shares(r) for r in args.runs if all_tasks_evaluated(r, load_config(r / "config.yaml").data.num_tasks)]
    for run in runs:
        print(
            f"\n{label(run)}: FID {run['fid']:.3f} (saved {run['fid_saved']:.3f}), "
            f"KLD {run['kld']:.3f} (saved {run['kld_saved']:.3f}), {run['samples']} samples; by the "
            f"{OLD_SIZE}x{OLD_SIZE} network: FID {run['fid_28']:.3f}, KLD {run['kld_28']:.3f}"
        )
        print("| task | classes | generated | test, labelled | test |\n|---|---|---|---|---|")
        for s in run["shares"]:
            print(
                f"| {s['task']} | {', '.join(s['classes'])} | {s['generated']:.3f} | {s['test_labelled']:.3f} | "
                f"{s['test']:.3f} |"
            )
    write_runs(args.results, runs)


def run_name(run_dir: Path) -> str:
    """The run directory as the file names it: relative to the repository when inside it."""
    resolved = run_dir.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def write_runs(path: Path, runs: list[dict]) -> None:
    """Fold ``runs`` (stamped with this machine and date) into the file: the same run directory measured again is
    replaced, the others are kept with the machine they were measured on; sorted by strategy, lambda, teacher steps
    and seed; written atomically."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    kept = {r["run"]: r for r in old["runs"]}
    kept.update({r["run"]: {**r, "machine": machine()} for r in runs})
    order = sorted(kept.values(), key=lambda r: (r["strategy"], r["replay_lambda"], r["teacher_steps"], r["seed"]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"runs": order}, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
