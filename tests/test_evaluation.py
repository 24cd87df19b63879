import json
import math

import pandas as pd
import pytest
import torch

from distcl.cli import main
from distcl.config import DataConfig, EvalConfig, ModelConfig
from distcl.data import cache_dir, load_dataset, read_idx_source, select, to_model_range
from distcl.eval_net import (
    CNN_EXTRACTOR,
    MIN_STEPS,
    RELIABLE_ACCURACY,
    classify,
    load_or_train_classifier,
    training_steps,
)
from distcl.evaluation import (
    EvalChunk,
    EvalJob,
    EvalNets,
    Evaluator,
    EvalWorker,
    LoadedNets,
    class_histogram_metrics,
    fid_from_features,
    generate_indexed,
    metrics_from_chunks,
    solver_predictions,
    to_uint8,
)
from distcl.models import build_unet
from distcl.solver import SolverCNN
from tests.image_data import write_shapes


def test_class_histogram_metrics():
    true = torch.tensor([0, 0, 1, 1])
    assert class_histogram_metrics(true, true, 10) == pytest.approx({"kld": 0.0, "tv": 0.0, "gen_in_seen": 1.0})
    gen = torch.tensor([0, 0, 0, 2])  # p_gen = (3/4, 0, 1/4)
    m = class_histogram_metrics(true, gen, 10)
    assert m["kld"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 1e-6))
    assert m["tv"] == pytest.approx(0.5 * (0.25 + 0.5 + 0.25)) and m["gen_in_seen"] == pytest.approx(0.75)


ACCURACY_AT_16 = 0.85


@pytest.fixture(scope="module")
def splits(fmnist_dir):
    return read_idx_source(fmnist_dir)


@pytest.fixture(scope="module")
def classifier(splits):
    """The cached evaluation classifier at the tiny preset's 16x16 (trained once per machine)."""
    return load_or_train_classifier(cache_dir(), splits, EvalConfig().classifier_epochs, torch.device("cpu"), 16)


def test_classifier_is_accurate_at_the_models_size_and_cached(classifier, splits):
    net, accuracy, path = classifier
    assert accuracy >= ACCURACY_AT_16 and path.is_file() and net.arch == {"channels": 1, "num_classes": 10, "size": 16}
    test = splits.test
    predicted = classify(net, to_model_range(test.images[:2000], 16))
    assert (predicted == test.labels[:2000]).float().mean() > ACCURACY_AT_16 - 0.02
    shirts = (predicted == 6).float().mean()  # a 28x28 network labelled 16x16 shirts 0.4 % of the time
    assert 0.06 < shirts < 0.14
    again = load_or_train_classifier(path.parent, splits, EvalConfig().classifier_epochs, torch.device("cpu"), 16)
    assert again[1] == accuracy  # loaded, not retrained


def test_fid_separates_classes(classifier, splits):
    net, _, path = classifier
    nets = LoadedNets(
        EvalNets({"state_dict": net.state_dict(), "arch": net.arch}, CNN_EXTRACTOR, path.read_bytes()),
        torch.device("cpu"),
    )

    def fid(a, b):
        return fid_from_features(nets.features(a), nets.features(b))

    test = splits.test
    shirts = to_uint8(to_model_range(select(test, [0], 400).images, 16))
    shirts_b = to_uint8(to_model_range(select(test, [0], 800).images[400:], 16))
    bags = to_uint8(to_model_range(select(test, [8], 400).images, 16))
    same, near, far = fid(shirts, shirts), fid(shirts, shirts_b), fid(shirts, bags)
    assert abs(same) < 1e-3 and 0 < near < far / 5


def test_inception_requested_without_weights(splits, tmp_path, monkeypatch, classifier):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="eval.feature_extractor: 'inception' needs"):
        Evaluator(
            EvalConfig(feature_extractor="inception"),
            splits,
            16,
            classifier[2].parent,
            torch.device("cpu"),
            progress=False,
        )


def test_an_evaluation_sample_depends_only_on_seed_task_and_index(unet, scheduler):
    whole = generate_indexed(unet, scheduler, 3, 0.5, 42, 1, 0, 6)  # eta > 0: fresh noise at every step
    parts = torch.cat(
        [generate_indexed(unet, scheduler, 3, 0.5, 42, 1, 0, 2), generate_indexed(unet, scheduler, 3, 0.5, 42, 1, 2, 6)]
    )
    assert torch.allclose(whole, parts, atol=1e-5)
    assert not torch.allclose(whole, generate_indexed(unet, scheduler, 3, 0.5, 42, 2, 0, 6), atol=1e-2)  # task
    assert not torch.allclose(whole, generate_indexed(unet, scheduler, 3, 0.5, 69, 1, 0, 6), atol=1e-2)  # seed


def test_chunked_evaluation_gives_the_same_metrics_for_any_chunk_size(splits, classifier):
    net, _, path = classifier
    model_cfg = ModelConfig()
    torch.manual_seed(0)
    state = build_unet(model_cfg).state_dict()
    nets = EvalNets({"state_dict": net.state_dict(), "arch": net.arch}, CNN_EXTRACTOR, path.read_bytes())
    test = select(splits.test, [0, 1], 100)  # more images than features (128): a full-rank covariance
    worker = EvalWorker(torch.device("cpu"))

    def evaluate(batch_size):
        job = EvalJob(
            1,
            42,
            EvalConfig(num_samples=160, steps=2, batch_size=batch_size),
            model_cfg,
            state,
            nets,
            to_uint8(to_model_range(test.images, 16)),
        )
        assert len(job.chunks()) == -(-160 // batch_size) + -(-200 // batch_size)
        return metrics_from_chunks(list(reversed([worker.run(job, c) for c in job.chunks()])), test.labels, 10)

    (one, grid_one), (many, grid_many) = evaluate(200), evaluate(30)
    assert one == pytest.approx(many, rel=1e-5, abs=1e-6) and one["fid"] > 0
    assert grid_one.shape == (100, 1, 16, 16) and (grid_one.int() - grid_many.int()).abs().max() <= 1


def test_a_worker_loads_each_new_job_s_model(splits, classifier):
    net, _, path = classifier
    nets = EvalNets({"state_dict": net.state_dict(), "arch": net.arch}, CNN_EXTRACTOR, path.read_bytes())
    real = to_uint8(to_model_range(select(splits.test, [0], 8).images, 16))

    def job(seed):  # the model after another task: other weights, a new job object
        torch.manual_seed(seed)
        return EvalJob(
            1,
            42,
            EvalConfig(num_samples=4, steps=2, batch_size=4),
            ModelConfig(),
            build_unet(ModelConfig()).state_dict(),
            nets,
            real,
        )

    worker, chunk = EvalWorker(torch.device("cpu")), EvalChunk("generated", 0, 4)
    for seed in (0, 1):
        got = worker.run(job(seed), chunk)  # the previous job may be freed: its model must not be reused
        assert torch.equal(got.grid, EvalWorker(torch.device("cpu")).run(job(seed), chunk).grid)
    assert not torch.equal(got.grid, worker.run(job(0), chunk).grid)


def test_the_continual_classifier_predicts_the_test_images_in_chunks_as_in_one_batch(splits, classifier):
    net, _, path = classifier
    torch.manual_seed(0)
    solver, state = SolverCNN().eval(), build_unet(ModelConfig()).state_dict()
    test = select(splits.test, [0, 1, 2], 30)
    nets = EvalNets({"state_dict": net.state_dict(), "arch": net.arch}, CNN_EXTRACTOR, path.read_bytes())
    job = EvalJob(
        1,
        42,
        EvalConfig(num_samples=20, steps=1, batch_size=40),
        ModelConfig(),
        state,
        nets,
        to_uint8(to_model_range(test.images, 16)),
        solver.state_dict(),
        test.images,
    )
    assert sorted(c.kind for c in job.chunks() if c.kind == "solver") == ["solver"] * 3  # 90 images, chunks of 40
    worker = EvalWorker(torch.device("cpu"))
    results = list(reversed([worker.run(job, c) for c in job.chunks()]))
    expected = solver(to_model_range(test.images, 16)).argmax(1)
    assert torch.equal(solver_predictions(results), expected)


def test_the_fashion_mnist_network_trains_for_its_epochs_under_its_old_key(classifier, splits):
    _, _, path = classifier
    assert training_steps(len(splits.train.labels), EvalConfig().classifier_epochs) == 2 * 469 > MIN_STEPS
    assert path.name == f"eval_net_fashion_mnist_{splits.fingerprint()}_s16_e2.pt"  # no step suffix: as before


SMALL_FOLDER = ["--inline", "--no-progress", "--set", "data.source=image_folder", "--set", "model.preset=tiny"]
SMALL_FOLDER += [
    a
    for o in ("data.tasks=[[c0, c1], [c2, c3], [c4, c5]]", "train.max_steps=3", "eval.num_samples=60", "eval.steps=2")
    for a in ("--set", o)
]


def test_the_evaluation_network_learns_a_small_separable_folder(tmp_path, capsys):
    folder = write_shapes(tmp_path / "shapes")  # 6 classes x 60 images: 54 a class to learn from
    out = tmp_path / "run"
    args = [*SMALL_FOLDER, "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "data.num_tasks=3"]
    assert main(["run", "--data-dir", str(folder), "--out", str(out), *args]) == 0
    assert json.loads((out / "evaluator.json").read_text())["classifier_test_accuracy"] >= 0.97
    assert "warning" not in capsys.readouterr().out
    floor = pd.read_parquet(out / "real_metrics.parquet").pivot(index="task", columns="metric", values="value")
    assert (floor.gen_in_seen >= 0.97).all() and (floor.kld <= 0.05).all(), floor


def test_a_folder_whose_classes_cannot_be_told_apart_is_warned_about_once(tmp_path, capsys):
    folder = write_shapes(tmp_path / "shapes", separable=False)
    data = load_dataset(DataConfig(source="image_folder", data_dir=str(folder)), None, 16)
    _, accuracy, path = load_or_train_classifier(tmp_path / "cache", data, 2, torch.device("cpu"), 16, progress=False)
    assert accuracy < RELIABLE_ACCURACY and path.name.endswith(f"_s16_e2_n{MIN_STEPS}.pt")  # 54 x 6 images: 3 a batch
    out = tmp_path / "run"
    args = [*SMALL_FOLDER, "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps=1"]
    assert main(["run", "--data-dir", str(folder), "--out", str(out), *args]) == 0
    console = capsys.readouterr().out
    assert console.count("[distcl] warning: the evaluation network's test accuracy is") == 1
    assert f"is {accuracy:.4f} (< {RELIABLE_ACCURACY}): kld, tv and gen_in_seen are unreliable" in console
    assert "real_metrics.parquet" in console
