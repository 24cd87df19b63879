"""Continual training as a Ray job: the arguments of ``distcl run``.

    distcl run --preset smoke --out runs/smoke                                  # the same, without a job
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_cl.py --preset smoke --out /tmp/distcl-smoke

Inside a job, RAY_ADDRESS points at the cluster, so the run joins it instead of starting a local one.
"""

import sys

from distcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
