"""Sweep files: validation before any trial starts, and the tables made from trials' run directories."""

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distcl.cli import main
from distcl.rundir import all_tasks_evaluated, append_rows
from distcl.settings import ConfigError
from distcl.sweep import (
    SweepConfig,
    best_configs,
    fid_auc,
    load_sweep,
    plot_final_fid,
    summarize,
    summary_markdown,
    trial_row,
    trial_slug,
)

TUNING = Path(__file__).resolve().parents[1] / "tuning"
GOOD = {"preset": "smoke", "params": {"train.replay_lambda": [0.5, 3.0], "seed": [42, 69]}}


def write(tmp_path, **fields) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **fields}))
    return path


@pytest.mark.parametrize("name", ["quick.yaml", "paper.yaml"])
def test_shipped_sweeps_are_valid(name):
    sweep = load_sweep(TUNING / name)
    assert len(sweep.params["seed"]) >= 2
    trial = sweep.trial_config({key: values[0] for key, values in sweep.params.items()})
    assert trial.train.strategy == "gd"


def test_paper_sweep_is_the_reference_grid():
    sweep = load_sweep(TUNING / "paper.yaml")
    assert sweep.params["train.replay_lambda"] == [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    assert sweep.params["train.teacher_steps"] == [2, 10, 100]
    assert sweep.params["train.teacher_eta"] == [0.0, 1.0] and sweep.params["seed"] == [42, 69, 1714]
    assert sweep.preset == "paper"


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"params": {"train.replay_lamda": [1.0]}}, "params.train.replay_lamda", "unknown field"),
        ({"params": {}}, "params", "empty search space"),
        ({"params": {"seed": []}}, "params.seed", "empty list"),
        ({"params": {"train.teacher_steps": [2, 0]}}, "params.train.teacher_steps", "value 0 is not valid"),
        ({"metric": "accuracy"}, "metric", "not reported by any trial"),
        ({"params": {"train.replay_lambda": {"uniform": [0, 3]}}}, "params.train.replay_lambda", "search: random"),
        (
            {"search": "random", "params": {"train.replay_lambda": {"uniform": [3, 0]}}},
            "params.train.replay_lambda",
            "low < high",
        ),
        ({"search": "bayes"}, "search", "allowed: grid, random"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials", ">= 1"),
        ({"scheduler": "asha", "grace_period": 9}, "grace_period", "<= data.num_tasks"),
        ({"trials": 3}, "trials", "unknown field"),
    ],
)
def test_bad_sweep_names_the_field(tmp_path, fields, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(write(tmp_path, **fields))
    assert err.value.field == field


def test_bad_sweep_on_the_command_line_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", str(write(tmp_path, metric="acc")), "--out", str(out)]) == 2
    assert "metric: 'acc' is not reported" in capsys.readouterr().err
    assert not out.exists()
    assert main(["tune", "--resume", str(out)]) == 2  # nothing there to resume
    assert not out.exists()


def test_random_search_space_is_validated_at_its_ends(tmp_path):
    sweep = load_sweep(
        write(
            tmp_path,
            search="random",
            num_samples=3,
            params={"train.replay_lambda": {"loguniform": [0.1, 3.0]}, "seed": [42, 69]},
        )
    )
    assert sweep.num_samples == 3
    with pytest.raises(ConfigError, match="value -1"):
        load_sweep(write(tmp_path, search="random", params={"train.replay_lambda": {"uniform": [-1, 3]}}))


def test_the_number_of_trials_a_search_makes(tmp_path):
    """What a Ctrl-C'd sweep is measured against (Tune returns normally before it has made them all)."""
    assert load_sweep(TUNING / "paper.yaml").num_trials() == 8 * 3 * 2 * 3
    assert load_sweep(write(tmp_path)).num_trials() == 4
    drawn = {"train.teacher_eta": {"uniform": [0.0, 1.0]}, "seed": [42, 69]}
    assert load_sweep(write(tmp_path, search="random", num_samples=5, params=drawn)).num_trials() == 5


def test_fid_auc_is_the_trapezoid_over_tasks():
    assert fid_auc([10.0]) == 10.0
    assert fid_auc([10.0, 20.0, 40.0]) == pytest.approx(15.0 + 30.0)


def fake_run(directory: Path, fids: list[float], seed: int) -> Path:
    """A run directory with metrics.parquet in distcl's long form."""
    directory.mkdir(parents=True)
    rows = [
        {"run": directory.name, "seed": seed, "strategy": "gd", "task": k, "metric": m, "value": v}
        for k, f in enumerate(fids)
        for m, v in (("fid", f), ("kld", f / 100), ("tv", 0.5))
    ]
    pd.DataFrame(rows).to_parquet(directory / "metrics.parquet")
    return directory


def test_tables_aggregate_over_seeds_and_pick_the_best(tmp_path):
    sweep = SweepConfig(preset="smoke", params={"train.replay_lambda": [0.5, 3.0], "seed": [42, 69]})
    runs = {  # (lambda, seed): FID per task; lambda 3 ends better, lambda 0.5 has the smaller area
        (0.5, 42): [10, 20, 60],
        (0.5, 69): [12, 22, 64],
        (3.0, 42): [30, 40, 40],
        (3.0, 69): [34, 44, 44],
    }
    rows = []
    for (lam, seed), fids in runs.items():
        values = {"train.replay_lambda": lam, "seed": seed}
        rows.append(trial_row(values, fake_run(tmp_path / trial_slug(values), fids, seed), 3, error=False))
    values = {"train.replay_lambda": 3.0, "seed": 7}
    rows.append(trial_row(values, fake_run(tmp_path / "stopped", [50], 7), 3, error=False))  # stopped after task 0
    trials = pd.DataFrame(rows)
    assert trials.status.tolist() == ["completed"] * 4 + ["stopped"]
    assert trials.loc[0, "fid_task2"] == 60 and trials.loc[0, "fid_final"] == 60
    assert trials.loc[0, "fid_auc"] == pytest.approx(15 + 40)
    assert math.isnan(trials.loc[4, "fid_final"])

    summary = summarize(trials, list(sweep.params)).set_index("train.replay_lambda")
    assert summary.loc[3.0, "seeds"] == 2  # the stopped trial is left out
    assert summary.loc[0.5, "fid_final_mean"] == pytest.approx(62)
    assert summary.loc[0.5, "fid_final_se"] == pytest.approx(2.0)  # std (ddof 1) 2.83 / sqrt(2)
    assert summary.loc[3.0, "fid_auc_mean"] == pytest.approx(((35 + 40) + (39 + 44)) / 2)
    best = best_configs(summary.reset_index())
    assert best["final_fid"]["train.replay_lambda"] == 3.0
    assert best["fid_auc"]["train.replay_lambda"] == 0.5
    markdown = summary_markdown(sweep, summary.reset_index(), trials)
    assert "| 0.5 | 2 | 62.000 ± 2.000 | " in markdown and "best by final fid: train.replay_lambda=3.0" in markdown
    assert plot_final_fid(sweep, summary.reset_index(), tmp_path / "final_fid.png").stat().st_size > 0


def test_a_run_is_finished_when_every_task_has_metrics(tmp_path):
    def evaluate(k: int) -> None:
        append_rows(tmp_path / "metrics.parquet", [{"task": k, "metric": "fid", "value": 1.0}], k)

    assert not all_tasks_evaluated(tmp_path, 3)  # nothing yet
    evaluate(0)
    evaluate(2)  # the last task alone is not enough
    assert not all_tasks_evaluated(tmp_path, 3)
    evaluate(1)
    assert all_tasks_evaluated(tmp_path, 3) and not all_tasks_evaluated(tmp_path, 4)
