"""The small actor between the driver and the run's Train workers (distcl.runtime.workers.WorkerGroup).

It never unpickles what it carries: an item is ``[ref]`` to the driver's ``(fn, config)`` in the object store
(a ref inside a list is not resolved), a result is rank 0's state as pickled bytes. So its process imports Ray
alone and starts in about a second; unpickling an item's function and tensors there imported torch, diffusers
and torch-fidelity (about 10 s of CPU per run).
"""

from __future__ import annotations

import asyncio
from typing import Optional

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class WorkChannel:
    """Items from the driver to the workers and rank 0's results back. ``next(after)`` waits for the newest item
    not yet finished whose number is above ``after`` (a restarted worker asks with -1: the item in progress)."""

    def __init__(self):
        self.items: list[tuple[int, str, list]] = []
        self.results: dict[int, bytes] = {}
        self.closed = False
        self.changed = asyncio.Condition()

    async def post(self, name: str, payload: list) -> int:
        async with self.changed:
            self.items.append((len(self.items), name, payload))
            self.changed.notify_all()
            return len(self.items) - 1

    async def next(self, after: int) -> Optional[tuple[int, str, list]]:
        def pending():
            return [item for item in self.items if item[0] > after and item[0] not in self.results]

        async with self.changed:
            await self.changed.wait_for(lambda: self.closed or pending())
            return None if self.closed else pending()[-1]

    async def finish(self, seq: int, state: bytes) -> None:
        async with self.changed:
            self.results[seq] = state
            self.changed.notify_all()

    async def result(self, seq: int) -> bytes:
        async with self.changed:
            await self.changed.wait_for(lambda: seq in self.results)
            return self.results[seq]

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()
