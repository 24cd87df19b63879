import gzip
import hashlib
import re
import shutil

import pytest
import torch

from distcl.config import DataConfig
from distcl.data import (
    FILES,
    DataError,
    build_scenario,
    class_order,
    download_file,
    locate,
    read_idx,
    read_idx_source,
    task_classes,
    to_model_range,
)


@pytest.mark.parametrize(
    "seed, tasks",
    [
        (42, [(2, 6), (1, 8), (4, 5), (0, 9), (3, 7)]),
        (69, [(0, 2), (3, 5), (4, 1), (6, 9), (8, 7)]),
        (1714, [(7, 3), (8, 0), (1, 4), (6, 2), (9, 5)]),
    ],
)
def test_reference_class_orders(seed, tasks):
    assert task_classes(class_order(seed), 5, 2) == tasks
    state = torch.get_rng_state()
    class_order(seed)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_explicit_class_order():
    assert task_classes(class_order(42, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]), 5, 2)[0] == (9, 8)


@pytest.fixture(scope="module")
def splits(fmnist_dir):
    return read_idx_source(fmnist_dir)


def test_reads_the_debian_files(splits):
    train, test = splits.train, splits.test
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels


def test_scenario_splits_and_ranges(splits):
    cfg = DataConfig(train_per_class=50, test_per_class=20)
    scenario = build_scenario(splits, cfg, seed=42, sample_size=32)
    x = scenario.train_images(1)
    assert x.shape == (100, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.min() < -0.99
    assert scenario.train_images(2, joint=True).shape[0] == 300
    test = scenario.test_split(1)
    assert sorted(set(test.labels.tolist())) == [1, 2, 6, 8] and len(test.labels) == 80


def test_resize_is_antialiased_and_exact_at_native_size():
    img = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    img[0, 0, :, ::2] = 255  # one-pixel stripes average out when shrunk with antialiasing
    assert torch.allclose(to_model_range(img, 28), img.float() / 127.5 - 1)
    small = to_model_range(img, 14)
    assert small.shape == (1, 1, 14, 14) and small.std() < 0.1


def _gz(path, data):
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def test_corrupt_files_are_named(tmp_path, fmnist_dir):
    stem = "t10k-labels-idx1-ubyte"
    raw = gzip.open(fmnist_dir / f"{stem}.gz").read()
    _, count, dims = FILES[stem]
    cases = {
        "truncated.gz": (raw[:-10], "9990 data bytes, expected 10000"),
        "magic.gz": (b"\x00\x00\x08\x03" + raw[4:], "bad magic number"),
        "count.gz": (raw[:4] + (9999).to_bytes(4, "big") + raw[8:], "shape (9999,), expected (10000,)"),
        "header.gz": (raw[:5], "truncated header"),
    }
    for name, (data, message) in cases.items():
        _gz(tmp_path / name, data)
        with pytest.raises(DataError, match=re.escape(message)) as err:
            read_idx(tmp_path / name, count, dims)
        assert name in str(err.value)
    broken = tmp_path / "broken.gz"
    broken.write_bytes((fmnist_dir / f"{stem}.gz").read_bytes()[:100])  # a cut gzip stream
    with pytest.raises(DataError, match="broken.gz: cannot be read"):
        read_idx(broken, count, dims)
    raw_file = tmp_path / stem
    raw_file.write_bytes(raw)  # uncompressed IDX reads too
    assert read_idx(raw_file, count, dims).shape == (10000,)


def test_out_of_range_label_is_an_error(tmp_path, fmnist_dir):
    for stem in FILES:
        shutil.copy(fmnist_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    raw = bytearray(gzip.open(fmnist_dir / "t10k-labels-idx1-ubyte.gz").read())
    raw[8] = 10
    _gz(tmp_path / "t10k-labels-idx1-ubyte.gz", bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: label 10 out of range"):
        read_idx_source(tmp_path)


def test_locate_order(tmp_path, monkeypatch, fmnist_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    for stem in FILES:
        shutil.copy(fmnist_dir / f"{stem}.gz", mine / f"{stem}.gz")
    monkeypatch.delenv("DISTCL_DATA", raising=False)
    assert locate(str(mine)) == mine
    assert locate(None) == fmnist_dir
    monkeypatch.setenv("DISTCL_DATA", str(mine))
    assert locate(None) == mine
    (mine / "train-images-idx3-ubyte.gz").unlink()  # incomplete: skipped
    assert locate(str(mine)) == fmnist_dir
    with pytest.raises(DataError, match="does not exist"):
        locate(str(tmp_path / "absent"), cache=str(tmp_path / "cache"), download=False)


def test_download_verifies_checksum(tmp_path):
    source = tmp_path / "source.gz"
    source.write_bytes(b"payload")
    good = hashlib.md5(b"payload").hexdigest()
    download_file(source.as_uri(), tmp_path / "dl" / "ok.gz", good)
    assert (tmp_path / "dl" / "ok.gz").read_bytes() == b"payload"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_file(source.as_uri(), tmp_path / "dl" / "bad.gz", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["ok.gz"]  # nothing half-written left
