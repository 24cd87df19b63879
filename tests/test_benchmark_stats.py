"""The benchmark scripts' shared pieces: the statistics behind the README's verdicts, machine stamps, and the
locked read-change-write of quality.parquet (benchmarks.common, distcl.runtime.tune)."""

import threading
import time

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from benchmarks.common import machine_type, paired_test, quality_results
from benchmarks.readme_results import claims
from distcl.runtime.tune import trial_start


def test_paired_test_needs_the_t_quantile_of_n_minus_1_degrees_of_freedom():
    # mean 2, sd 1, se 1/sqrt(3): t = 3.46 < t_0.975(2) = 4.30 -> within noise, though a normal 1.96 would pass
    assert paired_test([1.0, 2.0, 3.0]) == 0
    assert paired_test([10.0, 11.0, 12.0]) == 1
    assert paired_test([-10.0, -11.0, -12.0]) == -1
    assert paired_test([5.0]) is None and paired_test([]) is None


@pytest.mark.parametrize("seed", range(20))
def test_paired_test_agrees_with_scipys_one_sample_t_test(seed):
    rng = np.random.default_rng(seed)
    diffs = rng.normal(rng.uniform(-2, 2), 1.0, size=int(rng.integers(2, 8)))
    result = scipy.stats.ttest_1samp(diffs, 0.0)
    expected = int(np.sign(result.statistic)) if result.pvalue < 0.05 else 0
    assert paired_test(diffs) == expected


def test_trial_start_lines_with_and_without_a_host():
    host = "AMD EPYC, 2 cores, 24 GiB, no GPU; Python 3.11.7, torch 2.14.1"
    assert trial_start(f"ab_00001 2026-12-03T13:36:45 {host}") == ("ab_00001", "2026-12-03T13:36:45", host)
    assert trial_start("ab_00001 2026-12-03T12:21:06") == ("ab_00001", "2026-12-03T12:21:06", None)
    assert machine_type(f"{host}; 2026-12-03") == host


def _row(tag: str, seed: int) -> pd.DataFrame:
    return pd.DataFrame([{"tag": tag, "strategy": "gd", "seed": seed, "task": 0, "metric": "fid", "value": 1.0}])


def test_quality_results_folds_from_two_threads_keep_both_and_write_sorted(tmp_path):
    path = tmp_path / "quality.parquet"
    with quality_results(path) as results:  # read only: nothing written
        assert results.rows.empty
    assert not path.exists()

    def fold(tag: str, seed: int, hold_s: float) -> None:
        with quality_results(path) as results:
            rows = results.rows
            time.sleep(hold_s)  # the other fold waits for the lock instead of reading the same old rows
            results.rows = pd.concat([rows, _row(tag, seed)], ignore_index=True)

    first = threading.Thread(target=fold, args=("b", 69, 0.5))
    first.start()
    time.sleep(0.1)
    fold("a", 42, 0.0)
    first.join()
    written = pd.read_parquet(path)
    assert list(zip(written.tag, written.seed)) == [("a", 42), ("b", 69)]


def step_cost_verdict(extra_forwards: list[float]) -> str:
    """The claims table's step-cost verdict for seeds whose gd replay took ``extra_forwards`` teacher forwards
    (of 30 ms) more than gr's."""
    seeds = [
        {
            "seed": i,
            "gd_replay_s": 0.05 + 0.03 * f,
            "gr_replay_s": 0.05,
            "teacher_forward_s": 0.03,
            "gd_step_s": 0.25 + 0.03 * f,
            "gr_step_s": 0.25,
        }
        for i, f in enumerate(extra_forwards)
    ]
    cost = {"run": "test", "seeds": seeds, "machine": "a machine; 2026-12-03"}
    empty = pd.DataFrame(columns=["tag", "strategy", "seed", "task", "metric", "value", "machine"])
    (row,) = [line for line in claims(empty, "benchmark", None, cost) if "teacher forward per replay item" in line]
    return row.rstrip(" |").rsplit(" | ", 1)[1]


def test_the_step_cost_holds_only_when_significantly_between_half_and_one_and_a_half_forwards():
    assert step_cost_verdict([0.9, 1.0, 1.1, 1.05, 0.95]) == "holds"
    assert step_cost_verdict([2.9, 3.0, 3.1]) == "does not hold at this scale"
    assert step_cost_verdict([0.1, 0.2, 0.15]) == "does not hold at this scale"
    assert step_cost_verdict([0.2, 1.0, 1.9]) == "within noise"
    assert step_cost_verdict([1.0]) == "one seed: no verdict"
