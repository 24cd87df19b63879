"""What MLflow tracking costs a run, and that without it nothing of MLflow is loaded: short inline smoke runs (2
tasks x 5 steps, 40 evaluation samples) through the CLI, without and with ``--mlflow`` (a fresh local sqlite
store each time), taking turns, each in a new process; its wall time and the mlflow modules it imported.

    git worktree add /tmp/before f200501                            # distcl before tracking existed
    python -m benchmarks.tracking --rounds 3 --before /tmp/before   # results/tracking.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, machine

RUN = ["--preset", "smoke", "--inline", "--no-progress"]
RUN += [
    a for o in ("data.num_tasks=2", "train.max_steps=5", "eval.num_samples=40", "eval.steps=2") for a in ("--set", o)
]
PROBE = (
    "import sys, time; began = time.perf_counter(); from distcl.cli import main; "
    "code = main(sys.argv[1:]); wall = time.perf_counter() - began; "
    "print('RESULT', wall, sum(m.split('.')[0] == 'mlflow' for m in sys.modules)); sys.exit(code)"
)


def one_run(tracked: bool, code: Path = REPO) -> tuple[float, int]:
    """(wall seconds of main(), mlflow modules imported) of one run in a new process, of the distcl in ``code``."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*RUN, "--out", f"{tmp}/run", *(["--mlflow", f"sqlite:///{tmp}/mlflow.db"] if tracked else [])]
        done = subprocess.run([sys.executable, "-c", PROBE, "run", *args], capture_output=True, text=True, cwd=code)
        assert done.returncode == 0, done.stderr[-2000:]
        _, wall, modules = next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()
        return float(wall), int(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout of distcl before tracking: its run, taking turns")
    args = parser.parse_args()
    runs = {"off": [], "on": [], **({"before": []} if args.before else {})}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(one_run(name == "on", args.before if name == "before" else REPO))
    result = {
        "machine": machine(),
        "what": "inline smoke run, 2 tasks x 5 steps, 40 evaluation samples; wall time of distcl.cli.main "
        "(off / on: --mlflow; before: the distcl of --before)",
        "wall_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
        "median_wall_s": {k: round(statistics.median(w for w, _ in v), 2) for k, v in runs.items()},
        "mlflow_modules_imported": {k: max(m for _, m in v) for k, v in runs.items()},
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracking.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
