"""The evaluation network: a small CNN trained once per dataset on its training set and cached by the data's
fingerprint (no weights can be downloaded here); its 128-d features are FID's (a torch-fidelity feature
extractor), its labels KLD's and TV's. Inception replaces it for FID when its weights are on disk."""

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

from distcl.data import Dataset, Split, to_model_range
from distcl.models import seeded_init
from distcl.training import optimise

CNN_EXTRACTOR = "distcl-cnn"
BATCH = 128
MIN_STEPS = 600  # the network's optimizer steps at least: a small folder's epochs are a few steps each
RELIABLE_ACCURACY = 0.8  # below this test accuracy, the class-histogram metrics (KLD, TV, gen_in_seen) mislead
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class EvalClassifier(nn.Module):
    """A small CNN on ``size`` x ``size`` images of ``channels`` channels in [-1, 1] (other sizes are resized to
    it), ``num_classes`` logits; ``features`` is its 128-d penultimate layer. At 1 x 28 x 28 and 10 classes: the
    Fashion-MNIST network of earlier runs, weight for weight."""

    feature_dim = 128

    def __init__(self, channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        self.arch = {"channels": channels, "num_classes": num_classes, "size": size}
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * (size // 4) ** 2, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = self.arch["size"]
        if x.shape[-1] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_eval_classifier(saved: dict) -> EvalClassifier:
    """The network of a saved {"state_dict", "arch", ...} (a file from before "arch": the Fashion-MNIST one)."""
    net = EvalClassifier(**saved.get("arch", {}))
    net.load_state_dict(saved["state_dict"])
    return net.eval()


class CNNFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of an EvalClassifier: uint8 [B, C, H, W] -> (128-d features, logits)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_eval_classifier(torch.load(feature_extractor_weights_path, map_location="cpu"))

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


if CNN_EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CNN_EXTRACTOR, CNNFeatureExtractor)


def inception_weights(cache: Optional[Path] = None) -> Optional[Path]:
    """torch-fidelity's Inception weights if they are on disk (torch hub checkpoints or the distcl cache)."""
    places = [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS]
    if cache is not None:
        places.append(cache / INCEPTION_WEIGHTS)
    return next((p for p in places if p.is_file()), None)


def train_classifier(
    train: Split,
    test: Split,
    num_classes: int,
    epochs: int,
    device: torch.device,
    size: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[EvalClassifier, float]:
    """Adam (lr 2e-3, cosine decay to 0), batch 128, cross-entropy on the images in [-1, 1] taken to ``size``
    (None: their own) as the model's samples are, for :func:`training_steps`; returns the net and its test
    accuracy at that size."""
    generator = torch.Generator().manual_seed(seed)
    size = size or train.images.shape[-1]
    with seeded_init(seed):
        net = EvalClassifier(train.images.shape[1], num_classes, size).to(device)
    x, y = to_model_range(train.images, size), train.labels
    per_epoch = math.ceil(len(y) / BATCH)
    steps = training_steps(len(y), epochs)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order: dict[int, torch.Tensor] = {}  # {epoch: its permutation}, drawn in epoch order from ``generator``

    def step_terms(step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.randperm(len(y), generator=generator)
        idx = order[epoch][i * BATCH : (i + 1) * BATCH]
        return {"loss": F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))}

    optimise(
        net,
        optimizer,
        step_terms,
        steps,
        after_step=schedule.step,
        log_every=per_epoch,
        progress=progress,
        desc="evaluation classifier",
    )
    net.eval()
    predictions = classify(net, to_model_range(test.images, size))
    return net, float((predictions == test.labels).float().mean())


def training_steps(n: int, epochs: int) -> int:
    """max(epochs x ceil(n / 128), MIN_STEPS): ``epochs`` passes over ``n`` training images, and at least
    MIN_STEPS steps (a folder of 300 images: 200 epochs; Fashion-MNIST's 60,000 at 2 epochs: 938)."""
    return max(epochs * math.ceil(n / BATCH), MIN_STEPS)


def accuracy_warning(accuracy: float) -> Optional[str]:
    """One line when the network labels its own test images too poorly for the class-histogram metrics."""
    if accuracy >= RELIABLE_ACCURACY:
        return None
    return (
        f"[distcl] warning: the evaluation network's test accuracy is {accuracy:.4f} (< {RELIABLE_ACCURACY}): "
        "kld, tv and gen_in_seen are unreliable for this data; compare them with the real-data floor "
        "(strategy 'real data' in real_metrics.parquet, distcl report)"
    )


@torch.no_grad()
def classify(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat(
        [net(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


def load_or_train_classifier(
    cache: Path, dataset: Dataset, epochs: int, device: torch.device, size: Optional[int] = None, progress: bool = True
) -> tuple[EvalClassifier, float, Path]:
    """The evaluation classifier of ``dataset`` (all its training images) at the model's sample ``size`` (the
    resolution its samples have: a 16x16 model's samples are labelled by a network that learnt 16x16 images),
    cached by the data's fingerprint, the size and ``epochs`` (and the steps, where MIN_STEPS raised them: the
    key of a network trained for its epochs is the same as before the floor); runs that start together on a
    machine wait for the one that trains it."""
    size = size or dataset.train.images.shape[-1]
    n = len(dataset.train.labels)
    steps = training_steps(n, epochs)
    floor = "" if steps == epochs * math.ceil(n / BATCH) else f"_n{steps}"
    path = cache / f"eval_net_{dataset.source}_{dataset.fingerprint()}_s{size}_e{epochs}{floor}.pt"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
            if not path.is_file():
                net, accuracy = train_classifier(
                    dataset.train, dataset.test, len(dataset.class_names), epochs, device, size, progress=progress
                )
                state = {k: v.cpu() for k, v in net.state_dict().items()}
                with tempfile.NamedTemporaryFile(dir=cache, delete=False, suffix=".tmp") as tmp:
                    torch.save({"state_dict": state, "arch": net.arch, "test_accuracy": accuracy}, tmp)
                os.replace(tmp.name, path)
    saved = torch.load(path, map_location="cpu")
    return load_eval_classifier(saved).to(device), saved["test_accuracy"], path
