"""Typed run configuration: dataclasses, presets, loading from YAML and ``key=value`` overrides, validation.

Every error is a :class:`ConfigError` that names the field (dotted path) and the allowed values.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

STRATEGIES = ("finetune", "joint", "gr", "gd", "partial_generation", "gaussian", "lwf")
DEVICES = ("auto", "cpu", "cuda")
FEATURE_EXTRACTORS = ("auto", "fmnist", "inception")
BACKENDS = ("ray", "inline")
PRECISIONS = ("fp32", "bf16")
CLASSIFIER_STRATEGIES = ("auto", "replay", "finetune", "joint")
REPLAY_SAMPLERS = ("ddim", "progressive", "pid")
FAST_SAMPLER_STRATEGIES = ("gr", "gd")  # whose replay starts from a full sample x0_hat


class ConfigError(ValueError):
    """A config field is wrong. ``str(err)`` reads ``<field>: <what is wrong> (allowed: ...)``."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class DataConfig:
    data_dir: Optional[str] = None  # searched first; then $DISTCL_DATA, the Debian package, the cache dir
    num_tasks: int = 5
    classes_per_task: int = 2
    class_order: Optional[list[int]] = None  # None: torch.manual_seed(seed); torch.randperm(10)
    train_per_class: Optional[int] = None  # cap on training images per class (None: all 6000)
    test_per_class: Optional[int] = None  # cap on test images per class (None: all 1000)

    def validate(self) -> None:
        check_field(self.num_tasks >= 1, "data.num_tasks", f"{self.num_tasks} (allowed: >= 1)")
        check_field(self.classes_per_task >= 1, "data.classes_per_task", f"{self.classes_per_task} (allowed: >= 1)")
        check_field(
            self.num_tasks * self.classes_per_task <= 10,
            "data.num_tasks",
            f"{self.num_tasks} tasks x {self.classes_per_task} classes exceeds the 10 Fashion-MNIST classes",
        )
        if self.class_order is not None:
            check_field(
                sorted(self.class_order) == sorted(set(self.class_order))
                and all(0 <= c <= 9 for c in self.class_order)
                and len(self.class_order) >= self.num_tasks * self.classes_per_task,
                "data.class_order",
                f"{self.class_order} (allowed: distinct labels in 0..9, at least num_tasks x classes_per_task of them)",
            )
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            check_field(value is None or value >= 1, f"data.{name}", f"{value} (allowed: null or >= 1)")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a key of distcl.models.UNET_PRESETS
    sample_size: Optional[int] = None  # None: the preset's own size
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_zero_terminal_snr: bool = False

    def validate(self) -> None:
        from distcl.models import UNET_PRESETS, sample_size_multiple

        check_field(self.preset in UNET_PRESETS, "model.preset", f"{self.preset!r} (allowed: {', '.join(UNET_PRESETS)})")
        if self.sample_size is not None:
            multiple = sample_size_multiple(self.preset)
            check_field(
                self.sample_size >= multiple and self.sample_size % multiple == 0,
                "model.sample_size",
                f"{self.sample_size} does not fit preset {self.preset!r} (allowed: positive multiples of {multiple})",
            )
        check_field(self.num_train_timesteps >= 2, "model.num_train_timesteps", f"{self.num_train_timesteps} (allowed: >= 2)")
        check_field(
            0 < self.beta_start < self.beta_end < 1,
            "model.beta_start",
            f"{self.beta_start}..{self.beta_end} (allowed: 0 < beta_start < beta_end < 1)",
        )


@dataclass
class TrainConfig:
    strategy: str = "gd"
    replay_lambda: float = 3.0  # lambda in L_replay = lambda * MSE(pred', target')
    task_weighting: bool = True  # L = (1-w) L_data + w L_replay with w = 1 - 1/(k+1); off: L_data + L_replay
    teacher_steps: int = 2  # DDIM steps of the teacher's replay generation
    teacher_eta: float = 0.0
    epochs: float = 100.0  # per task, over that task's training data (all data seen so far for joint)
    max_steps: Optional[int] = None  # cap on optimizer steps per task
    batch_size: int = 128  # B real images; replay adds B items
    lr: float = 2e-4
    grad_clip: float = 1.0
    ema_decay: Optional[float] = None  # None: no EMA (the reference's choice)
    log_every: int = 10

    def validate(self) -> None:
        check_field(self.strategy in STRATEGIES, "train.strategy", f"{self.strategy!r} (allowed: {', '.join(STRATEGIES)})")
        check_field(self.replay_lambda >= 0, "train.replay_lambda", f"{self.replay_lambda} (allowed: >= 0)")
        check_field(self.teacher_steps >= 1, "train.teacher_steps", f"{self.teacher_steps} (allowed: >= 1)")
        check_field(0 <= self.teacher_eta <= 1, "train.teacher_eta", f"{self.teacher_eta} (allowed: 0 <= eta <= 1)")
        check_field(self.epochs > 0, "train.epochs", f"{self.epochs} (allowed: > 0)")
        check_field(self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"{self.max_steps} (allowed: null or >= 1)")
        check_field(self.batch_size >= 1, "train.batch_size", f"{self.batch_size} (allowed: >= 1)")
        check_field(self.lr > 0, "train.lr", f"{self.lr} (allowed: > 0)")
        check_field(self.grad_clip > 0, "train.grad_clip", f"{self.grad_clip} (allowed: > 0)")
        check_field(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "train.ema_decay",
            f"{self.ema_decay} (allowed: null or 0 < decay < 1)",
        )
        check_field(self.log_every >= 1, "train.log_every", f"{self.log_every} (allowed: >= 1)")


@dataclass
class EvalConfig:
    num_samples: int = 10000  # generated samples for FID / KLD after every task
    steps: int = 10  # DDIM steps of the evaluation samples
    eta: float = 0.0
    batch_size: int = 500
    feature_extractor: str = "auto"  # auto: Inception when its weights are on disk, else the Fashion-MNIST CNN
    classifier_epochs: int = 2  # training of the cached Fashion-MNIST evaluation classifier

    def validate(self) -> None:
        check_field(self.num_samples >= 2, "eval.num_samples", f"{self.num_samples} (allowed: >= 2)")
        check_field(self.steps >= 1, "eval.steps", f"{self.steps} (allowed: >= 1)")
        check_field(0 <= self.eta <= 1, "eval.eta", f"{self.eta} (allowed: 0 <= eta <= 1)")
        check_field(self.batch_size >= 1, "eval.batch_size", f"{self.batch_size} (allowed: >= 1)")
        check_field(
            self.feature_extractor in FEATURE_EXTRACTORS,
            "eval.feature_extractor",
            f"{self.feature_extractor!r} (allowed: {', '.join(FEATURE_EXTRACTORS)})",
        )
        check_field(self.classifier_epochs >= 1, "eval.classifier_epochs", f"{self.classifier_epochs} (allowed: >= 1)")


@dataclass
class ClassifierConfig:
    """The continual classifier (distcl.solver), trained after every generator task when enabled."""

    enabled: bool = False
    strategy: str = "auto"  # auto: joint / finetune when train.strategy is, else replay from the generator
    epochs: float = 1.0  # passes over the task's data per task
    batch_size: int = 64  # real items per step (and as many replay images)
    lr: float = 1e-3
    replay_steps: int = 10  # DDIM steps of the generator's replay images
    replay_eta: float = 0.0
    temperature: float = 2.0  # of the soft labels

    def validate(self) -> None:
        check_field(self.strategy in CLASSIFIER_STRATEGIES, "classifier.strategy",
               f"{self.strategy!r} (allowed: {', '.join(CLASSIFIER_STRATEGIES)})")  # fmt: skip
        check_field(self.epochs > 0, "classifier.epochs", f"{self.epochs} (allowed: > 0)")
        check_field(self.batch_size >= 1, "classifier.batch_size", f"{self.batch_size} (allowed: >= 1)")
        check_field(self.lr > 0, "classifier.lr", f"{self.lr} (allowed: > 0)")
        check_field(self.replay_steps >= 1, "classifier.replay_steps", f"{self.replay_steps} (allowed: >= 1)")
        check_field(0 <= self.replay_eta <= 1, "classifier.replay_eta", f"{self.replay_eta} (allowed: 0 <= eta <= 1)")
        check_field(self.temperature > 0, "classifier.temperature", f"{self.temperature} (allowed: > 0)")

    def resolved_strategy(self, generator_strategy: str) -> str:
        if self.strategy != "auto":
            return self.strategy
        return generator_strategy if generator_strategy in ("joint", "finetune") else "replay"


@dataclass
class ReplaySamplerConfig:
    """What draws replay's x0_hat (gr, gd): the teacher's own DDIM (``train.teacher_steps``, ``teacher_eta``), or a
    fast student distilled, data-free, from each teacher after its task (distcl.distill): the teacher still
    makes the gd targets. ``iterations`` etc. are the distillation budget per teacher."""

    method: str = "ddim"  # ddim | progressive | pid
    steps: int = 2  # progressive: the student's sampling steps (a halving of start_steps)
    start_steps: int = 8  # progressive: the teacher's DDIM steps, halved stage by stage; its samples are the data
    iterations: int = 300  # updates per progressive stage, or of the PID student
    batch_size: int = 64
    lr: float = 5e-4

    def validate(self) -> None:
        check_field(self.method in REPLAY_SAMPLERS, "replay_sampler.method",
                    f"{self.method!r} (allowed: {', '.join(REPLAY_SAMPLERS)})")  # fmt: skip
        try:  # all fields, also those the method leaves unused: a typo is found before it matters
            for method in ("progressive", "pid"):
                self.distill_config(0, method).validate()
        except ConfigError as err:  # named as this section's fields
            name = {"target_steps": "steps"}.get(err.field, err.field)
            raise ConfigError(f"replay_sampler.{name}", str(err).split(": ", 1)[1]) from None

    def distill_config(self, seed: int, method: Optional[str] = None):
        """The distcl.progressive.ProgressiveConfig (v students, data-free) or distcl.pid.PIDConfig of ``method``
        (default: this one)."""
        from distcl.pid import PIDConfig  # these import this module
        from distcl.progressive import ProgressiveConfig

        if (method or self.method) == "pid":
            return PIDConfig(iterations=self.iterations, batch_size=self.batch_size, lr=self.lr, seed=seed)
        return ProgressiveConfig(start_steps=self.start_steps, target_steps=self.steps, parameterisation="v",
                                 iterations=self.iterations, batch_size=self.batch_size, lr=self.lr, data="teacher",
                                 seed=seed)  # fmt: skip


@dataclass
class RuntimeConfig:
    """Where the work runs: the Ray layout (or ``inline``: one process, replay made on the trainer)."""

    backend: str = "ray"
    address: Optional[str] = None  # None: $RAY_ADDRESS when set, else a new local cluster
    num_cpus: Optional[int] = None  # CPUs of a new local cluster (None: Ray's count)
    num_workers: int = 1  # Ray Train workers; train.batch_size is split among them
    cpus_per_worker: float = 1.0
    worker_resource: Optional[str] = None  # a custom resource each Train worker needs one unit of
    use_gpu: Optional[bool] = None  # None: when the cluster has the Train workers' GPUs beside the samplers'
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction shares a GPU between workers
    num_samplers: int = 2  # teacher sampler actors
    sampler_cpus: float = 1.0
    sampler_gpus: float = 0.0
    sampler_resource: Optional[str] = None  # a custom resource each sampler actor needs one unit of
    replay_depth: int = 4  # in-flight replay requests per Train worker
    checkpoint_every: int = 50  # Train checkpoint every N steps (and at the end of each task)
    max_failures: int = 1  # Train worker-group restarts per task
    replay_timeout_s: float = 600.0  # longest wait for one replay batch before failing the task
    precision: str = "fp32"  # bf16: the student's and the teacher's forwards under bfloat16 autocast, TF32 on CUDA
    deterministic: bool = False  # PyTorch's deterministic algorithms (CUDA: slower, some ops refuse)

    def validate(self) -> None:
        check_field(self.backend in BACKENDS, "runtime.backend", f"{self.backend!r} (allowed: {', '.join(BACKENDS)})")
        check_field(self.num_cpus is None or self.num_cpus >= 1, "runtime.num_cpus", f"{self.num_cpus} (allowed: null or >= 1)")
        check_field(self.num_workers >= 1, "runtime.num_workers", f"{self.num_workers} (allowed: >= 1)")
        check_field(self.cpus_per_worker > 0, "runtime.cpus_per_worker", f"{self.cpus_per_worker} (allowed: > 0)")
        check_field(self.num_samplers >= 1, "runtime.num_samplers", f"{self.num_samplers} (allowed: >= 1)")
        check_field(self.sampler_cpus >= 0, "runtime.sampler_cpus", f"{self.sampler_cpus} (allowed: >= 0)")
        check_field(self.sampler_gpus >= 0, "runtime.sampler_gpus", f"{self.sampler_gpus} (allowed: >= 0)")
        check_field(self.gpus_per_worker > 0, "runtime.gpus_per_worker", f"{self.gpus_per_worker} (allowed: > 0)")
        check_field(self.precision in PRECISIONS, "runtime.precision",
                    f"{self.precision!r} (allowed: {', '.join(PRECISIONS)})")  # fmt: skip
        check_field(self.replay_depth >= 1, "runtime.replay_depth", f"{self.replay_depth} (allowed: >= 1)")
        check_field(self.checkpoint_every >= 1, "runtime.checkpoint_every", f"{self.checkpoint_every} (allowed: >= 1)")
        check_field(self.max_failures >= 0, "runtime.max_failures", f"{self.max_failures} (allowed: >= 0)")
        check_field(self.replay_timeout_s > 0, "runtime.replay_timeout_s", f"{self.replay_timeout_s} (allowed: > 0)")


@dataclass
class RunConfig:
    name: str = "distcl"
    seed: int = 42
    device: str = "auto"  # auto: cuda when available, else cpu
    cache_dir: Optional[str] = None  # None: $DISTCL_CACHE or ~/.cache/distcl
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    replay_sampler: ReplaySamplerConfig = field(default_factory=ReplaySamplerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        check_field(bool(self.name) and "/" not in self.name, "name", f"{self.name!r} (allowed: a non-empty name without '/')")
        check_field(self.seed >= 0, "seed", f"{self.seed} (allowed: >= 0)")
        check_field(self.device in DEVICES, "device", f"{self.device!r} (allowed: {', '.join(DEVICES)})")
        for section in (self.data, self.model, self.train, self.eval, self.classifier, self.replay_sampler,
                        self.runtime):  # fmt: skip
            section.validate()
        check_field(self.replay_sampler.method == "ddim" or self.train.strategy in FAST_SAMPLER_STRATEGIES,
                    "replay_sampler.method", f"{self.replay_sampler.method!r} draws the x0_hat of "
                    f"{' and '.join(FAST_SAMPLER_STRATEGIES)} replay, not of train.strategy {self.train.strategy!r} "
                    "(allowed: ddim)")  # fmt: skip
        if self.runtime.backend == "ray":
            check_field(
                self.train.batch_size % self.runtime.num_workers == 0,
                "train.batch_size",
                f"{self.train.batch_size} is split among {self.runtime.num_workers} Train workers "
                f"(allowed: multiples of runtime.num_workers)",
            )
            check_field(
                self.replay_sampler.method == "ddim" or self.replay_sampler.batch_size % self.runtime.num_workers == 0,
                "replay_sampler.batch_size",
                f"{self.replay_sampler.batch_size} is split among {self.runtime.num_workers} Train workers "
                f"(allowed: multiples of runtime.num_workers)",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # All 5 tasks with gd on a 16x16 tiny UNet; a few minutes at most on 2 CPU cores.
    "smoke": {
        "name": "smoke",
        "model": {"preset": "tiny"},
        "data": {"train_per_class": 300, "test_per_class": 100},
        "train": {"strategy": "gd", "batch_size": 32, "max_steps": 25, "log_every": 5},
        "eval": {"num_samples": 200, "steps": 10, "batch_size": 100},  # a chunk for each of the 2 sampler actors
        "classifier": {"epochs": 2.0, "batch_size": 32, "lr": 2e-3},
    },
    # The benchmark scale on 2 CPU cores (see benchmarks/): the 16x16 tiny UNet, 500 steps per task, and a
    # learning rate of 1e-3 (the reference's 2e-4 suits its 42.9 M model and 100 epochs, not this budget).
    "cpu": {
        "name": "cpu",
        "model": {"preset": "tiny"},
        "data": {"train_per_class": 2000, "test_per_class": 500},
        "train": {"strategy": "gd", "batch_size": 64, "epochs": 8.0, "lr": 1e-3},
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


def load_config(
    path: Optional[str | Path] = None, preset: Optional[str] = None, overrides: Optional[list[str]] = None
) -> RunConfig:
    """Defaults <- preset <- YAML/JSON file <- ``key.sub=value`` overrides, then validate."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError("preset", f"{preset!r} (allowed: {', '.join(PRESETS)})")
        _deep_update(merged, copy.deepcopy(PRESETS[preset]))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("config", f"{path} is not valid YAML/JSON: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("config", f"{path} must hold a mapping of fields, not {type(loaded).__name__}")
        _deep_update(merged, loaded)
    apply_overrides(merged, overrides or [])
    cfg = from_dict(RunConfig, merged)
    cfg.validate()
    return absolute_paths(cfg)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its directories (``data.data_dir``, ``cache_dir``) absolute, resolved against this process's
    working directory: Ray workers, Tune trials and job drivers run in directories of their own."""
    def absolute(path: Optional[str]) -> Optional[str]:
        return str(Path(path).expanduser().resolve()) if path is not None else None

    cfg.data.data_dir, cfg.cache_dir = absolute(cfg.data.data_dir), absolute(cfg.cache_dir)
    return cfg


def apply_overrides(merged: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` items (values parsed as YAML) in the nested mapping ``merged``, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"{item!r} (allowed form: key.sub=value)")
        node = merged
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return merged


def from_dict(cls: type, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by field name."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown field (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if hint is Any:
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list of {inner.__name__}, got {value!r}")
        return [_coerce(inner, v, name) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {name}")


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def check_field(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)
