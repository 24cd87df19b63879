"""The user's own images: each source read from fixtures written here in its real format (IDX, CIFAR's python
pickle batches as a folder and as the .tar.gz, image folders of PNG/JPEG in any mode and size), any task split,
RGB end to end (a Ray smoke run on an RGB folder whose checkpoints DDIMPipeline samples), one-line errors."""

import gzip
import io
import json
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMPipeline
from PIL import Image

from distcl.cli import main
from distcl.config import DataConfig, load_config
from distcl.data import IDX_SOURCES, build_scenario, load_dataset, read_cifar, read_idx_source, to_channels
from distcl.settings import ConfigError
from tests.image_data import COLOURS, write_folder


def write_idx(directory: Path, source: str) -> None:
    """The four gzipped IDX files of ``source`` at their official counts: image i is all (i % 10) * 25."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, (_, count, dims) in IDX_SOURCES[source].files.items():
        labels = np.arange(count, dtype=np.uint8) % 10
        body = (np.repeat(labels, 28 * 28) * 25).astype(np.uint8).tobytes() if dims else labels.tobytes()
        header = struct.pack(">HBB", 0, 8, len(dims) + 1) + struct.pack(f">{len(dims) + 1}I", count, *dims)
        with gzip.open(directory / f"{stem}.gz", "wb", compresslevel=1) as fh:
            fh.write(header + body)


def cifar_batch(n: int, labels_key: bytes, offset: int) -> bytes:
    """A pickled CIFAR batch of n images: image i is one colour, label (i + offset) % 10."""
    labels = [(i + offset) % 10 for i in range(n)]
    data = np.stack([np.full(3072, 20 * label, dtype=np.uint8) for label in labels])
    return pickle.dumps({b"data": data, labels_key: labels, b"batch_label": b"fixture"})


def write_cifar10(directory: Path, as_archive: bool) -> None:
    """CIFAR-10's python version (5 training batches, test_batch, batches.meta), extracted or as the .tar.gz."""
    files = {f"data_batch_{i}": cifar_batch(20, b"labels", i) for i in range(1, 6)}
    files["test_batch"] = cifar_batch(30, b"labels", 0)
    files["batches.meta"] = pickle.dumps({b"label_names": [f"class{c}".encode() for c in range(10)]})
    directory.mkdir(parents=True, exist_ok=True)
    if as_archive:
        with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (directory / "cifar-10-batches-py").mkdir()
        for name, blob in files.items():
            (directory / "cifar-10-batches-py" / name).write_bytes(blob)


def test_idx_sources_read_their_official_layout(tmp_path):
    write_idx(tmp_path / "mnist", "mnist")
    mnist = read_idx_source(tmp_path / "mnist", "mnist")
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.test.images.shape == (10000, 1, 28, 28)
    assert mnist.class_names == [str(d) for d in range(10)] and mnist.train.labels[:12].tolist()[10:] == [0, 1]
    assert int(mnist.train.images[3].float().mean()) == 75
    cfg = DataConfig(source="mnist", data_dir=str(tmp_path / "mnist"), channels=3)
    assert load_dataset(cfg, None, 16).test.images.shape == (10000, 3, 28, 28)  # gray repeated to RGB


def test_cifar_reads_the_same_from_the_folder_and_the_archive(tmp_path):
    write_cifar10(tmp_path / "folder", as_archive=False)
    write_cifar10(tmp_path / "archive", as_archive=True)
    a, b = read_cifar(tmp_path / "folder", "cifar10"), read_cifar(tmp_path / "archive", "cifar10")
    assert a.train.images.shape == (100, 3, 32, 32) and a.test.images.shape == (30, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.class_names == [f"class{c}" for c in range(10)] and a.train.labels[:3].tolist() == [1, 2, 3]
    assert int(a.train.images[0, 0, 0, 0]) == 20  # label 1's colour
    gray = load_dataset(DataConfig(source="cifar10", data_dir=str(tmp_path / "archive"), channels=1), None, 16)
    assert gray.train.images.shape == (100, 1, 32, 32)
    assert torch.equal(to_channels(a.train.images, 1), gray.train.images)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 40), ("test", 10)):
        (d / name).write_bytes(cifar_batch(n, b"fine_labels", 0))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    data = read_cifar(tmp_path, "cifar100")
    assert len(data.class_names) == 100 and data.train.labels.max() == 9 and data.test.images.shape[0] == 10


def test_an_image_folder_in_any_mode_and_size_becomes_the_models_images(tmp_path):
    folder = write_folder(tmp_path / "colours")
    cfg = DataConfig(source="image_folder", data_dir=str(folder))
    data = load_dataset(cfg, None, 16)
    assert data.class_names == ["blue", "green", "red"]
    assert data.train.images.shape[1:] == (3, 16, 16) and len(data.test.labels) == 3  # one of 12 held out per class
    assert len(data.train.labels) + len(data.test.labels) == 36
    red = data.train.images[data.train.labels == 2].float().mean((0, 2, 3))
    assert red[0] > 150 and red[1] < 80  # colours kept, channel order RGB
    assert torch.equal(load_dataset(cfg, None, 16).test.images, data.test.images)  # the hold-out is fixed
    gray = load_dataset(DataConfig(source="image_folder", data_dir=str(folder), channels=1), None, 8)
    assert gray.train.images.shape[1:] == (1, 8, 8)
    scenario = build_scenario(data, load_config(overrides=["data.tasks=[[red, 0], [green]]"]).data, 42, 16)
    assert scenario.tasks == [(2, 0), (1,)] and scenario.describe() == "red, blue | green"
    assert scenario.train_images(1).shape[1] == 3


def test_a_streamed_folder_keeps_its_training_images_as_files_and_reads_a_sample(tmp_path):
    folder = write_folder(tmp_path / "colours", per_class=12)
    memory = load_dataset(DataConfig(source="image_folder", data_dir=str(folder)), None, 16)
    cfg = DataConfig(source="image_folder", data_dir=str(folder), stream=True, driver_per_class=4)
    streamed = load_dataset(cfg, None, 16)
    assert torch.equal(streamed.test.images, memory.test.images)  # the test images are read as before
    files = streamed.train_files
    assert all(Path(p).is_absolute() for p in files.paths) and torch.equal(files.labels, memory.train.labels)
    assert torch.bincount(streamed.train.labels).tolist() == [4, 4, 4]  # the driver's sample: 4 a class
    sample = [files.paths.index(p) for p in files.sample_per_class(4).paths]
    assert torch.equal(streamed.train.images, memory.train.images[sample])  # the same pixels, read from the files
    tasks = load_config(overrides=["data.tasks=[[red, blue], [green]]", "data.train_per_class=5"]).data
    scenario = build_scenario(streamed, tasks, 42, 16)
    first, joint = scenario.train_images(0), scenario.train_images(1, joint=True)
    assert first.labels.tolist() == [0] * 5 + [2] * 5 and first.paths == [files.paths[i] for i in range(5)] + [
        files.paths[i] for i in range(22, 27)
    ]
    assert sorted(joint.labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.stream=true"], "data.stream: true streams an image folder, not data.source 'fashion_mnist'"),
        (["data.source=image_folder", "data.stream=true", "runtime.backend=inline"], "not with runtime.backend"),
        (["data.source=image_folder", "data.stream=true", "classifier.enabled=true"], "continual classifier"),
    ],
)
def test_streaming_is_refused_where_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="smoke", overrides=overrides)


def test_train_and_test_folders_are_used_as_given(tmp_path):
    write_folder(tmp_path / "split" / "train", per_class=4)
    write_folder(tmp_path / "split" / "test", per_class=2)
    data = load_dataset(DataConfig(source="image_folder", data_dir=str(tmp_path / "split")), None, 8)
    assert (
        torch.bincount(data.train.labels).tolist() == [4, 4, 4] and torch.bincount(data.test.labels).tolist() == [2] * 3
    )


def test_task_splits_of_any_size_and_the_default_order(tmp_path):
    folder = write_folder(tmp_path / "colours", per_class=3)
    data = load_dataset(DataConfig(source="image_folder", data_dir=str(folder)), None, 8)
    single = load_config(overrides=["data.classes_per_task=1", "data.num_tasks=3"]).data
    assert sorted(c for t in build_scenario(data, single, 42, 8).tasks for c in t) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"data.num_tasks: 5 tasks x 2 classes exceeds the 3 classes"):
        build_scenario(data, load_config().data, 42, 8)
    with pytest.raises(ConfigError, match=r"data.tasks: class 'purple' does not exist .*allowed: blue, green, red"):
        build_scenario(data, load_config(overrides=["data.tasks=[[purple]]"]).data, 42, 8)
    with pytest.raises(ConfigError, match=r"data.tasks: .*more than one task \(by index and by name"):
        build_scenario(data, load_config(overrides=["data.tasks=[[red], [2]]"]).data, 42, 8)
    with pytest.raises(ConfigError, match=r"data.tasks: .*more than one task"):
        load_config(overrides=["data.tasks=[[red], [red, blue]]"])


@pytest.mark.parametrize(
    "fault, message",
    [
        ("empty", "class folder .*empty holds no images"),
        ("unreadable", "broken.png is not a readable image"),
        ("no_folder", "data.data_dir: null \\(image_folder needs the folder"),
    ],
)
def test_bad_image_folders_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, fault, message):
    folder = write_folder(tmp_path / "colours", per_class=3)
    if fault == "empty":
        (folder / "empty").mkdir()
    if fault == "unreadable":
        (folder / "red" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    args = ["run", "--preset", "smoke", "--inline", "--out", str(out), "--set", "data.source=image_folder"]
    args += [] if fault == "no_folder" else ["--data-dir", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distcl: config error: ")
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_an_rgb_folder_trains_and_its_checkpoints_sample_with_ddim_pipeline(tmp_path, capsys):
    """In one process here (tests/test_twin.py runs an RGB folder on Ray, against this inline run)."""
    folder = write_folder(tmp_path / "colours", per_class=6)
    out = tmp_path / "run"
    overrides = [
        "data.source=image_folder",
        "data.tasks=[[red, blue], [green]]",
        "train.max_steps=3",
        "eval.num_samples=10",
        "eval.batch_size=10",
        "classifier.enabled=true",
        "classifier.epochs=0.5",
    ]
    args = ["run", "--preset", "smoke", "--inline", "--data-dir", str(folder), "--out", str(out), "--no-progress"]
    sets = [a for o in overrides for a in ("--set", o)]
    assert main([*args, *sets]) == 0
    assert "classes per task: red, blue | green" in capsys.readouterr().out
    images = DDIMPipeline.from_pretrained(out / "task_1")(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    evaluator = json.loads((out / "evaluator.json").read_text())
    assert evaluator["dataset"]["source"] == "image_folder" and evaluator["dataset"]["classes"] == list(COLOURS)
    assert evaluator["classifier"]["channels"] == 3 and evaluator["classifier"]["num_classes"] == 3
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics.task) == {0, 1} and {"fid", "kld", "accuracy"} <= set(metrics.metric)
    assert main(["report", str(out)]) == 0
    assert "red, blue" in capsys.readouterr().out  # the report names each task's classes
    assert main([*args, *sets, "--set", "data.channels=1"]) == 2  # a gray run cannot resume an RGB one
    assert "differs in data.channels" in capsys.readouterr().err


def test_the_smoke_preset_runs_on_cifar(tmp_path):
    """The smoke preset on CIFAR-10's format: 32x32 RGB taken to the tiny UNet's 16x16, its checkpoints RGB."""
    write_cifar10(tmp_path / "cifar", as_archive=True)
    out = tmp_path / "run"
    sets = ["data.source=cifar10", "data.num_tasks=2", "train.max_steps=3", "eval.num_samples=10"]
    args = ["run", "--preset", "smoke", "--inline", "--data-dir", str(tmp_path / "cifar"), "--out", str(out)]
    assert main([*args, "--no-progress", *(a for s in sets for a in ("--set", s))]) == 0
    assert json.loads((out / "tasks.json").read_text())["classes"] == [["class2", "class6"], ["class1", "class8"]]
    assert DDIMPipeline.from_pretrained(out / "task_1").unet.config.in_channels == 3
    assert set(pd.read_parquet(out / "real_metrics.parquet").task) == {0, 1}


def test_images_of_every_mode_are_read_as_they_look(tmp_path):
    """16-bit PNGs scaled by their range (not clipped at 255), transparency over white, and a hold-out that
    leaves every class a training image."""
    folder = tmp_path / "modes"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    Image.fromarray(np.linspace(0, 60000, 32 * 32).reshape(32, 32).astype(np.uint16)).save(folder / "a" / "0.png")
    Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(folder / "a" / "1.png")
    clear = np.zeros((32, 32, 4), np.uint8)
    clear[..., 0] = 200  # red, fully transparent
    for i in range(2):
        Image.fromarray(clear, "RGBA").save(folder / "b" / f"{i}.png")
    cfg = DataConfig(source="image_folder", data_dir=str(folder), channels=1, test_fraction=0.9)
    data = load_dataset(cfg, None, 8)
    assert torch.bincount(data.train.labels).tolist() == [1, 1] and torch.bincount(data.test.labels).tolist() == [1, 1]
    images = torch.cat([data.train.images, data.test.images])
    labels = torch.cat([data.train.labels, data.test.labels])
    gray = images[labels == 0].float().mean((1, 2, 3)).sort().values
    assert 100 < gray[0] < 140 and 100 < gray[1] < 140  # a ramp to 60000 and a flat 30000: mid-gray, not white
    assert (images[labels == 1] == 255).all()  # transparent: the white background
