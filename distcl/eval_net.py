"""The evaluation network: a small CNN trained once on the Fashion-MNIST training set and cached (no weights can be
downloaded here); its 128-d features are FID's (a torch-fidelity feature extractor), its labels KLD's and TV's.
Inception replaces it for FID when its weights are on disk."""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from distcl.data import Split, to_model_range
from distcl.training import optimise

FMNIST_EXTRACTOR = "distcl-fmnist"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class FashionClassifier(nn.Module):
    """A small CNN on 28x28 Fashion-MNIST images in [-1, 1]; ``features`` is its 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 28:
            x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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
    per_epoch = math.ceil(len(y) / 128)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * per_epoch)
    order: dict[int, torch.Tensor] = {}  # {epoch: its permutation}, drawn in epoch order from ``generator``

    def step_terms(step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.randperm(len(y), generator=generator)
        idx = order[epoch][i * 128 : (i + 1) * 128]
        return {"loss": F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))}

    optimise(
        net,
        optimizer,
        step_terms,
        epochs * per_epoch,
        after_step=schedule.step,
        log_every=per_epoch,
        progress=progress,
        desc="evaluation classifier",
    )
    net.eval()
    predictions = classify(net, to_model_range(test.images, 28))
    return net, float((predictions == test.labels).float().mean())


@torch.no_grad()
def classify(net: FashionClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat(
        [net(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


def load_or_train_classifier(
    cache: Path, train: Split, test: Split, epochs: int, device: torch.device, progress: bool = True
) -> tuple[FashionClassifier, float, Path]:
    """The cached evaluation classifier (trained on all 60k training images once per ``epochs``; runs that start
    together on a machine wait for the one that trains it)."""
    path = cache / f"fmnist_classifier_e{epochs}.pt"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
            if not path.is_file():
                net, accuracy = train_classifier(train, test, epochs, device, progress=progress)
                with tempfile.NamedTemporaryFile(dir=cache, delete=False, suffix=".tmp") as tmp:
                    torch.save(
                        {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "test_accuracy": accuracy},
                        tmp,
                    )
                os.replace(tmp.name, path)
    saved = torch.load(path, map_location="cpu")
    net = FashionClassifier()
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved["test_accuracy"], path
