"""The cluster: joining one (or starting a local one), and the offline check of a Ray cluster launcher config
(cluster.yaml): Ray 2.60 has no dry run, so this wraps its private ``prepare_config`` + ``validate_config`` (the
schema check ``ray up`` runs) in one place."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import ray
import yaml

from distcl.config import RuntimeConfig


def validate_cluster_config(path: str | Path) -> dict:
    """The prepared config (defaults filled in); raises jsonschema.ValidationError on a misspelled key or a bad
    node type, ValueError on a non-mapping."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # private API, only here

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config is a mapping")
    prepared = prepare_config(copy.deepcopy(config))
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
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)  # Tune's ASHA needs the dashboard
    return True
