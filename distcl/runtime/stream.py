"""A streamed image folder (``data.stream``) on Ray Data: each task's training files become a Dataset, given to
the run's Train workers (``TorchTrainer(datasets=...)``) and read there through ``ray.train.get_dataset_shard``,
decoded in Ray Data's tasks with the in-memory path's reader, so that no process holds the folder.

Order: the files in blocks of ``BLOCK_ROWS``, the block order shuffled by a generator seeded by (seed, task), kept
by the executor (``preserve_order``); each worker's shard shuffled within a buffer of ``SHUFFLE_BATCHES`` batches
seeded by (seed, task, rank, epoch). With one Train worker the same seed gives the same batches, also after a
resume, which reads its epoch again up to the checkpoint's step. With several, Ray Data hands the blocks to the
workers as they ask for them (``streaming_split``): which worker trains on which image is not reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import ray.data
import torch
from ray.data import ExecutionOptions

from distcl.data import Files, read_image, to_model_range
from distcl.seeding import derive_seed

BLOCK_ROWS = 64  # files per block: the unit of the block shuffle and of one decoding task
SHUFFLE_BATCHES = 16  # a worker's shuffle buffer, in batches


def dataset_name(task: int) -> str:
    return f"task_{task}"


def ingest_options() -> ExecutionOptions:
    """What the Train workers' shards run with: the order kept (the seeded shuffles above are the only ones)."""
    return ExecutionOptions(preserve_order=True)


def decode(batch: dict[str, np.ndarray], channels: int, size: int) -> dict[str, np.ndarray]:
    """A block of files to uint8 [B, C, size, size] (distcl.data.read_image: the in-memory path's pixels)."""
    return {"image": np.stack([read_image(p, channels, size).numpy() for p in batch["path"]])}


def task_dataset(files: Files, channels: int, size: int, seed: int, task: int, cpus: float) -> ray.data.Dataset:
    """Task ``task``'s training files as a lazy Dataset of images; its decoding tasks ask for ``cpus`` each."""
    blocks = max(1, math.ceil(len(files.paths) / BLOCK_ROWS))
    dataset = ray.data.from_items([{"path": p} for p in files.paths], override_num_blocks=blocks)
    dataset = dataset.randomize_block_order(seed=derive_seed(seed, "stream_blocks", task) % 2**32)
    dataset = dataset.map_batches(
        decode, fn_kwargs={"channels": channels, "size": size}, batch_size=None, batch_format="numpy", num_cpus=cpus
    )
    dataset.context.enable_progress_bars = False  # the Train worker's lines report progress
    dataset.context.print_on_execution_start = False
    return dataset


class ShardStream:
    """Worker ``rank``'s batches of a streamed task, as distcl.data.DataStream's: ``batch(step)`` in model range.
    Epoch e is one pass over the worker's shard (``count // world`` images, the short last batch dropped); every
    worker starts its passes at the same steps (streaming_split starts an epoch when all its shards ask)."""

    def __init__(self, shard, count: int, batch_size: int, size: int, seed: int, task: int, rank: int, world: int):
        self.shard, self.size = shard, size
        n = count // world
        self.batch_size = min(batch_size, n)
        self.per_epoch = n // self.batch_size
        self.seed_parts = (seed, "stream_shuffle", task, rank)
        self._at, self._batches = None, iter(())  # (epoch, index) of the next batch of the current pass

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if self._at != (epoch, i):  # the next epoch, or a resumed step: a new pass, read up to the step
            self._batches = iter(
                self.shard.iter_torch_batches(
                    batch_size=self.batch_size,
                    drop_last=True,
                    local_shuffle_buffer_size=self.batch_size * SHUFFLE_BATCHES,
                    local_shuffle_seed=derive_seed(*self.seed_parts, epoch) % 2**32,
                )
            )
            for _ in range(i):
                next(self._batches, None)
        images = next(self._batches, None)
        if images is None:
            raise RuntimeError(f"the streamed shard ended at batch {i} of {self.per_epoch} (epoch {epoch})")
        self._at = (epoch, i + 1)
        return to_model_range(images["image"], self.size)
