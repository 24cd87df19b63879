from pathlib import Path

import jsonschema
import pytest
import yaml

from distcl.config import RuntimeConfig, load_config
from distcl.runtime.cluster import validate_cluster_config, validate_rayjob_manifest
from distcl.runtime.pipeline import layout_needs
from distcl.runtime.workers import resolve_use_gpu

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    config = validate_cluster_config(CLUSTER)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0  # the head schedules nothing
    assert nodes["gpu_trainer"]["resources"]["GPU"] >= 1 and nodes["gpu_trainer"]["max_workers"] > 0
    assert nodes["sampler"]["resources"]["sampler_slot"] > 0  # what runtime.sampler_resource asks for
    assert "trainer_slot" in nodes["gpu_trainer"]["resources"] and "trainer_slot" not in nodes["sampler"]["resources"]
    assert "runtime.worker_resource=trainer_slot" in CLUSTER.read_text()  # the job command asks for it
    assert config["idle_timeout_minutes"] > 0 and config["provider"]["type"] == "aws"
    assert any("install.sh" in c for c in config["setup_commands"])


def test_misspelled_key_is_caught(tmp_path):
    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["sampler"]["max_worker"] = 3  # for max_workers
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_cluster_config(bad)


RAYJOB = Path(__file__).resolve().parents[1] / "k8s" / "rayjob.yaml"


def test_kuberay_rayjob_has_required_fields():
    manifest = validate_rayjob_manifest(RAYJOB)
    assert "jobs/train_cl.py" in manifest["spec"]["entrypoint"]
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    sampler = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "sampler")
    assert "sampler_slot" in sampler["rayStartParams"]["resources"]
    trainer = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-trainer")
    assert "trainer_slot" in trainer["rayStartParams"]["resources"]
    assert "runtime.worker_resource=trainer_slot" in manifest["spec"]["entrypoint"]


@pytest.mark.parametrize("breaks, message", [
    (lambda m: m["spec"].pop("entrypoint"), "spec.entrypoint is missing"),
    (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=9), "minReplicas <= replicas"),
    (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
     "need an image"),
])  # fmt: skip
def test_kuberay_rayjob_missing_fields_are_named(tmp_path, breaks, message):
    manifest = yaml.safe_load(RAYJOB.read_text())
    breaks(manifest)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ValueError, match=message):
        validate_rayjob_manifest(bad)


@pytest.mark.parametrize("gpus, rt, expected", [
    (0, {}, False),
    (1, {}, True),
    (1, {"num_workers": 2}, False),
    (1, {"num_workers": 2, "gpus_per_worker": 0.5}, True),
    (1, {"use_gpu": False}, False),
    (0, {"use_gpu": True}, True),  # explicit: the layout check refuses it on this cluster
])  # fmt: skip
def test_train_workers_use_the_gpus_left_by_the_samplers(gpus, rt, expected):
    assert resolve_use_gpu(RuntimeConfig(**rt), gpus) is expected
    assert resolve_use_gpu(RuntimeConfig(**rt), gpus + 0.5, sampler_gpus=0.5) is expected


def test_layout_counts_the_workers_and_the_samplers_gpus():
    cfg = load_config(preset="paper", overrides=["runtime.num_workers=2", "runtime.gpus_per_worker=0.5"])
    assert cfg.runtime.use_gpu is True and cfg.runtime.precision == "bf16"
    assert layout_needs(cfg, use_gpu=True)["GPU"] == 2 * 0.5 + 2 * 0.25
    assert layout_needs(cfg, use_gpu=False)["GPU"] == 2 * 0.25
    assert "GPU" not in layout_needs(load_config(preset="cpu"), use_gpu=False)
