"""What OUT keeps to evaluate every class seen so far once that class's data is gone (``distcl learn``): per
class, its test images (the class histogram's truth, FID's real side, the continual classifier's accuracy) and a
seeded reserve of at most ``eval.num_samples`` of its training images (the real-data floor draws from them). Every
run evaluates from these records, the one-command run as an appended one, so the two agree.

    OUT/eval_store/class_<label>.pt   {"label", "name", "test": uint8 [n, C, H, W], "train": uint8 [m, C, H, W]}

Both at the data's own size, as the scenario holds them (test images capped by ``data.test_per_class``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distcl.data import Scenario, Split, select
from distcl.seeding import seeded_generator

STORE = "eval_store"


def record_path(out: Path, label: int) -> Path:
    return Path(out) / STORE / f"class_{label}.pt"


def ensure_records(out: Path, scenario: Scenario, classes: list[int], seed: int, floor_size: int) -> None:
    """Write the record of each class in ``classes`` that has none, from the scenario's data: all its test images,
    and the training images at the first ``floor_size`` positions of a permutation seeded by (seed, "floor",
    label), kept in file order. A class whose record exists is not read (its data may be gone)."""
    for c in classes:
        path = record_path(out, c)
        if path.is_file():
            continue
        train = select(scenario.train, [c], None)
        pick = torch.randperm(len(train.labels), generator=seeded_generator(seed, "floor", c))[:floor_size]
        record = {
            "label": c,
            "name": scenario.class_names[c],
            "test": select(scenario.test, [c], None).images.clone(),
            "train": train.images[pick.sort().values].clone(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)


def _stacked(out: Path, classes: list[int], part: str) -> Split:
    records = [torch.load(record_path(out, c)) for c in classes]
    images = torch.cat([r[part] for r in records])
    labels = torch.cat([torch.full((len(r[part]),), r["label"], dtype=torch.long) for r in records])
    return Split(images, labels)


def test_split(out: Path, classes: list[int]) -> Split:
    """The test images of ``classes``, class after class in the given order."""
    return _stacked(out, classes, "test")


def floor_reference(out: Path, classes: list[int]) -> Split:
    """The floor's reserve of training images of ``classes``, class after class."""
    return _stacked(out, classes, "train")


def store_bytes(out: Path) -> dict[int, int]:
    """{label: bytes on disk} of OUT's records."""
    return {int(p.stem.split("_")[1]): p.stat().st_size for p in (Path(out) / STORE).glob("class_*.pt")}
