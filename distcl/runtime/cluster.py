"""The cluster: joining one (or starting a local one), what it can hold (its nodes, or under an autoscaler the
nodes its node types can start), and the offline check of a Ray cluster launcher config (cluster.yaml): Ray 2.60
has no dry run, so this wraps its private ``prepare_config`` + ``validate_config`` (the schema check ``ray up``
runs) in one place."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
import ray
import yaml
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distcl.config import RuntimeConfig


def validate_cluster_config(path: str | Path) -> dict:
    """The prepared config (defaults filled in); raises jsonschema.ValidationError on a misspelled key or a bad
    node type, ValueError on a non-mapping."""
    from ray.autoscaler._private.util import logger, prepare_config, validate_config  # private API, only here

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config is a mapping")
    level = logger.level
    logger.setLevel("WARNING")  # not its INFO line about the head's max workers
    try:
        prepared = prepare_config(copy.deepcopy(config))
    finally:
        logger.setLevel(level)
    validate_config(prepared)
    return prepared


def validate_rayjob_manifest(path: str | Path) -> dict:
    """Check a KubeRay ``RayJob`` manifest for the fields the operator needs (no cluster here to apply it to):
    apiVersion ray.io/v1, metadata.name, spec.entrypoint, a head group and worker groups, each with
    rayStartParams and a pod template whose containers have an image, and minReplicas <= replicas <=
    maxReplicas. Raises ValueError naming the missing or wrong field."""
    manifest = yaml.safe_load(Path(path).read_text())

    def need(node, dotted: str, kind: type = object):
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path}: {dotted} is missing")
            node = node[part]
        if not isinstance(node, kind):
            raise ValueError(f"{path}: {dotted} must be a {kind.__name__}")
        return node

    if need(manifest, "apiVersion", str) != "ray.io/v1" or need(manifest, "kind", str) != "RayJob":
        raise ValueError(f"{path}: apiVersion/kind must be ray.io/v1 RayJob")
    need(manifest, "metadata.name", str)
    need(manifest, "spec.entrypoint", str)
    cluster = need(manifest, "spec.rayClusterSpec", dict)
    groups = {"headGroupSpec": need(cluster, "headGroupSpec", dict)}
    for i, group in enumerate(need(cluster, "workerGroupSpecs", list)):
        name = f"workerGroupSpecs[{i}]"
        need(group, "groupName", str)
        low, n, high = (need(group, key, int) for key in ("minReplicas", "replicas", "maxReplicas"))
        if not low <= n <= high:
            raise ValueError(f"{path}: {name} needs minReplicas <= replicas <= maxReplicas, got {low}, {n}, {high}")
        groups[name] = group
    for name, group in groups.items():
        need(group, "rayStartParams", dict)
        containers = need(group, "template.spec.containers", list)
        if not containers or not all(isinstance(c, dict) and c.get("image") for c in containers):
            raise ValueError(f"{path}: {name}.template.spec.containers need an image each")
    return manifest


_STARTED_HERE: set[str] = set()  # GCS addresses of the local clusters this process started (no autoscaler)


def join_cluster(rt: RuntimeConfig, cpus_needed: float) -> bool:
    """Join ``rt.address`` / $RAY_ADDRESS, else start a local cluster of ``rt.num_cpus`` CPUs (default: this
    machine's, at least ``cpus_needed``). True when a local cluster was started; nothing when Ray is up."""
    if ray.is_initialized():
        return False
    address = rt.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    num_cpus = rt.num_cpus or max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(QUIET_DATA_LOGS))  # the cluster's processes inherit it
    (port,) = free_ports(1)
    local_only = {
        # Ray Train's actors ask the State API (the dashboard) about their controller; with another local cluster
        # on the machine Ray's auto-detection finds two and they print tracebacks: name this one's dashboard
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        # Ray Train's preemption watcher (an actor per run polling node drains) has nothing to watch on one machine
        PREEMPTION_WATCHER: "0",
    }
    with environment(local_only):  # for the cluster's processes (they inherit it), not for later clusters
        # the dashboard: Tune's ASHA and Ray Train's placement group cleaner need it
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port)
    _STARTED_HERE.add(ray.get_runtime_context().gcs_address)
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports of 127.0.0.1, free now."""
    probes = [socket.socket() for _ in range(n)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """``os.environ`` with ``variables`` set (where the user has not set them) inside the block only."""
    added = {name: value for name, value in variables.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


HEAD_RESOURCE = "node:__internal_head__"  # every Ray head has one unit
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller (the driver's env)
QUIET_DATA_LOGS = Path(__file__).with_name("ray_data_logging.yaml")


@ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_retries=0)
def _head_autoscaling_config(gcs_address: str) -> Optional[dict]:
    """On the head: the config file its autoscaler (Ray's monitor.py for the cluster at ``gcs_address``) was
    started with, as the autoscaler reads it; None when it has none (a cluster without autoscaling, or KubeRay,
    whose autoscaler lives in its own container)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(arg.endswith("monitor.py") for arg in cmd) and f"--gcs-address={gcs_address}" in cmd:
            for arg in cmd:
                if arg.startswith("--autoscaling-config="):
                    return yaml.safe_load(Path(arg.split("=", 1)[1]).expanduser().read_text())
    return None


@functools.lru_cache(maxsize=4)
def autoscaling_node_types(gcs_address: str) -> Optional[tuple[tuple[tuple[dict, int], ...], int]]:
    """(((resources of one node, the most nodes of its type), ...), the most worker nodes in all) of the
    autoscaler of the cluster at ``gcs_address`` (the head listed first, as one node); None without an autoscaler,
    or when a node type leaves its resources to the cloud to fill in."""
    # outside any placement group of the caller: a Tune trial's captures child tasks, and no bundle has the head
    task = _head_autoscaling_config.options(scheduling_strategy=PlacementGroupSchedulingStrategy(None))
    config = ray.get(task.remote(gcs_address))
    if not config or not config.get("available_node_types"):
        return None
    types = config["available_node_types"]
    if not all("resources" in t for t in types.values()):
        return None
    head = config.get("head_node_type")
    workers = tuple((dict(t["resources"]), int(t.get("max_workers", 0))) for name, t in types.items() if name != head)
    most = int(config.get("max_workers", sum(count for _, count in workers)))
    return ((dict(types[head]["resources"]), 1), *workers), most


@dataclass
class Capacity:
    """What the cluster can hold: ``total`` resources and the ``shapes`` of its nodes (one dict per kind of node):
    its live nodes, or (``autoscaling``) every node its autoscaler's node types can start."""

    total: dict[str, float]
    shapes: list[dict[str, float]]
    autoscaling: bool

    def fits_one_node(self, bundle: dict[str, float]) -> bool:
        return any(all(shape.get(k, 0) + 1e-9 >= v for k, v in bundle.items() if v) for shape in self.shapes)


def cluster_capacity() -> Capacity:
    """The connected cluster's :class:`Capacity`."""
    gcs_address = ray.get_runtime_context().gcs_address
    found = None if gcs_address in _STARTED_HERE else autoscaling_node_types(gcs_address)
    if found is None:
        shapes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        return Capacity(dict(ray.cluster_resources()), shapes, autoscaling=False)
    types, most_nodes = found
    (head, _), *workers = types
    keys = {key for resources, _ in types for key in resources}
    total = {key: head.get(key, 0) + most_of(key, workers, most_nodes) for key in keys}
    return Capacity(total, [resources for resources, count in types if count], autoscaling=True)


def most_of(resource: str, node_types: list[tuple[dict, int]], most_nodes: int) -> float:
    """The most of ``resource`` that ``most_nodes`` worker nodes of ``node_types`` ((resources, the most nodes of
    that type), ...) hold: the richest types first."""
    total, left = 0.0, most_nodes
    for resources, count in sorted(node_types, key=lambda t: -t[0].get(resource, 0)):
        take = min(count, left)
        total, left = total + take * resources.get(resource, 0), left - take
    return total
