from pathlib import Path

import jsonschema
import pytest
import yaml

from distcl.runtime.cluster import validate_cluster_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    config = validate_cluster_config(CLUSTER)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0  # the head schedules nothing
    assert nodes["gpu_trainer"]["resources"]["GPU"] >= 1 and nodes["gpu_trainer"]["max_workers"] > 0
    assert nodes["sampler"]["resources"]["sampler_slot"] > 0  # what runtime.sampler_resource asks for
    assert config["idle_timeout_minutes"] > 0 and config["provider"]["type"] == "aws"
    assert any("install.sh" in c for c in config["setup_commands"])


def test_misspelled_key_is_caught(tmp_path):
    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["sampler"]["max_worker"] = 3  # for max_workers
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_cluster_config(bad)
