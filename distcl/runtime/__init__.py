"""The Ray shell around the core: actors, Ray Train, Tune, cluster helpers.

Importing it keeps Ray's own bookkeeping lines out of the driver's console (they stay in Ray's log directory):
``RAY_DEDUP_LOGS_SKIP_REGEX`` is read when ``ray`` is first imported, so it is set here, before any submodule
imports Ray; a value the user set is kept.
"""

import os

RAY_INTERNAL_LINES = "|".join(
    (
        r"PreemptionWatcher.*max_restarts",  # a core_worker notice of Ray Train's controller, once per Train run
        r"Setting up process group for",
        r"Reporting training result",
        r"Moving model to device",
        r"Started training worker group of size",
        r"- \(ip=[^)]*\) world_rank=",
    )
)
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_INTERNAL_LINES)
