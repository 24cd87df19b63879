"""Fast-sampling distillation as a Ray job: the arguments of ``distcl distill``.

    distcl distill pid --teacher runs/cpu/task_4 --out runs/pid                  # the same, without a job
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/distill.py pid --teacher /abs/runs/cpu/task_4 --out /abs/runs/pid --workers 2

Inside a job, RAY_ADDRESS points at the cluster, so the Train workers run there.
"""

import sys

from distcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
