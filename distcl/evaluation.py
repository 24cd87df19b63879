"""Evaluation after every task: FID (torch-fidelity), class-histogram KLD and TV, and a sample grid.

FID's feature network is Inception when its weights are on disk; otherwise a Fashion-MNIST CNN that distcl
trains once on the training set and caches (no weights can be downloaded here).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torchvision.utils import save_image
from tqdm.auto import tqdm

from distcl.data import Split, to_model_range
from distcl.diffusion import ddim_sample
from distcl.models import FashionClassifier

FMNIST_EXTRACTOR = "distcl-fmnist"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
METRICS = ("fid", "kld", "tv", "gen_in_seen")  # what Evaluator.evaluate returns after every task
KLD_EPS = 1e-6  # floor on p_gen so that a class never generated gives a large, finite KL


class FashionFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of FashionClassifier: uint8 [B, 1, H, W] -> (128-d features, 10 logits)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = FashionClassifier()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu")["state_dict"])
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x):
        feats = self.net.features(x.float() / 127.5 - 1)
        out = {"features": feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


if FMNIST_EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FMNIST_EXTRACTOR, FashionFeatureExtractor)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] for torch-fidelity, repeated to 3 channels for Inception."""

    def __init__(self, images: torch.Tensor, channels: int = 1):
        self.images = images if channels == images.shape[1] else images.repeat(1, channels, 1, 1)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in 0..255."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def inception_weights(cache: Optional[Path] = None) -> Optional[Path]:
    """torch-fidelity's Inception weights if they are on disk (torch hub checkpoints or the distcl cache)."""
    places = [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS]
    if cache is not None:
        places.append(cache / INCEPTION_WEIGHTS)
    return next((p for p in places if p.is_file()), None)


def train_classifier(
    train: Split, test: Split, epochs: int, device: torch.device, seed: int = 0, progress: bool = True
) -> tuple[FashionClassifier, float]:
    """Adam (lr 2e-3, cosine decay to 0), batch 128, cross-entropy on 28x28 images in [-1, 1];
    returns the net and its test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FashionClassifier().to(device)
    x, y = to_model_range(train.images, 28), train.labels
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * math.ceil(len(y) / 128))
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y), generator=generator)
        for start in tqdm(range(0, len(y), 128), desc=f"classifier epoch {epoch}", disable=not progress, leave=False):
            idx = order[start : start + 128]
            loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    predictions = classify(net, to_model_range(test.images, 28))
    return net, float((predictions == test.labels).float().mean())


@torch.no_grad()
def classify(net: FashionClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)])


def load_or_train_classifier(
    cache: Path, train: Split, test: Split, epochs: int, device: torch.device, progress: bool = True
) -> tuple[FashionClassifier, float, Path]:
    """The cached evaluation classifier (trained on all 60k training images once per ``epochs``)."""
    path = cache / f"fmnist_classifier_e{epochs}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu")
        net = FashionClassifier()
        net.load_state_dict(saved["state_dict"])
        return net.to(device).eval(), saved["test_accuracy"], path
    net, accuracy = train_classifier(train, test, epochs, device, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False, suffix=".tmp") as tmp:
        torch.save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "test_accuracy": accuracy}, tmp)
    os.replace(tmp.name, path)
    return net, accuracy, path


def histogram(labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes).double() / max(len(labels), 1)


def class_histogram_metrics(true_labels: torch.Tensor, generated_labels: torch.Tensor) -> dict[str, float]:
    """KLD = sum_c p_true log(p_true / max(p_gen, 1e-6)) over classes with p_true > 0;
    TV = 0.5 sum_c |p_true - p_gen|; gen_in_seen = share of samples labelled as a class with p_true > 0."""
    p_true, p_gen = histogram(true_labels), histogram(generated_labels)
    seen = p_true > 0
    kld = float((p_true[seen] * (p_true[seen] / p_gen[seen].clamp_min(KLD_EPS)).log()).sum())
    tv = float(0.5 * (p_true - p_gen).abs().sum())
    return {"kld": kld, "tv": tv, "gen_in_seen": float(p_gen[seen].sum())}


def fid(generated: torch.Tensor, real: torch.Tensor, extractor: str, weights: Path, cuda: bool) -> float:
    """FID between two uint8 image sets [N, 1, H, W] with torch-fidelity and the given feature extractor."""
    channels = 3 if extractor == "inception-v3-compat" else 1
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageDataset(generated, channels),
        input2=ImageDataset(real, channels),
        fid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=str(weights),
        cuda=cuda,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])


@torch.no_grad()
def generate(unet, scheduler, n: int, steps: int, eta: float, batch_size: int, generator: torch.Generator,
             progress: bool = True) -> torch.Tensor:  # fmt: skip
    """``n`` DDIM samples in [-1, 1] on the CPU, x_T drawn batch by batch from ``generator``."""
    cfg = unet.config
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False):
        size = min(batch_size, n - start)
        x_T = torch.randn((size, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
        out.append(ddim_sample(unet, scheduler, x_T.to(unet.device), steps, eta, generator).cpu())
    return torch.cat(out)


class Evaluator:
    """FID / KLD / TV of a generator against the test images of the classes seen so far."""

    def __init__(self, eval_cfg, train: Split, test: Split, cache: Path, device: torch.device, progress: bool = True):
        self.cfg = eval_cfg
        self.device = device
        self.progress = progress
        self.classifier, self.classifier_accuracy, classifier_path = load_or_train_classifier(
            cache, train, test, eval_cfg.classifier_epochs, device, progress
        )
        inception = inception_weights(cache)
        if eval_cfg.feature_extractor == "inception" and inception is None:
            raise FileNotFoundError(
                f"eval.feature_extractor: 'inception' needs {INCEPTION_WEIGHTS} in {torch.hub.get_dir()}/checkpoints "
                f"or {cache} (allowed without it: auto, fmnist)"
            )
        use_inception = eval_cfg.feature_extractor == "inception" or (
            eval_cfg.feature_extractor == "auto" and inception is not None
        )
        self.extractor, self.extractor_weights = (
            ("inception-v3-compat", inception) if use_inception else (FMNIST_EXTRACTOR, classifier_path)
        )

    def evaluate(self, unet, scheduler, test: Split, generator: torch.Generator,
                 grid_path: Optional[Path] = None) -> dict[str, float]:  # fmt: skip
        """Sample ``num_samples`` with DDIM (eval steps, eta), then :meth:`score` them."""
        samples = generate(unet, scheduler, self.cfg.num_samples, self.cfg.steps, self.cfg.eta,
                           self.cfg.batch_size, generator, self.progress)  # fmt: skip
        return self.score(samples, test, grid_path)

    def score(self, samples: torch.Tensor, test: Split, grid_path: Optional[Path] = None) -> dict[str, float]:
        """FID, KLD, TV of generated ``samples`` ([-1, 1], any sampler) against ``test``; a 10x10 grid saved."""
        if grid_path is not None:
            grid_path.parent.mkdir(parents=True, exist_ok=True)
            save_image((samples[:100] + 1) / 2, grid_path, nrow=10)
        real = to_model_range(test.images, samples.shape[-1])
        metrics = {
            "fid": fid(to_uint8(samples), to_uint8(real), self.extractor, self.extractor_weights,
                       self.device.type == "cuda"),  # fmt: skip
            **class_histogram_metrics(test.labels, classify(self.classifier, samples)),
        }
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite evaluation metrics {metrics}")
        return metrics

    def describe(self) -> dict:
        return {"feature_extractor": self.extractor, "classifier_test_accuracy": self.classifier_accuracy}
