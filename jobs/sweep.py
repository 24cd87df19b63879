"""A Ray Tune sweep as a Ray job: the arguments of ``distcl tune``.

    distcl tune tuning/quick.yaml --out runs/sweeps/quick                        # the same, without a job
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py tuning/quick.yaml --out /shared/sweeps/quick

Inside a job, RAY_ADDRESS points at the cluster, so the sweep's trials run on it.
"""

import sys

from distcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
