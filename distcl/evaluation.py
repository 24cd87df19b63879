"""Evaluation after every task: seeded samples in chunks on any worker, FID (torch-fidelity), class-histogram KLD
and TV, the continual classifier's labels, and a sample grid. FID's feature network and the labelling classifier
are distcl.eval_net's (Inception for FID when its weights are on disk)."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch_fidelity
from diffusers.utils.torch_utils import randn_tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor
from torchvision.utils import save_image
from tqdm.auto import tqdm

from distcl.config import EvalConfig, ModelConfig
from distcl.data import Dataset, Split, to_model_range
from distcl.diffusion import ddim_sample
from distcl.eval_net import (
    CNN_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS,
    classify,
    inception_weights,
    load_eval_classifier,
    load_or_train_classifier,
)
from distcl.models import build_scheduler, build_unet, load_pipeline_parts
from distcl.pid import STUDENT_FILE, load_pid_student
from distcl.seeding import seeded_generator
from distcl.settings import ConfigError
from distcl.solver import SolverCNN

METRICS = ("fid", "kld", "tv", "gen_in_seen")  # what metrics_from_chunks returns after every task
KLD_EPS = 1e-6  # floor on p_gen so that a class never generated gives a large, finite KL
GRID_SIZE = 100  # samples in the 10x10 grid saved after every task


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in 0..255."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes).double() / max(len(labels), 1)


def class_histogram_metrics(
    true_labels: torch.Tensor, generated_labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """KLD = sum_c p_true log(p_true / max(p_gen, 1e-6)) over classes with p_true > 0;
    TV = 0.5 sum_c |p_true - p_gen|; gen_in_seen = share of samples labelled as a class with p_true > 0."""
    p_true, p_gen = histogram(true_labels, num_classes), histogram(generated_labels, num_classes)
    seen = p_true > 0
    kld = float((p_true[seen] * (p_true[seen] / p_gen[seen].clamp_min(KLD_EPS)).log()).sum())
    tv = float(0.5 * (p_true - p_gen).abs().sum())
    return {"kld": kld, "tv": tv, "gen_in_seen": float(p_gen[seen].sum())}


@torch.no_grad()
def generate(
    unet, scheduler, n: int, steps: int, eta: float, batch_size: int, generator: torch.Generator, progress: bool = True
) -> torch.Tensor:
    """``n`` DDIM samples in [-1, 1] on the CPU, x_T drawn batch by batch from ``generator``."""
    cfg = unet.config
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False):
        size = min(batch_size, n - start)
        x_T = torch.randn((size, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
        out.append(ddim_sample(unet, scheduler, x_T.to(unet.device), steps, eta, generator).cpu())
    return torch.cat(out)


def sample_checkpoint(model: Path, num: int, steps: int, seed: int, device: torch.device) -> torch.Tensor:
    """``distcl sample``: ``num`` samples of the checkpoint at ``model`` on ``device``, in [-1, 1] on the CPU:
    a PID student's one step, else ``steps``-step DDIM of a DDIMPipeline folder; x_T from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if (model / STUDENT_FILE).is_file():
        with torch.no_grad():
            return load_pid_student(model, device).sample(num, generator)
    unet, scheduler = load_pipeline_parts(model, device)
    return generate(unet.eval(), scheduler, num, steps, 0.0, num, generator, progress=False)


def write_samples(model: Path, out: Path, num: int, steps: int, seed: int, device: torch.device) -> Path:
    """``distcl sample``: a square PNG grid of :func:`sample_checkpoint`'s samples at ``out``."""
    if num < 1 or steps < 1:
        raise ConfigError("--num/--steps", f"{num}/{steps} (allowed: >= 1)")
    images = sample_checkpoint(Path(model), num, steps, seed, device)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_image((images.clamp(-1, 1) + 1) / 2, out, nrow=math.ceil(math.sqrt(num)))
    return Path(out)


def sample_generators(seed: int, task: int, start: int, stop: int) -> list[torch.Generator]:
    """One generator per evaluation sample i of task k, seeded by (run seed, "eval", k, i)."""
    return [seeded_generator(seed, "eval", task, i) for i in range(start, stop)]


@torch.no_grad()
def generate_indexed(
    unet, scheduler, steps: int, eta: float, seed: int, task: int, start: int, stop: int
) -> torch.Tensor:
    """Evaluation samples [start, stop) of task k, in [-1, 1] on the CPU: sample i's x_T and DDIM noise come from
    its own generator, so it is the same sample in any batch, on any worker."""
    generators = sample_generators(seed, task, start, stop)
    cfg = unet.config
    x_T = randn_tensor((stop - start, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generators)
    return ddim_sample(unet, scheduler, x_T.to(unet.device), steps, eta, generators).cpu()


@dataclass
class EvalNets:
    """The labelling classifier's weights and the FID feature network (torch-fidelity name and its weights file):
    plain data, sent to evaluation workers on any node through the object store."""

    classifier: dict  # {"state_dict", "arch"} of distcl.eval_net.EvalClassifier
    extractor: str
    extractor_weights: bytes

    @property
    def num_classes(self) -> int:
        return self.classifier["arch"]["num_classes"]


class LoadedNets:
    """:class:`EvalNets` ready on ``device``: class labels and FID features of uint8 images."""

    def __init__(self, nets: EvalNets, device: torch.device):
        self.classifier = load_eval_classifier(nets.classifier).to(device)
        self.channels = 3 if nets.extractor == INCEPTION_EXTRACTOR else nets.classifier["arch"]["channels"]
        cls = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[nets.extractor]
        with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity extractors load their weights from a file
            weights = Path(tmp) / "weights.pth"
            weights.write_bytes(nets.extractor_weights)
            layer = cls.get_default_feature_layer_for_metric("fid")
            self.extractor = create_feature_extractor(
                nets.extractor, [layer], cuda=False, feature_extractor_weights_path=str(weights), verbose=False
            ).to(device)
        self.device = device

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """FID features [N, d] (CPU, float32) of uint8 images [N, C, H, W]."""
        if images.shape[1] != self.channels:
            images = images.repeat(1, self.channels, 1, 1)
        out = [
            self.extractor(images[i : i + batch_size].to(self.device))[0].cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).float()

    def labels(self, samples: torch.Tensor) -> torch.Tensor:
        """The classifier's labels of samples in [-1, 1]."""
        return classify(self.classifier, samples)


@dataclass(frozen=True)
class EvalChunk:
    """One piece of a task's evaluation: generated samples [start, stop), real test images [start, stop) through
    the FID network, or the same test images through the continual classifier ("solver")."""

    kind: str  # "generated" | "real" | "solver"
    start: int
    stop: int


@dataclass
class EvalJob:
    """Task k's evaluation as a worker needs it (plain data: it travels through the object store once per task):
    the model after task k, the nets, and the uint8 test images of the classes seen so far (at the model's size;
    with the continual classifier's weights ``solver``, also at 28x28, its input before resizing)."""

    task: int
    seed: int
    eval_cfg: EvalConfig
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]
    nets: EvalNets
    real: torch.Tensor
    solver: Optional[dict[str, torch.Tensor]] = None
    test_images: Optional[torch.Tensor] = None

    def chunks(self) -> list[EvalChunk]:
        """Generated samples in chunks of eval.batch_size, then the real images in chunks of the same size (and
        those for the continual classifier)."""
        b, n, m = self.eval_cfg.batch_size, self.eval_cfg.num_samples, len(self.real)
        kinds = ("real", "solver") if self.solver is not None else ("real",)
        return [EvalChunk("generated", i, min(i + b, n)) for i in range(0, n, b)] + [
            EvalChunk(kind, i, min(i + b, m)) for kind in kinds for i in range(0, m, b)
        ]


@dataclass
class ChunkResult:
    """What comes back from a chunk: features, and for generated samples their labels and the grid's images; for
    the continual classifier's chunks, only its predicted labels."""

    chunk: EvalChunk
    features: Optional[torch.Tensor]  # None for the continual classifier's chunks
    labels: Optional[torch.Tensor] = None
    grid: Optional[torch.Tensor] = None  # uint8 samples of index < GRID_SIZE


class EvalWorker:
    """Runs chunks of evaluation jobs on ``device``; the nets and the model of the latest job stay loaded (the
    worker holds that job: a worker serves many chunks of it, and another job object is loaded anew)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.job, self.nets, self.unet, self.scheduler, self.solver = None, None, None, None, None

    def load(self, job: EvalJob) -> None:
        if job is not self.job:
            self.nets = LoadedNets(job.nets, self.device)  # small next to the UNet
            self.unet = build_unet(job.model_cfg, job.state["conv_in.weight"].shape[1])
            self.unet.load_state_dict(job.state)
            self.unet.to(self.device).eval().requires_grad_(False)
            self.scheduler = build_scheduler(job.model_cfg)
            self.solver = None
            if job.solver is not None:
                self.solver = SolverCNN.from_state(job.solver).to(self.device).eval()
            self.job = job

    def run(self, job: EvalJob, chunk: EvalChunk) -> ChunkResult:
        self.load(job)
        if chunk.kind == "real":
            return ChunkResult(chunk, self.nets.features(job.real[chunk.start : chunk.stop]))
        if chunk.kind == "solver":  # the continual classifier's predictions (its input as in training)
            with torch.no_grad():
                x = to_model_range(job.test_images[chunk.start : chunk.stop], job.real.shape[-1])
                return ChunkResult(chunk, None, classify(self.solver, x))
        c = job.eval_cfg
        samples = generate_indexed(
            self.unet, self.scheduler, c.steps, c.eta, job.seed, job.task, chunk.start, chunk.stop
        )
        images = to_uint8(samples)
        grid = images[: max(0, GRID_SIZE - chunk.start)]
        return ChunkResult(chunk, self.nets.features(images), self.nets.labels(samples), grid)


def solver_predictions(results: list[ChunkResult]) -> torch.Tensor:
    """The continual classifier's predicted labels of the job's test images, in their order."""
    return torch.cat([r.labels for r in sorted(results, key=lambda r: r.chunk.start) if r.chunk.kind == "solver"])


def fid_from_features(generated: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two feature sets [N, d] (torch-fidelity's statistics and Frechet distance, float64)."""
    stats = [fid_features_to_statistics(f.double()) for f in (generated, real)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def metrics_from_chunks(
    results: list[ChunkResult], test_labels: torch.Tensor, num_classes: int
) -> tuple[dict[str, float], torch.Tensor]:
    """FID, KLD, TV and gen_in_seen of a task from its chunks (any order), and the grid's uint8 samples."""

    def cat(kind: str, part: str) -> torch.Tensor:
        chosen = sorted((r for r in results if r.chunk.kind == kind), key=lambda r: r.chunk.start)
        return torch.cat([getattr(r, part) for r in chosen])

    metrics = {
        "fid": fid_from_features(cat("generated", "features"), cat("real", "features")),
        **class_histogram_metrics(test_labels, cat("generated", "labels"), num_classes),
    }
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"non-finite evaluation metrics {metrics}")
    return metrics, cat("generated", "grid")


def save_grid(images: torch.Tensor, path: Path) -> None:
    """A 10x10 grid of uint8 samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[:GRID_SIZE].float() / 255, path, nrow=10)


class Evaluator:
    """FID / KLD / TV of a generator against the test images of the classes seen so far. The driver's side:
    it chooses the nets and makes each task's :class:`EvalJob`; any backend runs the job's chunks."""

    def __init__(
        self,
        eval_cfg,
        dataset: Optional[Dataset],
        size: int,
        cache: Path,
        device: torch.device,
        progress: bool = True,
        saved: Optional[Path] = None,
    ):
        """The evaluation network is the cached one of ``dataset`` (distcl.eval_net), or the one ``saved`` (a run's
        own: OUT/eval_net.pt, which appended tasks keep using)."""
        self.cfg = eval_cfg
        self.device = device
        self.progress = progress
        self.dataset = {}
        if dataset is not None:  # None: a saved network scoring OUT's records (distcl evaluate)
            self.dataset = {
                "source": dataset.source,
                "fingerprint": dataset.fingerprint(),
                "classes": dataset.class_names,
            }
        if saved is None:
            classifier, self.classifier_accuracy, classifier_path = load_or_train_classifier(
                cache, dataset, eval_cfg.classifier_epochs, device, size, progress
            )
        else:
            loaded = torch.load(saved, map_location="cpu")
            classifier, self.classifier_accuracy = load_eval_classifier(loaded).to(device), loaded["test_accuracy"]
            classifier_path = saved
            self.dataset["classes"] = loaded.get("classes", self.dataset.get("classes"))
        self.classifier_file = Path(classifier_path)
        self.net_id = hashlib.sha256(self.classifier_file.read_bytes()).hexdigest()[:12]
        inception = inception_weights(cache)
        if eval_cfg.feature_extractor == "inception" and inception is None:
            raise FileNotFoundError(
                f"eval.feature_extractor: 'inception' needs {INCEPTION_WEIGHTS} in {torch.hub.get_dir()}/checkpoints "
                f"or {cache} (allowed without it: auto, fmnist)"
            )
        use_inception = eval_cfg.feature_extractor == "inception" or (
            eval_cfg.feature_extractor == "auto" and inception is not None
        )
        extractor, weights = (INCEPTION_EXTRACTOR, inception) if use_inception else (CNN_EXTRACTOR, classifier_path)
        state = {k: v.cpu() for k, v in classifier.state_dict().items()}
        self.nets = EvalNets({"state_dict": state, "arch": classifier.arch}, extractor, Path(weights).read_bytes())

    def job(
        self,
        task: int,
        seed: int,
        model_cfg: ModelConfig,
        state: dict,
        test: Split,
        size: int,
        solver: Optional[dict[str, torch.Tensor]] = None,
    ) -> EvalJob:
        """Task ``task``'s evaluation of the model with weights ``state`` against the split ``test``
        (at the model's sample ``size``); with ``solver`` (the continual classifier's weights), its predictions
        of the test images too."""
        real = to_uint8(to_model_range(test.images, size))
        return EvalJob(
            task, seed, self.cfg, model_cfg, state, self.nets, real, solver, test.images if solver is not None else None
        )

    def score(self, samples: torch.Tensor, test: Split, grid_path: Optional[Path] = None) -> dict[str, float]:
        """FID, KLD, TV of given ``samples`` ([-1, 1], any sampler) against ``test``, in this process."""
        nets = LoadedNets(self.nets, self.device)
        images = to_uint8(samples)
        real = to_uint8(to_model_range(test.images, samples.shape[-1]))
        results = [
            ChunkResult(EvalChunk("generated", 0, len(samples)), nets.features(images), nets.labels(samples), images),
            ChunkResult(EvalChunk("real", 0, len(real)), nets.features(real)),
        ]
        metrics, grid = metrics_from_chunks(results, test.labels, self.nets.num_classes)
        if grid_path is not None:
            save_grid(grid, grid_path)
        return metrics

    def real_data(self, reference: Split, test: Split, size: int, seed: int, task: int) -> dict[str, float]:
        """The metrics' floor: up to ``eval.num_samples`` real training images of the seen classes (a draw seeded
        by (seed, "real_data", task)), taken to the model's ``size`` and scored as if they were samples."""
        n = min(self.cfg.num_samples, len(reference.labels))
        pick = torch.randperm(len(reference.labels), generator=seeded_generator(seed, "real_data", task))[:n]
        return self.score(to_model_range(reference.images[pick], size), test)

    def describe(self) -> dict:
        return {
            "feature_extractor": self.nets.extractor,
            "classifier_test_accuracy": self.classifier_accuracy,  # at the model's size (classifier.size)
            "classifier_id": self.net_id,  # the metrics rows' ``evaluator``
            "classifier": self.nets.classifier["arch"],
            "dataset": self.dataset,
        }
