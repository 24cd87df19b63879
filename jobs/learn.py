"""Learning after the run as a Ray job: the arguments of ``distcl learn`` (NEW's classes as OUT's next task).

    distcl learn runs/smoke --data-dir new_classes/                             # the same, without a job
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/learn.py /abs/runs/smoke --data-dir /abs/new_classes

Inside a job, RAY_ADDRESS points at the cluster, so the append joins it instead of starting a local one; OUT and
NEW are paths the job's driver can read (relative ones are taken in the job's own working directory).
"""

import sys

from distcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["learn", *sys.argv[1:]]))
