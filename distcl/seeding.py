"""Seeds as pure functions of their parts: every random draw of a run (class order, initialisation, data order,
noise, replay, evaluation samples) comes from a generator seeded by (run seed, what, task, index, ...), so it is
the same wherever and however often it is made."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, task, batch index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def noise_seed(seed: int, task: int, rank: int = 0) -> tuple:
    """Seed parts of worker ``rank``'s per-step (t, eps) draws in task ``task`` (the step is appended)."""
    return (seed, "noise", task, rank)
