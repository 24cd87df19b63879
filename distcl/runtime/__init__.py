"""The Ray shell around the core: actors, Ray Train, Tune, cluster helpers.

Importing it sets two of Ray's defaults in the driver's environment (a value the user set is kept):
- ``RAY_DEDUP_LOGS_SKIP_REGEX`` keeps Ray's own bookkeeping lines out of the driver's console (they stay in
  Ray's log directory); it is read when ``ray`` is first imported, so it is set here, before any submodule
  imports Ray;
- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: Ray Train's controller polls its workers every 0.2 s instead of 2 s. A
  worker's report waits for that poll, so each work item (a task, a distillation unit) came back about 2 s
  after it ended, and closing the worker group took 5 s (0.2 s and 1.3 s now, measured here). Ray Train
  hands the driver's value on to its controller and workers, on a cluster joined as well.
"""
import os

RAY_INTERNAL_LINES = "|".join((
    r"PreemptionWatcher.*max_restarts",  # a core_worker notice of Ray Train's controller, once per Train run
    r"Setting up process group for",
    r"Reporting training result",
    r"Moving model to device",
    r"Started training worker group of size",
    r"- \(ip=[^)]*\) world_rank=",
))  # fmt: skip
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_INTERNAL_LINES)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
