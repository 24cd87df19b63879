from pathlib import Path

import jsonschema
import pytest
import yaml

from distcl.cli import main
from distcl.config import RuntimeConfig, load_config
from distcl.runtime.cluster import validate_cluster_config, validate_rayjob_manifest
from distcl.runtime.pipeline import layout_needs
from distcl.runtime.twin import HEAD_TYPE, node_type_of, twin_config
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


@pytest.mark.parametrize(
    "breaks, message",
    [
        (lambda m: m["spec"].pop("entrypoint"), "spec.entrypoint is missing"),
        (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=9), "minReplicas <= replicas"),
        (
            lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
            "need an image",
        ),
    ],
)
def test_kuberay_rayjob_missing_fields_are_named(tmp_path, breaks, message):
    manifest = yaml.safe_load(RAYJOB.read_text())
    breaks(manifest)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ValueError, match=message):
        validate_rayjob_manifest(bad)


@pytest.mark.parametrize(
    "gpus, rt, expected",
    [
        (0, {}, False),
        (1, {}, True),
        (1, {"num_workers": 2}, False),
        (1, {"num_workers": 2, "gpus_per_worker": 0.5}, True),
        (1, {"use_gpu": False}, False),
        (0, {"use_gpu": True}, True),  # explicit: the layout check refuses it on this cluster
    ],
)
def test_train_workers_use_the_gpus_left_by_the_samplers(gpus, rt, expected):
    assert resolve_use_gpu(RuntimeConfig(**rt), gpus) is expected
    assert resolve_use_gpu(RuntimeConfig(**rt), gpus + 0.5, sampler_gpus=0.5) is expected


def test_layout_counts_the_workers_and_the_samplers_gpus():
    cfg = load_config(preset="paper", overrides=["runtime.num_workers=2", "runtime.gpus_per_worker=0.5"])
    assert cfg.runtime.use_gpu is True and cfg.runtime.precision == "bf16"
    assert layout_needs(cfg, use_gpu=True)["GPU"] == 2 * 0.5 + 2 * 0.25
    assert layout_needs(cfg, use_gpu=False)["GPU"] == 2 * 0.25
    assert "GPU" not in layout_needs(load_config(preset="cpu"), use_gpu=False)


def test_the_twin_of_cluster_yaml_has_its_node_types_shrunk_to_this_machine():
    twin = twin_config(
        validate_cluster_config(CLUSTER),
        "10.0.0.1:6379",
        "/tmp/t",
        idle_timeout_s=12,
        max_node_cpus=1,
        max_nodes_per_type=2,
    )
    types = twin["available_node_types"]
    assert twin["head_node_type"] == HEAD_TYPE and types[HEAD_TYPE]["resources"] == {"CPU": 0}
    assert types["gpu_trainer"] == {
        "resources": {"CPU": 1, "trainer_slot": 1},
        "min_workers": 0,
        "max_workers": 2,
        "node_config": {},
    }  # GPUs mapped to none, CPUs and node count capped
    assert types["sampler"]["resources"] == {"CPU": 1, "sampler_slot": 4} and types["sampler"]["max_workers"] == 2
    assert twin["max_workers"] == 4 and twin["upscaling_speed"] == 1.0 and twin["idle_timeout_minutes"] == 12 / 60
    provider = twin["provider"]
    assert provider["module"] == "distcl.runtime.twin_provider.TwinNodeProvider"
    assert provider["gcs_address"] == "10.0.0.1:6379" and provider["node_temp_dir"] == "/tmp/t"
    kept = twin_config(validate_cluster_config(CLUSTER), "a:1", "/tmp/t", 60, keep_gpus=True)
    assert kept["available_node_types"]["sampler"]["resources"] == {"CPU": 4, "GPU": 1, "sampler_slot": 4}
    assert kept["max_workers"] == 12  # the file's
    node = {"CPU": 1.0, "trainer_slot": 1.0, "memory": 1e9, "object_store_memory": 1e8, "node:10.0.0.2": 1.0}
    assert node_type_of(node, {k: v for k, v in types.items() if k != HEAD_TYPE}) == "gpu_trainer"


def test_twin_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: aws}\navailable_node_types: {}\nhead_node_type: nope\n")
    assert main(["cluster", "local", str(bad)]) == 2
    assert main(["cluster", "local", str(CLUSTER), "--max-node-cpus", "0"]) == 2
    other = tmp_path / "cluster.yaml"  # a cluster name of its own: a twin of cluster.yaml may run on this machine
    other.write_text(CLUSTER.read_text().replace("cluster_name: distcl", "cluster_name: distcl-test-nothing"))
    assert main(["cluster", "local", "--preempt", "sampler", str(other)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("distcl: config error: ") for line in err), err
    assert "--max-node-cpus: 0.0 (allowed: > 0)" in err[1] and "no twin of 'distcl-test-nothing' runs" in err[2]
    assert main(["cluster", "local", "--down", str(other)]) == 0
    assert "no twin of 'distcl-test-nothing' runs" in capsys.readouterr().out
