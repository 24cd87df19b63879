import math

import pytest
import torch

from distcl.config import EvalConfig
from distcl.data import cache_dir, load_fashion_mnist, select, to_model_range
from distcl.evaluation import (
    FMNIST_EXTRACTOR,
    Evaluator,
    class_histogram_metrics,
    classify,
    fid,
    load_or_train_classifier,
    to_uint8,
)


def test_class_histogram_metrics():
    true = torch.tensor([0, 0, 1, 1])
    assert class_histogram_metrics(true, true) == pytest.approx({"kld": 0.0, "tv": 0.0, "gen_in_seen": 1.0})
    gen = torch.tensor([0, 0, 0, 2])  # p_gen = (3/4, 0, 1/4)
    m = class_histogram_metrics(true, gen)
    assert m["kld"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 1e-6))
    assert m["tv"] == pytest.approx(0.5 * (0.25 + 0.5 + 0.25)) and m["gen_in_seen"] == pytest.approx(0.75)


@pytest.fixture(scope="module")
def splits(fmnist_dir):
    return load_fashion_mnist(fmnist_dir)


@pytest.fixture(scope="module")
def classifier(splits):
    """The cached evaluation classifier (trained once per machine, ~90 s on 2 cores)."""
    return load_or_train_classifier(cache_dir(), splits["train"], splits["test"], EvalConfig().classifier_epochs,
                                    torch.device("cpu"), progress=False)  # fmt: skip


def test_classifier_is_accurate_and_cached(classifier, splits):
    net, accuracy, path = classifier
    assert accuracy >= 0.90 and path.is_file()
    test = splits["test"]
    assert (classify(net, to_model_range(test.images[:2000], 28)) == test.labels[:2000]).float().mean() > 0.88
    again = load_or_train_classifier(path.parent, splits["train"], splits["test"], EvalConfig().classifier_epochs,
                                     torch.device("cpu"))  # fmt: skip
    assert again[1] == accuracy  # loaded, not retrained


def test_fid_separates_classes(classifier, splits):
    _, _, path = classifier
    test = splits["test"]
    shirts = to_uint8(to_model_range(select(test, [0], 400).images, 16))
    shirts_b = to_uint8(to_model_range(select(test, [0], 800).images[400:], 16))
    bags = to_uint8(to_model_range(select(test, [8], 400).images, 16))
    same = fid(shirts, shirts, FMNIST_EXTRACTOR, path, cuda=False)
    near = fid(shirts, shirts_b, FMNIST_EXTRACTOR, path, cuda=False)
    far = fid(shirts, bags, FMNIST_EXTRACTOR, path, cuda=False)
    assert abs(same) < 1e-3 and 0 < near < far / 5


def test_inception_requested_without_weights(splits, tmp_path, monkeypatch, classifier):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="eval.feature_extractor: 'inception' needs"):
        Evaluator(EvalConfig(feature_extractor="inception"), splits["train"], splits["test"], classifier[2].parent,
                  torch.device("cpu"), progress=False)  # fmt: skip
