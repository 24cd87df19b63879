"""Fashion-MNIST: locate, verify or download the IDX files, read them, build the class-incremental tasks, and stream
a task's batches (sharded over workers, seeded)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from distcl.seeding import seeded_generator

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# file stem -> (md5 of the official .gz, expected item count, IDX dimensions after the count)
FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", 60000, (28, 28)),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", 60000, ()),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", 10000, (28, 28)),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", 10000, ()),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
    """The data set is missing, truncated or corrupt; the message names the file and the fault."""


def cache_dir(explicit: Optional[str] = None) -> Path:
    """``explicit``, else ``$DISTCL_CACHE``, else ``~/.cache/distcl``."""
    return Path(explicit or os.environ.get("DISTCL_CACHE") or Path.home() / ".cache" / "distcl")


def candidate_dirs(data_dir: Optional[str] = None, cache: Optional[str] = None) -> list[Path]:
    """Where the IDX files are looked for, in order: --data-dir, $DISTCL_DATA, the Debian package, the cache."""
    dirs = [data_dir, os.environ.get("DISTCL_DATA"), DEBIAN_DIR, cache_dir(cache) / "fashion-mnist"]
    return [Path(d) for d in dirs if d]


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(data_dir: Optional[str] = None, cache: Optional[str] = None, download: bool = True) -> Path:
    """The first directory holding all four files; else download into the cache dir (checksums verified)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist")
    searched = candidate_dirs(data_dir, cache)
    for directory in searched:
        if all(_find_file(directory, stem) for stem in FILES):
            return directory
    target = searched[-1]
    if not download:
        raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, searched))}")
    try:
        for stem, (md5, _, _) in FILES.items():
            if _find_file(target, stem) is None:
                download_file(DOWNLOAD_URL + stem + ".gz", target / (stem + ".gz"), md5)
    except OSError as err:
        raise DataError(
            f"Fashion-MNIST not found in {', '.join(map(str, searched))} and the download failed ({err}); "
            "install it (Debian: apt-get install dataset-fashion-mnist) or pass --data-dir"
        ) from None
    return target


def download_file(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file; keep it only when its MD5 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, tmp)
    digest = hashlib.md5(Path(tmp.name).read_bytes()).hexdigest()
    if digest != md5:
        os.unlink(tmp.name)
        raise DataError(f"{url}: checksum mismatch (md5 {digest}, expected {md5})")
    os.replace(tmp.name, dest)


def read_idx(path: Path, count: int, dims: tuple[int, ...]) -> np.ndarray:
    """Read one IDX file (gz or raw) of unsigned bytes, checking magic number, count, shape and length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    ndim = len(dims) + 1
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    zero, dtype_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or file_ndim != ndim:
        raise DataError(
            f"{path}: bad magic number {raw[:4].hex()} (expected 0000 08 {ndim:02x}: unsigned bytes, {ndim} dimensions)"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    if shape != (count, *dims):
        raise DataError(f"{path}: shape {shape}, expected {(count, *dims)}")
    body = raw[4 + 4 * ndim :]
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise DataError(f"{path}: {len(body)} data bytes, expected {expected} (truncated or padded file)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]


def load_fashion_mnist(directory: Path) -> dict[str, Split]:
    """Both splits as uint8 images and int64 labels in 0..9."""
    arrays = {}
    for stem, (_, count, dims) in FILES.items():
        path = _find_file(directory, stem)
        if path is None:
            raise DataError(f"{directory / stem}(.gz): missing")
        arrays[stem] = read_idx(path, count, dims)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = arrays[f"{prefix}-labels-idx1-ubyte"]
        if labels.max() > 9:
            raise DataError(f"{directory / (prefix + '-labels-idx1-ubyte')}: label {labels.max()} out of range 0..9")
        splits[split] = Split(
            torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()), torch.from_numpy(labels.astype(np.int64))
        )
    return splits


def class_order(seed: int, explicit: Optional[list[int]] = None) -> list[int]:
    """The reference's order: ``torch.manual_seed(seed); torch.randperm(10)``, without touching global RNG state."""
    if explicit is not None:
        return list(explicit)
    return torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist()


def task_classes(order: list[int], num_tasks: int, classes_per_task: int) -> list[tuple[int, ...]]:
    return [tuple(order[k * classes_per_task : (k + 1) * classes_per_task]) for k in range(num_tasks)]


def to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, size, size] in [-1, 1], resized with antialiasing."""
    x = images.unsqueeze(1).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x * 2 - 1


def select(split: Split, classes: tuple[int, ...] | list[int], per_class: Optional[int]) -> Split:
    """The items of ``classes``, the first ``per_class`` of each (file order) when capped."""
    keep = []
    for c in classes:
        idx = torch.nonzero(split.labels == c).flatten()
        keep.append(idx if per_class is None else idx[:per_class])
    idx = torch.cat(keep).sort().values
    return Split(split.images[idx], split.labels[idx])


@dataclass
class Scenario:
    """Class-incremental Split Fashion-MNIST: task k holds ``tasks[k]``; images in model range."""

    tasks: list[tuple[int, ...]]
    train: Split
    test: Split
    sample_size: int

    def train_images(self, k: int, joint: bool = False) -> torch.Tensor:
        """Task k's training images (all tasks 0..k for joint training), float [N, 1, S, S] in [-1, 1]."""
        return to_model_range(self._train_split(k, joint).images, self.sample_size)

    def train_labels(self, k: int, joint: bool = False) -> torch.Tensor:
        """The labels of ``train_images(k, joint)``, in the same order."""
        return self._train_split(k, joint).labels

    def _train_split(self, k: int, joint: bool) -> Split:
        return select(self.train, self.seen_classes(k) if joint else list(self.tasks[k]), None)

    def seen_classes(self, k: int) -> list[int]:
        return [c for j in range(k + 1) for c in self.tasks[j]]

    def test_split(self, k: int) -> Split:
        """Test items of every class seen up to task k (uint8, 28x28)."""
        return select(self.test, self.seen_classes(k), None)


def build_scenario(splits: dict[str, Split], data_cfg, seed: int, sample_size: int) -> Scenario:
    """The tasks of ``data_cfg`` over the loaded splits, with the per-class caps applied."""
    order = class_order(seed, data_cfg.class_order)
    tasks = task_classes(order, data_cfg.num_tasks, data_cfg.classes_per_task)
    used = [c for t in tasks for c in t]
    return Scenario(
        tasks=tasks,
        train=select(splits["train"], used, data_cfg.train_per_class),
        test=select(splits["test"], used, data_cfg.test_per_class),
        sample_size=sample_size,
    )


class DataStream:
    """Worker ``rank`` of ``world`` reads the shard images[rank::world]; its batch at step s is a pure function of
    (seed, task, rank, world, s): epoch e = s // batches_per_epoch shuffles the shard with generator
    (seed, "data", task, rank, world, e). A resumed run therefore sees exactly the batches it would have seen."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, task: int, rank: int = 0, world: int = 1):
        self.images = images[rank::world]
        n = self.images.shape[0]
        self.batch_size = min(batch_size, n)
        self.per_epoch = n // self.batch_size  # the short last batch of an epoch is dropped
        self.seed_parts = (seed, "data", task, rank, world)
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """Positions in the shard of the batch at ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.images.shape[0], generator=seeded_generator(*self.seed_parts, epoch))
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        return self.images[self.indices(step)]
