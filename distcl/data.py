"""The images a run learns, task by task: read a source (Fashion-MNIST, MNIST: IDX files; CIFAR-10/100: the python
pickle batches, a directory or the .tar.gz; an image folder: one subfolder per class), build the class-incremental
tasks, and stream a task's batches (sharded over workers, seeded).

Images are uint8 [N, C, H, W] with the run's channels (``data.channels``: 1 or 3); an image folder's images are
resized and center-cropped to the model's sample size when read, the standard sets keep their own size.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from distcl.seeding import seeded_generator
from distcl.settings import ConfigError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IdxSource:
    """An MNIST-format source: four gzipped IDX files, {stem: (md5 of the .gz, item count, dims after it)}."""

    url: str
    files: dict[str, tuple[str, int, tuple[int, ...]]]
    class_names: tuple[str, ...]
    system_dir: Optional[Path] = None  # where a system package installs it


def _idx_files(md5s: tuple[str, str, str, str]) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    counts = {
        "train-images-idx3-ubyte": (60000, (28, 28)),
        "train-labels-idx1-ubyte": (60000, ()),
        "t10k-images-idx3-ubyte": (10000, (28, 28)),
        "t10k-labels-idx1-ubyte": (10000, ()),
    }
    return {stem: (md5, *counts[stem]) for stem, md5 in zip(counts, md5s)}


IDX_SOURCES = {
    "fashion_mnist": IdxSource(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        _idx_files(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )
        ),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        DEBIAN_DIR,
    ),
    "mnist": IdxSource(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        _idx_files(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            )
        ),
        tuple(str(d) for d in range(10)),
    ),
}
FILES = IDX_SOURCES["fashion_mnist"].files


@dataclass(frozen=True)
class CifarSource:
    """The python version of CIFAR: pickled batches in ``folder`` (or inside ``archive``)."""

    archive: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_SOURCES = {
    "cifar10": CifarSource(
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": CifarSource(
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(RuntimeError):
    """The data set is missing, truncated or corrupt; the message names the file and the fault."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass
class Files:
    """Image files and their labels, in order: a training split that streams from its files (``data.stream``)."""

    paths: list[str]
    labels: torch.Tensor  # int64 [N]

    def select(self, classes: tuple[int, ...] | list[int], per_class: Optional[int] = None) -> Files:
        """As :func:`select`: the files of ``classes`` (the first ``per_class`` of each), in order."""
        idx = _class_positions(self.labels, classes, per_class)
        return Files([self.paths[i] for i in idx.tolist()], self.labels[idx])

    def sample_per_class(self, n: int) -> Files:
        """At most ``n`` files per class, drawn by a generator seeded by the class label; in order."""
        keep = []
        for c in self.labels.unique().tolist():
            idx = torch.nonzero(self.labels == c).flatten()
            keep.append(idx[torch.randperm(len(idx), generator=seeded_generator("driver_sample", c))[:n]])
        idx = torch.cat(keep).sort().values
        return Files([self.paths[i] for i in idx.tolist()], self.labels[idx])


@dataclass
class Dataset:
    """A source's two splits and its class names (label c is ``class_names[c]``). With ``train_files`` (a
    streamed image folder) ``train`` holds only the driver's sample of them (``data.driver_per_class`` a class:
    the evaluation network's data and the real-data floor's); the students' images stream from the files."""

    source: str
    train: Split
    test: Split
    class_names: list[str]
    train_files: Optional[Files] = None

    def fingerprint(self) -> str:
        """A short hash of the images and labels: what a cached network trained on them is named by."""
        digest = hashlib.sha256(self.source.encode())
        for split in (self.train, self.test):
            digest.update(str(tuple(split.images.shape)).encode())
            digest.update(split.images.numpy().tobytes())
            digest.update(split.labels.numpy().tobytes())
        return digest.hexdigest()[:16]

    def with_channels(self, channels: int) -> Dataset:
        return Dataset(
            self.source,
            *(Split(to_channels(s.images, channels), s.labels) for s in (self.train, self.test)),
            self.class_names,
            self.train_files,
        )


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] with ``channels`` channels: gray repeated to RGB, RGB to luma (ITU-R 601, as PIL's "L")."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((images.int() * weights).sum(1, keepdim=True) // 1000).to(torch.uint8)


def cache_dir(explicit: Optional[str] = None) -> Path:
    """``explicit``, else ``$DISTCL_CACHE``, else ``~/.cache/distcl``."""
    return Path(explicit or os.environ.get("DISTCL_CACHE") or Path.home() / ".cache" / "distcl")


def candidate_dirs(
    data_dir: Optional[str] = None, cache: Optional[str] = None, source: str = "fashion_mnist"
) -> list[Path]:
    """Where a source's files are looked for, in order: --data-dir, $DISTCL_DATA, a system package, the cache."""
    system = IDX_SOURCES[source].system_dir if source in IDX_SOURCES else None
    dirs = [data_dir, os.environ.get("DISTCL_DATA"), system, cache_dir(cache) / source.replace("_", "-")]
    return [Path(d) for d in dirs if d]


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_source(directory: Path, source: str) -> bool:
    if source in IDX_SOURCES:
        return all(_find_file(directory, stem) for stem in IDX_SOURCES[source].files)
    cifar = CIFAR_SOURCES[source]
    return (
        (directory / cifar.archive).is_file()
        or (directory / cifar.folder / cifar.meta).is_file()
        or (directory / cifar.meta).is_file()
    )


def locate(
    data_dir: Optional[str] = None, cache: Optional[str] = None, download: bool = True, source: str = "fashion_mnist"
) -> Path:
    """The first directory holding the source's files; else download them into the cache (checksums verified)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist")
    searched = candidate_dirs(data_dir, cache, source)
    for directory in searched:
        if _has_source(directory, source):
            return directory
    target = searched[-1]
    if not download:
        raise DataError(f"{source} not found in {', '.join(map(str, searched))}")
    try:
        if source in IDX_SOURCES:
            idx = IDX_SOURCES[source]
            for stem, (md5, _, _) in idx.files.items():
                if _find_file(target, stem) is None:
                    download_file(idx.url + stem + ".gz", target / (stem + ".gz"), md5)
        else:
            cifar = CIFAR_SOURCES[source]
            download_file(CIFAR_URL + cifar.archive, target / cifar.archive, cifar.md5)
    except OSError as err:
        hint = " (Debian: apt-get install dataset-fashion-mnist)" if source == "fashion_mnist" else ""
        raise DataError(
            f"{source} not found in {', '.join(map(str, searched))} and the download failed ({err}); "
            f"install it{hint} or pass --data-dir"
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


def read_idx_source(directory: Path, source: str = "fashion_mnist") -> Dataset:
    """An IDX source's splits: uint8 [N, 1, 28, 28] images, int64 labels in 0..9."""
    idx = IDX_SOURCES[source]
    arrays = {}
    for stem, (_, count, dims) in idx.files.items():
        path = _find_file(directory, stem)
        if path is None:
            raise DataError(f"{directory / stem}(.gz): missing")
        arrays[stem] = read_idx(path, count, dims)
    splits = []
    for prefix in ("train", "t10k"):
        labels = arrays[f"{prefix}-labels-idx1-ubyte"]
        if labels.max() > 9:
            raise DataError(f"{directory / (prefix + '-labels-idx1-ubyte')}: label {labels.max()} out of range 0..9")
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()).unsqueeze(1)
        splits.append(Split(images, torch.from_numpy(labels.astype(np.int64))))
    return Dataset(source, *splits, list(idx.class_names))


def read_cifar(directory: Path, source: str) -> Dataset:
    """CIFAR-10/100's python batches from ``directory``: the .tar.gz, its extracted folder, or the batch files."""
    cifar = CIFAR_SOURCES[source]
    archive = directory / cifar.archive
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                names = (*cifar.train, cifar.test, cifar.meta)
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"{archive}: no {', '.join(missing)} inside")
                blobs = {n: tar.extractfile(members[n]).read() for n in names}
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{archive}: cannot be read ({err})") from None
    else:
        folder = directory / cifar.folder if (directory / cifar.folder).is_dir() else directory
        blobs = {}
        for name in (*cifar.train, cifar.test, cifar.meta):
            if not (folder / name).is_file():
                raise DataError(f"{folder / name}: missing")
            blobs[name] = (folder / name).read_bytes()

    def unpickle(name: str) -> dict:
        try:
            return pickle.load(io.BytesIO(blobs[name]), encoding="bytes")
        except Exception as err:  # noqa: BLE001 - any unpickling fault is a corrupt file
            raise DataError(f"{source} batch {name!r}: not a CIFAR python batch ({err})") from None

    def split(names: tuple[str, ...]) -> Split:
        batches = [unpickle(n) for n in names]
        try:
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[cifar.labels_key], dtype=np.int64) for b in batches])
        except KeyError as err:
            raise DataError(f"{source} batches {names}: no {err} entry") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(f"{source} batches {names}: data of shape {data.shape}, expected [N, 3072]")
        return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))

    names = [n.decode() for n in unpickle(cifar.meta)[cifar.names_key]]
    return Dataset(source, split(cifar.train), split((cifar.test,)), names)


def list_image_folder(directory: Path, test_fraction: float) -> tuple[list[str], Files, Files]:
    """One subfolder per class (sorted names are the labels), or ``train/`` and ``test/`` holding such folders;
    without them each class's images (sorted by name) are split by a seeded draw, ``test_fraction`` held out.
    Returns the class names and the train and test files (absolute paths); nothing is decoded."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise ConfigError("data.data_dir", f"{directory} is not a directory (image_folder needs one)")
    roots = {"train": directory / "train", "test": directory / "test"}
    if not all(p.is_dir() for p in roots.values()):
        roots = {"all": directory}
    classes = sorted(p.name for p in roots[next(iter(roots))].iterdir() if p.is_dir())
    if not classes:
        raise ConfigError("data.data_dir", f"{directory} holds no class folders (allowed: one subfolder per class)")
    files: dict[str, list[list[Path]]] = {}
    for split, root in roots.items():
        files[split] = []
        for name in classes:
            found = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(
                    "data.data_dir",
                    f"class folder {root / name} holds no images (allowed: {', '.join(IMAGE_SUFFIXES)})",
                )
            files[split].append(found)
    if "all" in files:
        files = _hold_out(files["all"], classes, test_fraction)
    train, test = (
        Files(
            [str(p) for group in files[s] for p in group],
            torch.tensor([c for c, group in enumerate(files[s]) for _ in group], dtype=torch.int64),
        )
        for s in ("train", "test")
    )
    return classes, train, test


def read_image_folder(
    directory: Path, channels: int, size: int, test_fraction: float, stream_sample: Optional[int] = None
) -> Dataset:
    """The folder's images (:func:`list_image_folder`) in L or RGB, resized (shorter side = ``size``) and
    center-cropped. With ``stream_sample`` the training images stay files (``Dataset.train_files``) but for a
    sample of at most that many a class, read here."""
    classes, train, test = list_image_folder(directory, test_fraction)
    read = train if stream_sample is None else train.sample_per_class(stream_sample)
    return Dataset(
        "image_folder",
        read_files(read, channels, size),
        read_files(test, channels, size),
        classes,
        train_files=None if stream_sample is None else train,
    )


def read_files(files: Files, channels: int, size: int) -> Split:
    return Split(torch.stack([read_image(p, channels, size) for p in files.paths]), files.labels)


def _hold_out(per_class: list[list[Path]], classes: list[str], fraction: float) -> dict[str, list[list[Path]]]:
    """Per class: a permutation seeded by the class name, its first round(fraction n) (at least 1) for test."""
    out: dict[str, list[list[Path]]] = {"train": [], "test": []}
    for name, paths in zip(classes, per_class):
        if len(paths) < 2:
            raise ConfigError(
                "data.data_dir",
                f"class {name!r} has {len(paths)} image (allowed: at least 2, one "
                "to hold out for testing; or train/ and test/ folders)",
            )
        order = torch.randperm(len(paths), generator=seeded_generator("image_folder_test", name)).tolist()
        n_test = min(len(paths) - 1, max(1, round(fraction * len(paths))))  # at least one of each
        out["test"].append(sorted(paths[i] for i in order[:n_test]))
        out["train"].append(sorted(paths[i] for i in order[n_test:]))
    return out


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer and float images scaled to 8 bits by their own range (PIL's convert clips them)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image.copy()
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    return Image.fromarray((array.clip(0, top) / top * 255).round().astype(np.uint8), mode="L")


def read_image(path: Path | str, channels: int, size: int) -> torch.Tensor:
    """uint8 [C, size, size]: ``path`` in L or RGB, shorter side resized to ``size`` (antialiased), center crop."""
    try:
        with Image.open(path) as opened:
            image = _to_8bit(ImageOps.exif_transpose(opened))  # a photo's EXIF orientation applied
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError("data.data_dir", f"{path} is not a readable image ({err})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparency over white
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(array.reshape(size, size, channels).copy()).permute(2, 0, 1)


def load_dataset(data_cfg, cache: Optional[str], size: int) -> Dataset:
    """``data.source`` read from ``data.data_dir`` or the places it is searched (a standard set is downloaded with
    checksums where it is missing and a network exists), with ``data.channels``; an image folder at ``size``."""
    if data_cfg.source == "image_folder":
        if data_cfg.data_dir is None:
            raise ConfigError("data.data_dir", "null (image_folder needs the folder: --data-dir DIR)")
        return read_image_folder(
            Path(data_cfg.data_dir),
            data_cfg.image_channels,
            size,
            data_cfg.test_fraction,
            data_cfg.driver_per_class if data_cfg.stream else None,
        )
    directory = locate(data_cfg.data_dir, cache, source=data_cfg.source)
    if data_cfg.source in IDX_SOURCES:
        dataset = read_idx_source(directory, data_cfg.source)
    else:
        dataset = read_cifar(directory, data_cfg.source)
    return dataset.with_channels(data_cfg.image_channels)


def class_order(seed: int, explicit: Optional[list[int]] = None, num_classes: int = 10) -> list[int]:
    """The reference's order: ``torch.manual_seed(seed); torch.randperm(C)``, without touching global RNG state."""
    if explicit is not None:
        return list(explicit)
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def task_classes(order: list[int], num_tasks: int, classes_per_task: int) -> list[tuple[int, ...]]:
    return [tuple(order[k * classes_per_task : (k + 1) * classes_per_task]) for k in range(num_tasks)]


def to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, C, size, size] in [-1, 1], resized with antialiasing."""
    x = images.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x * 2 - 1


def _class_positions(labels: torch.Tensor, classes: tuple[int, ...] | list[int], per_class: Optional[int]):
    """Sorted positions of the items of ``classes``, the first ``per_class`` of each when capped."""
    keep = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx if per_class is None else idx[:per_class])
    return torch.cat(keep).sort().values


def select(split: Split, classes: tuple[int, ...] | list[int], per_class: Optional[int]) -> Split:
    """The items of ``classes``, the first ``per_class`` of each (file order) when capped."""
    idx = _class_positions(split.labels, classes, per_class)
    return Split(split.images[idx], split.labels[idx])


@dataclass
class Scenario:
    """Class-incremental learning: task k holds the classes ``tasks[k]``; images in model range. With
    ``train_files`` (a streamed folder) the tasks' training images are those files and ``train`` the driver's
    sample of them."""

    tasks: list[tuple[int, ...]]
    train: Split
    test: Split
    sample_size: int
    class_names: list[str]
    train_files: Optional[Files] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_images(self, k: int, joint: bool = False) -> torch.Tensor | Files:
        """Task k's training images (all tasks 0..k for joint training), float [N, C, S, S] in [-1, 1]; a
        streamed folder's: their files (read where they are trained on)."""
        if self.train_files is not None:
            return self.train_files.select(self.seen_classes(k) if joint else list(self.tasks[k]))
        return to_model_range(self._train_split(k, joint).images, self.sample_size)

    def train_labels(self, k: int, joint: bool = False) -> torch.Tensor:
        """The labels of ``train_images(k, joint)``, in the same order."""
        return self._train_split(k, joint).labels

    def _train_split(self, k: int, joint: bool) -> Split:
        return select(self.train, self.seen_classes(k) if joint else list(self.tasks[k]), None)

    def seen_classes(self, k: int) -> list[int]:
        return [c for j in range(k + 1) for c in self.tasks[j]]

    def test_split(self, k: int) -> Split:
        """Test items of every class seen up to task k (uint8, the data's own size)."""
        return select(self.test, self.seen_classes(k), None)

    def task_names(self, k: int) -> list[str]:
        return [self.class_names[c] for c in self.tasks[k]]

    def describe(self) -> str:
        """The tasks' classes by name, task after task: "Pullover, Shirt | Trouser, Bag | ..."."""
        return " | ".join(", ".join(self.task_names(k)) for k in range(len(self.tasks)))


def resolve_tasks(data_cfg, seed: int, class_names: list[str]) -> list[tuple[int, ...]]:
    """``data.tasks`` with class names turned into labels, else ``num_tasks`` x ``classes_per_task`` classes of
    the seeded order; every class known and in at most one task (ConfigError naming the field otherwise)."""
    n = len(class_names)
    if data_cfg.tasks is not None:
        tasks = []
        for group in data_cfg.tasks:
            labels = []
            for ref in group:
                if not (ref in class_names if isinstance(ref, str) else 0 <= ref < n):
                    shown = ", ".join(class_names) if n <= 20 else f"0..{n - 1} or a class name"
                    raise ConfigError(
                        "data.tasks", f"class {ref!r} does not exist in {data_cfg.source} (allowed: {shown})"
                    )
                labels.append(class_names.index(ref) if isinstance(ref, str) else ref)
            tasks.append(tuple(labels))
        used = [c for t in tasks for c in t]
        if len(set(used)) != len(used):
            raise ConfigError(
                "data.tasks",
                f"{data_cfg.tasks}: a class is in more than one task (by index and by name; allowed: disjoint groups)",
            )
        return tasks
    needed = data_cfg.num_tasks * data_cfg.classes_per_task
    if needed > n:
        raise ConfigError(
            "data.num_tasks",
            f"{data_cfg.num_tasks} tasks x {data_cfg.classes_per_task} classes "
            f"exceeds the {n} classes of {data_cfg.source}",
        )
    order = class_order(seed, data_cfg.class_order, n)
    if len(order) < needed or any(c >= n for c in order):
        raise ConfigError(
            "data.class_order",
            f"{order} (allowed: distinct labels in 0..{n - 1}, at least "
            f"num_tasks x classes_per_task = {needed} of them)",
        )
    return task_classes(order, data_cfg.num_tasks, data_cfg.classes_per_task)


def build_scenario(dataset: Dataset, data_cfg, seed: int, sample_size: int) -> Scenario:
    """The tasks of ``data_cfg`` over the loaded dataset, with the per-class caps applied."""
    tasks = resolve_tasks(data_cfg, seed, dataset.class_names)
    used = [c for t in tasks for c in t]
    files = dataset.train_files
    return Scenario(
        tasks=tasks,
        train=select(dataset.train, used, data_cfg.train_per_class),
        test=select(dataset.test, used, data_cfg.test_per_class),
        sample_size=sample_size,
        class_names=dataset.class_names,
        train_files=files.select(used, data_cfg.train_per_class) if files is not None else None,
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
