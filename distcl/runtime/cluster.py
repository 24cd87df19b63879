"""Offline check of a Ray cluster launcher config (cluster.yaml): Ray 2.60 has no dry run, so this wraps its
private ``prepare_config`` + ``validate_config`` (the schema check ``ray up`` runs) in one place."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml


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
