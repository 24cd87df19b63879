"""The run config's sections, the distillation methods' settings, the UNet and run presets, loading from YAML and
``key=value`` overrides. Each field declares its type, bounds and choices once (distcl.settings); the rules
between fields are each section's ``__post_init__``. On the ground floor: it imports only distcl.settings."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from annotated_types import Ge, Interval, Len

from distcl.settings import (
    ConfigError,
    Count,
    Eta,
    Flag,
    Int,
    NonNegative,
    Positive,
    Real,
    Text,
    check_field,
    choices,
    from_dict,
    settings,
)

Strategy = Literal["finetune", "joint", "gr", "gd", "partial_generation", "gaussian", "lwf"]
Device = Literal["auto", "cpu", "cuda"]
FeatureExtractor = Literal["auto", "fmnist", "inception"]  # auto: Inception when its weights are on disk
Backend = Literal["ray", "inline"]
Precision = Literal["fp32", "bf16"]
ClassifierStrategy = Literal["auto", "replay", "finetune", "joint"]
ReplaySampler = Literal["ddim", "progressive", "pid"]
DEVICES = choices(Device)
FAST_SAMPLER_STRATEGIES = ("gr", "gd")  # whose replay starts from a full sample x0_hat

_SMALL_UNET = dict(
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
UNET_PRESETS: dict[str, dict] = {  # diffusers UNet2DModel arguments (distcl.models.build_unet)
    # CPU presets (about 0.3 M parameters).
    "tiny": dict(sample_size=16, **_SMALL_UNET),
    "small": dict(sample_size=28, **_SMALL_UNET),
    # The reference's "ddim_medium" (Masip et al.): about 42.9 M parameters.
    "paper": dict(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=(64, 128, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ),
}
UNetPreset = Literal[tuple(UNET_PRESETS)]


def sample_size_multiple(preset: str) -> int:
    """A UNet with n blocks downsamples n - 1 times: its input side must be a multiple of 2^(n-1)."""
    return 2 ** (len(UNET_PRESETS[preset]["block_out_channels"]) - 1)


def check_halving(start_steps: int, target_steps: int, name: str) -> None:
    """Progressive distillation halves the step count: ``target_steps`` = start_steps / 2^m, m >= 1."""
    halvings = math.log2(start_steps / target_steps) if target_steps <= start_steps else -1
    check_field(
        halvings >= 1 and halvings == int(halvings),
        name,
        f"{target_steps} is not reachable by halving {start_steps} (allowed: start_steps / 2^m, m >= 1)",
    )


def check_worker_split(batch_size: int, num_workers: int, name: str) -> None:
    """A batch is split into equal shards, one per Ray Train worker."""
    check_field(
        batch_size % num_workers == 0,
        name,
        f"{batch_size} is split among {num_workers} Train workers (allowed: multiples of runtime.num_workers)",
    )


Source = Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder"]
SOURCE_CHANNELS = {"fashion_mnist": 1, "mnist": 1, "cifar10": 3, "cifar100": 3, "image_folder": 3}
ClassRef = Annotated[Int, Ge(0)] | Text  # a class by index or by name


@settings
class DataConfig:
    """The images and their split into tasks (distcl.data). ``tasks`` lists each task's classes (by index or
    name, groups of any size); else ``num_tasks`` tasks of ``classes_per_task`` classes in the seeded order
    (``class_order`` when given). Rules that need the data's classes are checked when it is read."""

    source: Source = "fashion_mnist"
    data_dir: Optional[Text] = None  # searched first (image_folder: required); then $DISTCL_DATA, Debian, the cache
    channels: Optional[Literal[1, 3]] = None  # None: the source's (1: Fashion-MNIST, MNIST; 3: CIFAR, folders)
    tasks: Optional[list[Annotated[list[ClassRef], Len(min_length=1)]]] = None
    num_tasks: Optional[Count] = None  # None: len(tasks), else 5
    classes_per_task: Count = 2
    class_order: Optional[list[Annotated[Int, Ge(0)]]] = None  # None: seeded randperm(number of classes)
    train_per_class: Optional[Count] = None  # cap on training images per class (None: all)
    test_per_class: Optional[Count] = None  # cap on test images per class (None: all)
    test_fraction: Annotated[Real, Interval(gt=0, lt=1)] = 0.1  # image_folder without test/: held out per class
    # image_folder on Ray: the training images stream from their files to the Train workers (Ray Data); the driver
    # reads only the test images and driver_per_class training images a class (the evaluation network's)
    stream: Flag = False
    driver_per_class: Count = 1000

    @property
    def image_channels(self) -> int:
        """``channels``, else the source's: what the images and the UNet have (the field stays as given)."""
        return self.channels or SOURCE_CHANNELS[self.source]

    def __post_init__(self) -> None:
        if self.tasks is not None:
            check_field(
                self.num_tasks in (None, len(self.tasks)),
                "data.num_tasks",
                f"{self.num_tasks} but data.tasks lists {len(self.tasks)} tasks (allowed: null or {len(self.tasks)})",
            )
            refs = [c for group in self.tasks for c in group]
            check_field(
                len(set(refs)) == len(refs),
                "data.tasks",
                f"{self.tasks}: a class is in more than one task (allowed: disjoint groups)",
            )
        self.num_tasks = self.num_tasks or (len(self.tasks) if self.tasks is not None else 5)
        check_field(
            not self.stream or self.source == "image_folder",
            "data.stream",
            f"true streams an image folder, not data.source {self.source!r} (allowed: false, or image_folder)",
        )
        order = self.class_order
        check_field(
            order is None or len(set(order)) == len(order),
            "data.class_order",
            f"{order} (allowed: distinct labels, at least num_tasks x classes_per_task of them)",
        )


@settings
class ModelConfig:
    preset: UNetPreset = "tiny"
    sample_size: Optional[Count] = None  # None: the preset's own size
    num_train_timesteps: Annotated[Int, Ge(2)] = 1000
    beta_start: Annotated[Real, Interval(gt=0, lt=1)] = 1e-4
    beta_end: Annotated[Real, Interval(gt=0, lt=1)] = 0.02
    rescale_zero_terminal_snr: Flag = False

    def __post_init__(self) -> None:
        multiple = sample_size_multiple(self.preset)
        check_field(
            self.sample_size is None or self.sample_size % multiple == 0,
            "model.sample_size",
            f"{self.sample_size} does not fit preset {self.preset!r} (allowed: positive multiples of {multiple})",
        )
        check_field(
            self.beta_start < self.beta_end,
            "model.beta_start",
            f"{self.beta_start}..{self.beta_end} (allowed: beta_start < beta_end)",
        )


@settings
class TrainConfig:
    strategy: Strategy = "gd"
    replay_lambda: NonNegative = 3.0  # lambda in L_replay = lambda * MSE(pred', target')
    task_weighting: Flag = True  # L = (1-w) L_data + w L_replay with w = 1 - 1/(k+1); off: L_data + L_replay
    teacher_steps: Count = 2  # DDIM steps of the teacher's replay generation
    teacher_eta: Eta = 0.0
    # partial_generation's t': "grid", one of the teacher_steps DDIM timesteps (with 2: 999 or 499), the state
    # where the teacher's DDIM reaches it; "uniform", any of 0..T-1 with teacher_steps DDIM steps spaced down to
    # it (the reference's)
    partial_t: Literal["grid", "uniform"] = "grid"
    epochs: Positive = 100.0  # per task, over that task's training data (all data seen so far for joint)
    max_steps: Optional[Count] = None  # cap on optimizer steps per task
    batch_size: Count = 128  # B real images; replay adds B items
    lr: Positive = 2e-4
    grad_clip: Positive = 1.0
    ema_decay: Optional[Annotated[Real, Interval(gt=0, lt=1)]] = None  # None: no EMA (the reference's choice)
    log_every: Count = 10


@settings
class EvalConfig:
    num_samples: Annotated[Int, Ge(2)] = 10000  # generated samples for FID / KLD after every task
    steps: Count = 10  # DDIM steps of the evaluation samples
    eta: Eta = 0.0
    batch_size: Count = 500
    feature_extractor: FeatureExtractor = "auto"  # else the Fashion-MNIST CNN
    classifier_epochs: Count = 2  # epochs of the cached evaluation network (at least eval_net.MIN_STEPS steps)


@settings
class ClassifierConfig:
    """The continual classifier (distcl.solver), trained after every generator task when enabled."""

    enabled: Flag = False
    strategy: ClassifierStrategy = "auto"  # auto: joint / finetune when train.strategy is, else replay
    epochs: Positive = 1.0  # passes over the task's data per task
    batch_size: Count = 64  # real items per step (and as many replay images)
    lr: Positive = 1e-3
    replay_steps: Count = 10  # DDIM steps of the generator's replay images
    replay_eta: Eta = 0.0
    temperature: Positive = 2.0  # of the soft labels

    def resolved_strategy(self, generator_strategy: str) -> str:
        if self.strategy != "auto":
            return self.strategy
        return generator_strategy if generator_strategy in ("joint", "finetune") else "replay"


@settings
class ReplaySamplerConfig:
    """What draws replay's x0_hat (gr, gd): the teacher's own DDIM (``train.teacher_steps``, ``teacher_eta``), or a
    fast student distilled, data-free, from each teacher after its task (distcl.distill): the teacher still
    makes the gd targets. ``iterations`` etc. are the distillation budget per teacher."""

    method: ReplaySampler = "ddim"
    steps: Count = 2  # progressive: the student's sampling steps (a halving of start_steps)
    start_steps: Annotated[Int, Ge(2)] = 8  # progressive: the teacher's DDIM steps, halved stage by stage
    iterations: Count = 300  # updates per progressive stage, or of the PID student
    batch_size: Count = 64
    lr: Positive = 5e-4

    def __post_init__(self) -> None:  # also when the method is not progressive: a typo is found before it matters
        check_halving(self.start_steps, self.steps, "replay_sampler.steps")


@settings
class RuntimeConfig:
    """Where the work runs: the Ray layout (or ``inline``: one process, replay made on the trainer)."""

    backend: Backend = "ray"
    address: Optional[Text] = None  # None: $RAY_ADDRESS when set, else a new local cluster
    num_cpus: Optional[Count] = None  # CPUs of a new local cluster (None: Ray's count)
    num_workers: Count = 1  # Ray Train workers; train.batch_size is split among them
    cpus_per_worker: Positive = 1.0
    worker_threads: Optional[Count] = None  # torch threads of each Train worker (None: its CPUs, at least 1)
    worker_resource: Optional[Text] = None  # a custom resource each Train worker needs one unit of
    use_gpu: Optional[Flag] = None  # None: when the cluster has the Train workers' GPUs beside the samplers'
    gpus_per_worker: Positive = 1.0  # with use_gpu; a fraction shares a GPU between workers
    num_samplers: Count = 2  # teacher sampler actors
    sampler_cpus: NonNegative = 1.0
    sampler_threads: Optional[Count] = None  # torch threads of each sampler actor (None: its CPUs, at least 1)
    sampler_gpus: NonNegative = 0.0
    sampler_resource: Optional[Text] = None  # a custom resource each sampler actor needs one unit of
    data_cpus: NonNegative = 0.0  # each Ray Data task of a streamed folder (0: beside the workers and samplers)
    replay_depth: Count = 4  # in-flight replay requests per Train worker
    checkpoint_every: Count = 50  # Train checkpoint every N steps (and at the end of each task)
    max_failures: Annotated[Int, Ge(0)] = 1  # Train worker-group restarts per task
    overlap: Flag = True  # the continual classifier and the evaluation of task k run while task k+1 trains
    replay_timeout_s: Positive = 600.0  # longest wait for one replay batch before failing the task
    precision: Precision = "fp32"  # bf16: the forwards under bfloat16 autocast, TF32 on CUDA
    deterministic: Flag = False  # PyTorch's deterministic algorithms (CUDA: slower, some ops refuse)

    def threads(self, role: Literal["worker", "sampler"]) -> int:
        """Torch threads of a Train worker or a sampler actor: ``worker_threads`` / ``sampler_threads``, else the
        CPUs it holds (Ray's own OMP_NUM_THREADS rule), at least 1. More than its CPUs can use cores the others
        leave idle; on 2 cores a Train worker on 2 threads ran slower (benchmarks/thin_driver.py, part threads)."""
        if role == "worker":
            chosen, cpus = self.worker_threads, self.cpus_per_worker
        else:
            chosen, cpus = self.sampler_threads, self.sampler_cpus
        return chosen if chosen is not None else max(1, int(cpus))


@settings
class TrackingConfig:
    """Where the run is tracked (distcl.tracking): an MLflow tracking URI (``sqlite:///PATH``, ``http://HOST:PORT``,
    ``databricks``), None: not tracked. Not part of the results: it may change between resumes."""

    mlflow: Optional[Text] = None
    experiment: Optional[Text] = None  # None: the run's (or the sweep's) name


@settings
class RunConfig:
    name: Text = "distcl"
    seed: Annotated[Int, Ge(0)] = 42
    device: Device = "auto"  # auto: cuda when available, else cpu
    cache_dir: Optional[Text] = None  # None: $DISTCL_CACHE or ~/.cache/distcl
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    replay_sampler: ReplaySamplerConfig = field(default_factory=ReplaySamplerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_field(
            self.replay_sampler.method == "ddim" or self.train.strategy in FAST_SAMPLER_STRATEGIES,
            "replay_sampler.method",
            f"{self.replay_sampler.method!r} draws the x0_hat of "
            f"{' and '.join(FAST_SAMPLER_STRATEGIES)} replay, not of train.strategy {self.train.strategy!r} "
            "(allowed: ddim)",
        )
        if self.data.stream:
            check_field(
                self.runtime.backend == "ray",
                "data.stream",
                "true streams to Ray Train workers, not with runtime.backend 'inline' (allowed: false)",
            )
            check_field(
                not self.classifier.enabled,
                "data.stream",
                "true with classifier.enabled: the continual classifier trains on images in memory (allowed: "
                "false, or classifier.enabled=false)",
            )
        if self.runtime.backend == "ray":
            check_worker_split(self.train.batch_size, self.runtime.num_workers, "train.batch_size")
            if self.replay_sampler.method != "ddim":
                check_worker_split(
                    self.replay_sampler.batch_size, self.runtime.num_workers, "replay_sampler.batch_size"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_name(name: str, field_name: str) -> None:
    """Names become directory names."""
    check_field(bool(name) and "/" not in name, field_name, f"{name!r} (allowed: a non-empty name without '/')")


@settings
class ProgressiveConfig:
    """Progressive distillation (distcl.progressive; ``distcl distill progressive --set key=value``)."""

    start_steps: Annotated[Int, Ge(2)] = 8  # the teacher's DDIM steps that the first student halves
    target_steps: Count = 1  # the last student's steps: start_steps / 2^m
    parameterisation: Literal["x", "v"] = "v"  # what the students predict
    iterations: Count = 500  # updates per halving stage
    batch_size: Count = 64
    lr: Positive = 2e-4
    data: Literal["teacher", "fmnist"] = "teacher"  # teacher: its own start_steps-step DDIM samples (data-free)
    seed: Annotated[Int, Ge(0)] = 0

    def __post_init__(self) -> None:
        check_halving(self.start_steps, self.target_steps, "target_steps")

    def stages(self) -> list[int]:
        """The students' step counts: start/2, start/4, ..., target."""
        return [self.start_steps >> m for m in range(1, round(math.log2(self.start_steps / self.target_steps)) + 1)]


@settings
class PIDConfig:
    """Physics-informed distillation (distcl.pid; ``distcl distill pid --set key=value``)."""

    grid_points: Annotated[Int, Ge(3)] = 250  # N of the EDM time grid (the paper's scripts: 250)
    rho: Positive = 7.0
    difference: Literal["first", "central"] = "first"
    iterations: Count = 1000
    batch_size: Count = 32
    lr: Positive = 1e-4
    seed: Annotated[Int, Ge(0)] = 0


PRESETS: dict[str, dict[str, Any]] = {
    # All 5 tasks with gd on a 16x16 tiny UNet, sized to a 2-core laptop (one Train worker, one sampler actor);
    # a minute or two on 2 CPU cores.
    "smoke": {
        "name": "smoke",
        "model": {"preset": "tiny"},
        "data": {"train_per_class": 300, "test_per_class": 100},
        "train": {"strategy": "gd", "batch_size": 32, "max_steps": 25, "log_every": 5},
        "eval": {"num_samples": 200, "steps": 10, "batch_size": 100},
        "runtime": {"num_samplers": 1},
        "classifier": {"epochs": 2.0, "batch_size": 32, "lr": 2e-3},
    },
    # The benchmark scale on 2 CPU cores (see benchmarks/): the 16x16 tiny UNet, 500 steps per task, and a
    # learning rate of 1e-3 (the reference's 2e-4 suits its 42.9 M model and 100 epochs, not this budget); gd's
    # lambda 0.3 with 10 teacher steps: the best by mean final FID and KLD of tuning/gd_lambda.yaml over 3 seeds
    # (README, Results; a rank-sum tie with lambda 1 at 2 and at 10 steps, broken by its lower FID).
    "cpu": {
        "name": "cpu",
        "model": {"preset": "tiny"},
        "data": {"train_per_class": 2000, "test_per_class": 500},
        "train": {
            "strategy": "gd",
            "batch_size": 64,
            "epochs": 8.0,
            "lr": 1e-3,
            "replay_lambda": 0.3,
            "teacher_steps": 10,
        },
        "eval": {"num_samples": 1000, "steps": 10},
        "classifier": {"epochs": 2.0},
    },
    # The reference's scale (Masip et al.): needs a GPU for each Train worker; the teacher samplers share GPUs
    # (4 to a GPU), student and teacher in bf16.
    "paper": {
        "name": "paper",
        "model": {"preset": "paper"},
        "train": {"strategy": "gd", "batch_size": 128, "epochs": 100.0, "replay_lambda": 3.0, "teacher_steps": 2},
        "eval": {"num_samples": 10000, "steps": 10},
        "runtime": {"use_gpu": True, "sampler_gpus": 0.25, "precision": "bf16"},
    },
}


def upgraded(loaded: dict[str, Any]) -> dict[str, Any]:
    """A config file written by an older distcl, in today's fields: ``model.channels`` (the UNet's, before the
    data's channels decided them) is ``data.channels``."""
    model = loaded.get("model")
    if isinstance(model, dict) and "channels" in model:
        channels = model.pop("channels")
        data = loaded.setdefault("data", {})
        if isinstance(data, dict) and data.get("channels") is None:
            data["channels"] = channels
    return loaded


def load_config(
    path: Optional[str | Path] = None, preset: Optional[str] = None, overrides: Optional[list[str]] = None
) -> RunConfig:
    """Defaults <- preset <- YAML/JSON file <- ``key.sub=value`` overrides, validated; directories absolute."""
    merged: dict[str, Any] = {}
    if preset is not None:
        check_field(preset in PRESETS, "preset", f"{preset!r} (allowed: {', '.join(PRESETS)})")
        deep_update(merged, copy.deepcopy(PRESETS[preset]))
    if path is not None:
        path = Path(path)
        check_field(path.is_file(), "config", f"file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("config", f"{path} is not valid YAML/JSON: {err}") from None
        check_field(
            isinstance(loaded, dict), "config", f"{path} must hold a mapping of fields, not {type(loaded).__name__}"
        )
        deep_update(merged, upgraded(loaded))
    apply_overrides(merged, overrides or [])
    return absolute_paths(from_dict(RunConfig, merged))


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its directories (``data.data_dir``, ``cache_dir``) absolute, resolved against this process's
    working directory: Ray workers, Tune trials and job drivers run in directories of their own."""

    def absolute(path: Optional[str]) -> Optional[str]:
        return str(Path(path).expanduser().resolve()) if path is not None else None

    cfg.data.data_dir, cfg.cache_dir = absolute(cfg.data.data_dir), absolute(cfg.cache_dir)
    cfg.tracking.mlflow = tracking_uri(cfg.tracking.mlflow)
    return cfg


def tracking_uri(uri: Optional[str]) -> Optional[str]:
    """An MLflow tracking URI with a local store's path absolute: ``sqlite:///rel.db`` and a bare path ``x.db``
    become ``sqlite:////abs/x.db``; server and other URIs unchanged."""
    if uri is None or ("://" in uri and not uri.startswith("sqlite:///")):
        return uri
    path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    return f"sqlite:///{path}"


def apply_overrides(merged: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` items (values parsed as YAML) in the nested mapping ``merged``, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        check_field(bool(sep and key), "--set", f"{item!r} (allowed form: key.sub=value)")
        node = merged
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            check_field(isinstance(node, dict), key, "is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return merged


def deep_update(base: dict, extra: dict) -> None:
    """``extra``'s fields set in the nested mapping ``base``, section by section, in place."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
