"""A simulated multi-node cluster (ray.cluster_utils.Cluster): a head that schedules nothing, a sampler node
with the custom resource sampler actors ask for, a training node. Each kind of work lands on its node, and the
continual classifier's replay images come from the sampler actors, which also evaluate; the actors start once."""
import json

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from distcl.config import load_config
from distcl.runtime.pipeline import run

pytestmark = pytest.mark.slow


def test_samplers_and_train_workers_land_on_their_nodes(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    sampler_node = cluster.add_node(num_cpus=1, num_gpus=0, resources={"sampler_slot": 2})
    train_node = cluster.add_node(num_cpus=1, num_gpus=0, resources={"trainer_slot": 1})
    ray.init(address=cluster.address)
    try:
        cfg = load_config(preset="smoke", overrides=[
            "data.num_tasks=2", "train.max_steps=3", "eval.num_samples=100", "runtime.num_samplers=1",
            "runtime.sampler_resource=sampler_slot", "runtime.worker_resource=trainer_slot",
            "classifier.enabled=true", "classifier.epochs=0.2",
        ])  # fmt: skip
        run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
        started = {name: len(list_actors(filters=[("class_name", "=", name)], detail=True))  # alive or dead
                   for name in ("TeacherSampler", "RayTrainWorker")}  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    for task in ("task_0", "task_1"):  # the samplers evaluate task 0, and replay teacher 0 in task 1
        assert placement[task] == {"train_workers": [train_node.node_id], "samplers": [sampler_node.node_id]}
    assert started == {"TeacherSampler": 1, "RayTrainWorker": 1}  # once per run, not per task
    assert (tmp_path / "run" / "task_1" / "unet").is_dir()
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert sorted(metrics[metrics.metric == "accuracy"].task) == [0, 1]
