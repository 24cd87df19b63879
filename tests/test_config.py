from pathlib import Path

import pytest
import yaml

from distcl.cli import main
from distcl.config import PRESETS, RunConfig, load_config
from distcl.settings import ConfigError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_validate(preset):
    cfg = load_config(preset=preset)
    assert isinstance(cfg, RunConfig) and cfg.name == preset


def test_paper_preset_is_the_reference():
    cfg = load_config(preset="paper")
    assert (cfg.model.preset, cfg.train.batch_size, cfg.train.epochs) == ("paper", 128, 100.0)
    assert (cfg.train.replay_lambda, cfg.train.teacher_steps, cfg.train.teacher_eta) == (3.0, 2, 0.0)
    assert (cfg.train.lr, cfg.train.grad_clip, cfg.train.ema_decay) == (2e-4, 1.0, None)
    assert (cfg.eval.steps, cfg.eval.num_samples) == (10, 10000)


def test_torch_threads_are_the_cpus_a_process_holds_unless_chosen():
    rt = load_config(preset="cpu", overrides=["runtime.cpus_per_worker=2.5", "runtime.sampler_cpus=0.5"]).runtime
    assert (rt.threads("worker"), rt.threads("sampler")) == (2, 1)
    rt = load_config(preset="cpu", overrides=["runtime.worker_threads=3", "runtime.sampler_threads=2"]).runtime
    assert (rt.threads("worker"), rt.threads("sampler")) == (3, 2)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 69, "train": {"strategy": "gr", "replay_lambda": 1}}))
    cfg = load_config(path, "smoke", ["train.teacher_steps=10", "data.class_order=[0,1,2,3,4,5,6,7,8,9]"])
    assert cfg.seed == 69 and cfg.train.strategy == "gr" and cfg.train.replay_lambda == 1.0
    assert cfg.train.teacher_steps == 10 and cfg.data.class_order == list(range(10))
    assert cfg.train.max_steps == PRESETS["smoke"]["train"]["max_steps"]  # preset kept below the file
    assert PRESETS["smoke"]["train"].get("teacher_steps") is None  # presets are not mutated


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("train.colour=red", "train.colour", "allowed: strategy, replay_lambda"),
        ("train.batch_size=big", "train.batch_size", "expected an integer"),
        ("train.task_weighting=1", "train.task_weighting", "expected true or false"),
        ("train.strategy=distill", "train.strategy", "allowed: finetune, joint, gr, gd, partial_generation"),
        ("train.replay_lambda=-0.5", "train.replay_lambda", "allowed: >= 0"),
        ("train.teacher_steps=0", "train.teacher_steps", "allowed: >= 1"),
        ("eval.steps=0", "eval.steps", "allowed: >= 1"),
        ("train.teacher_eta=1.5", "train.teacher_eta", "0 <= value <= 1"),
        ("eval.eta=-0.1", "eval.eta", "0 <= value <= 1"),
        ("model.sample_size=30", "model.sample_size", "multiples of 4"),
        ("model.preset=huge", "model.preset", "allowed: tiny, small, paper"),
        ("data.class_order=[1,1,2,3,4,5,6,7,8,9]", "data.class_order", "distinct labels"),
        ("device=tpu", "device", "allowed: auto, cpu, cuda"),
        ("replay_sampler.method=lcm", "replay_sampler.method", "allowed: ddim, progressive, pid"),
        ("replay_sampler.steps=3", "replay_sampler.steps", "not reachable by halving 8"),
        ("replay_sampler.iterations=0", "replay_sampler.iterations", "allowed: >= 1"),
        ("runtime.worker_threads=0", "runtime.worker_threads", "allowed: null or >= 1"),
    ],
)
def test_bad_fields_are_named_with_allowed_values(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=[override])
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and allowed in str(err.value)


def test_paper_model_rejects_28_pixels():
    with pytest.raises(ConfigError, match=r"model.sample_size: 28 does not fit preset 'paper'.*multiples of 8"):
        load_config(preset="paper", overrides=["model.sample_size=28"])


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out), "--set", "train.strategy=nope"]) == 2
    assert "train.strategy" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  replay_lambda: -1\n")
    assert main(["run", str(bad), "--out", str(out)]) == 2
    assert "train.replay_lambda: -1 (allowed: >= 0)" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path(tmp_path / "nope.yaml"))


def test_fast_replay_sampler_only_for_replay_that_samples_x0():
    with pytest.raises(ConfigError, match="replay_sampler.method: 'pid' draws the x0_hat of gr and gd replay"):
        load_config(preset="smoke", overrides=["replay_sampler.method=pid", "train.strategy=gaussian"])
    cfg = load_config(preset="smoke", overrides=["replay_sampler.method=pid", "train.strategy=gr"])
    assert (cfg.replay_sampler.method, cfg.train.strategy) == ("pid", "gr")


def test_a_config_saved_by_an_older_distcl_loads_in_todays_fields(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {preset: tiny, channels: 1}\ndata: {source: fashion_mnist}\n")
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.data.channels == 1 and cfg.data.image_channels == 1 and not hasattr(cfg.model, "channels")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("distcl.launch.run", interrupted)
    assert main(["run", "--preset", "smoke", "--inline", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distcl: run interrupted: run the same command again to resume"]
