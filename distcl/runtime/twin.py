"""A local twin of a Ray cluster launcher config (cluster.yaml), to rehearse a cluster before paying for one:
Ray's own autoscaler, with its ``fake_multinode`` provider (distcl.runtime.twin_provider), starts the file's
node types as raylets on this machine (each with its type's resources), scales them from ``min_workers`` as runs
ask for them and removes idle ones after the idle timeout.

    twin = start_twin("cluster.yaml", idle_timeout_s=15, max_node_cpus=1)   # twin.address: for ray job submit
    preempt_node(node_id)                                                   # a spot reclaim: the node's processes
    stop_twin("distcl")                                                     # only the twin's own processes

Every process of a twin carries ``DISTCL_TWIN=<cluster name>`` in its environment (the head's processes, the
autoscaler and the nodes it starts, their workers), so ``stop_twin`` stops those and nothing else (``ray stop``
would stop every Ray on the machine); every process of a fake node carries its node id
(``RAY_OVERRIDE_NODE_ID_FOR_TESTING``), so a node can be killed alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil
import yaml
from ray.util import get_node_ip_address as node_ip_address

from distcl.data import cache_dir
from distcl.runtime.cluster import HEAD_RESOURCE, free_ports, validate_cluster_config
from distcl.settings import ConfigError, check_field

TWIN_ENV = "DISTCL_TWIN"
NODE_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # the fake provider gives each node's processes its node id
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's type
RAY_CLI = Path(sys.executable).parent / "ray"  # the project environment's
LAUNCHER_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def twin_config(
    cluster: dict,
    gcs_address: str,
    temp_dir: str,
    idle_timeout_s: float,
    max_node_cpus: Optional[float] = None,
    max_nodes_per_type: Optional[int] = None,
    keep_gpus: bool = False,
) -> dict:
    """The fake_multinode config of a cluster launcher config (as ``validate_cluster_config`` prepares it): its
    worker node types with their resources (custom ones too), ``min_workers`` and ``max_workers``, the cluster's
    ``max_workers`` and ``upscaling_speed``; the head type's resources on the twin's head; the idle timeout
    ``idle_timeout_s``; GPUs dropped unless ``keep_gpus``; each type's CPUs capped at ``max_node_cpus`` and its
    ``max_workers`` at ``max_nodes_per_type`` (a laptop holds fewer nodes than a cloud); the nodes' Ray temp
    directories under ``temp_dir``."""
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]

    def resources(node_type: dict) -> dict:
        res = dict(node_type.get("resources", {}))
        if not keep_gpus:
            res.pop("GPU", None)
        if max_node_cpus is not None and "CPU" in res:
            res["CPU"] = min(res["CPU"], max_node_cpus)
        return res

    def most(count: int) -> int:
        return count if max_nodes_per_type is None else min(count, max_nodes_per_type)

    workers = {
        name: {
            "resources": resources(t),
            "min_workers": most(t.get("min_workers", 0)),
            "max_workers": most(t["max_workers"]),
            "node_config": {},
        }
        for name, t in types.items()
        if name != head
    }
    total = sum(t["max_workers"] for t in workers.values())
    return {
        "cluster_name": cluster["cluster_name"],
        "max_workers": min(cluster.get("max_workers", total), total),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": "distcl.runtime.twin_provider.TwinNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
            "node_temp_dir": temp_dir,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0, **resources(types[head])}, "node_config": {}, "max_workers": 0},
            **workers,
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        **{key: [] for key in LAUNCHER_LISTS},
    }


@dataclass
class Twin:
    """A running twin: ``address`` for ``ray job submit --address``, ``gcs_address`` for ``RAY_ADDRESS``."""

    name: str
    gcs_address: str
    address: str
    worker_types: dict

    @staticmethod
    def state_file(name: str) -> Path:
        return cache_dir() / "twins" / name / "twin.json"

    @classmethod
    def load(cls, name: str) -> Optional["Twin"]:
        path = cls.state_file(name)
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def processes_with(key: str, value: str) -> list[psutil.Process]:
    """This user's processes whose environment has ``key=value``, and their descendants (Ray's workers and
    agents rename themselves, which overwrites the environment /proc shows, but they are a raylet's children)."""
    me = os.getuid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["uids"]):
        if proc.pid != os.getpid() and proc.info["uids"] and proc.info["uids"].real == me:
            if _environ(proc).get(key) == value:
                found[proc.pid] = proc
                try:
                    found.update({child.pid: child for child in proc.children(recursive=True)})
                except psutil.Error:
                    pass
    return list(found.values())


def _gone(proc: psutil.Process) -> bool:
    """Ended: no such process, or a zombie (a killed node's workers are orphans that nobody may reap here)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def kill(procs: list[psutil.Process], grace_s: float = 0.0, timeout_s: float = 10.0) -> int:
    """SIGTERM then, after ``grace_s``, SIGKILL (at once with 0: a reclaimed machine does not say goodbye); waits
    until they are gone (at most ``timeout_s``). The number of processes that were running and were signalled."""
    signalled = set()
    for signal, wait_s in (("terminate", grace_s), ("kill", timeout_s)) if grace_s else (("kill", timeout_s),):
        for p in procs:
            if not _gone(p):
                try:
                    getattr(p, signal)()
                    signalled.add(p.pid)
                except psutil.Error:
                    pass
        deadline = time.monotonic() + wait_s
        while not all(map(_gone, procs)) and time.monotonic() < deadline:
            time.sleep(0.05)
    return len(signalled)


def twin_temp_dir(name: str) -> str:
    """The twin's Ray temp directory: short (Ray's socket paths must fit 107 bytes), one per user and cluster."""
    return f"/tmp/distcl-twin-{os.getuid()}-{name}"


def start_twin(
    cluster_file: str | Path,
    idle_timeout_s: float = 15.0,
    max_node_cpus: Optional[float] = None,
    max_nodes_per_type: Optional[int] = None,
    keep_gpus: Optional[bool] = None,
    timeout_s: float = 120.0,
) -> Twin:
    """Start the twin of ``cluster_file`` (refused, naming it, when its twin runs already): its head with the head
    type's resources (cluster.yaml's: 0 CPUs) and the autoscaler. GPUs are kept when torch sees one here
    (``keep_gpus`` None) or when asked. A failed start leaves nothing behind."""
    for flag, value in (
        ("--idle-timeout-s", idle_timeout_s),
        ("--max-node-cpus", max_node_cpus),
        ("--max-nodes-per-type", max_nodes_per_type),
    ):
        check_field(value is None or value > 0, flag, f"{value} (allowed: > 0)")
    cluster_file = Path(cluster_file).resolve()
    cluster = read_cluster_file(cluster_file)
    name = cluster["cluster_name"]
    if processes_with(TWIN_ENV, name):
        raise ConfigError("cluster", f"the twin of {name!r} runs already (distcl cluster local --down {cluster_file})")
    if keep_gpus is None:
        import torch  # only here: the rest of the twin needs no torch

        keep_gpus = torch.cuda.is_available()
    gcs, dashboard, agent, client = free_ports(4)
    ip, temp_dir = node_ip_address(), twin_temp_dir(name)
    state = Twin.state_file(name).parent
    state.mkdir(parents=True, exist_ok=True)
    config = twin_config(cluster, f"{ip}:{gcs}", temp_dir, idle_timeout_s, max_node_cpus, max_nodes_per_type, keep_gpus)
    config_file = state / "twin.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    head = dict(config["available_node_types"][HEAD_TYPE]["resources"])
    # the project's environment first on PATH: a job's ``python`` is the one distcl is installed in;
    # the autoscaler's loop every second (Ray's default: 5 s), as ray.cluster_utils.AutoscalingCluster runs it
    env = {
        **os.environ,
        TWIN_ENV: name,
        "RAY_FAKE_CLUSTER": "1",
        "RAY_AUTH_MODE": "token",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PATH": f"{RAY_CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # ``ray start`` does not make the auth token that a local ``ray.init`` makes: a fresh machine has none yet
    subprocess.run([str(RAY_CLI), "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60, check=True)
    cmd = [
        str(RAY_CLI),
        "start",
        "--head",
        "--num-cpus",
        str(head.pop("CPU", 0)),
        "--num-gpus",
        str(head.pop("GPU", 0)),
        "--resources",
        json.dumps(head),
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--temp-dir",
        temp_dir,
        "--autoscaling-config",
        str(config_file),
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        failure = None if started.returncode == 0 else (started.stdout + started.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        failure = [f"no head within {timeout_s:g}s"]
    if failure is not None:  # nothing left behind: neither processes nor the config
        stop_twin(name)
        shutil.rmtree(state, ignore_errors=True)
        raise RuntimeError(f"ray start failed: {' / '.join(failure)}")
    twin = Twin(
        name=name,
        gcs_address=f"{ip}:{gcs}",
        address=f"http://127.0.0.1:{dashboard}",
        worker_types={k: v for k, v in config["available_node_types"].items() if k != HEAD_TYPE},
    )
    Twin.state_file(name).write_text(json.dumps(asdict(twin), indent=2))
    return twin


def stop_twin(name: str, grace_s: float = 5.0) -> int:
    """Stop every process of the twin ``name`` (nothing else), until none is left (the autoscaler may start a node
    meanwhile), and remove its state and temp dir; the number stopped."""
    stopped = 0
    for _ in range(5):
        procs = processes_with(TWIN_ENV, name)
        if not procs:
            break
        stopped += kill(procs, grace_s)
    shutil.rmtree(twin_temp_dir(name), ignore_errors=True)
    Twin.state_file(name).unlink(missing_ok=True)
    return stopped


def preempt_node(node_id: str) -> int:
    """Kill every process of one fake node at once (its raylet, its workers, its agents), as a cloud that takes a
    spot node back: the number killed."""
    return kill(processes_with(NODE_ENV, node_id))


def node_type_of(resources: dict, worker_types: dict) -> Optional[str]:
    """The node type whose resources a node has (memory and Ray's ``node:`` markers aside); ``HEAD_TYPE`` for the
    head; None for a node of no type."""
    if HEAD_RESOURCE in resources:
        return HEAD_TYPE
    own = {
        k: v for k, v in resources.items() if k not in ("memory", "object_store_memory") and not k.startswith("node:")
    }
    return next((name for name, t in worker_types.items() if t["resources"] == own), None)


def ray_state(address: str, kind: str, *filters: str) -> list[dict]:
    """Ray's state API (``ray list <kind> --detail``, every entry, alive or dead) of the cluster at ``address``,
    in a process of its own: a twin authenticates by token, and a process reads its auth mode when it imports
    Ray."""
    cmd = [
        str(RAY_CLI),
        "list",
        kind,
        "--address",
        address,
        "--detail",
        "--format",
        "json",
        "--limit",
        "10000",
        *[arg for f in filters for arg in ("--filter", f)],
    ]
    done = subprocess.run(
        cmd, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120
    )
    if done.returncode:
        raise RuntimeError(f"ray list {kind} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout) if done.stdout.strip() else []


def twin_nodes(name: str) -> dict[str, str]:
    """{node id: node type} of the twin's live worker nodes (from their processes' environments)."""
    nodes = {}
    for proc in processes_with(TWIN_ENV, name):
        env = _environ(proc)
        if NODE_ENV in env and "RAY_NODE_TYPE_NAME" in env:
            nodes[env[NODE_ENV]] = env["RAY_NODE_TYPE_NAME"]
    return nodes


def preempt(name: str, node_type: str) -> str:
    """Kill one live node of ``node_type`` of the twin ``name`` (as a spot reclaim); what was done. A node none
    of whose processes was still running raises (``distcl cluster local --preempt`` exits 1)."""
    twin = Twin.load(name)
    if twin is None or not processes_with(TWIN_ENV, name):
        raise ConfigError("--preempt", f"no twin of {name!r} runs (start one: distcl cluster local)")
    if node_type not in twin.worker_types:
        raise ConfigError("--preempt", f"{node_type!r} (allowed: {', '.join(twin.worker_types)})")
    nodes = twin_nodes(name)
    of_type = sorted(n for n, t in nodes.items() if t == node_type)
    if not of_type:
        up = ", ".join(sorted(set(nodes.values()))) or "none"
        raise ConfigError("--preempt", f"no {node_type!r} node of the twin {name!r} is up (node types up: {up})")
    killed = preempt_node(of_type[0])
    if killed == 0:  # it went between the look and the kill (the idle timeout): nothing was reclaimed
        raise RuntimeError(f"node {of_type[0]} ({node_type}) had no process left to kill: nothing reclaimed")
    return f"node {of_type[0]} ({node_type}) reclaimed: {killed} processes killed"


def read_cluster_file(cluster_file: str | Path) -> dict:
    """The cluster file as Ray prepares it (validate_cluster_config); a bad one is a ConfigError naming it."""
    try:
        return validate_cluster_config(cluster_file)
    except Exception as err:  # jsonschema's ValidationError, yaml's errors, OSError, ValueError: all bad input
        raise ConfigError("cluster", f"{cluster_file}: {str(err).splitlines()[0]}") from None


def describe(twin: Twin, cluster_file: str) -> str:
    """What a user needs next: the node types, where to submit, how to stop."""
    types = ", ".join(
        f"{name} ({t['min_workers']}-{t['max_workers']} x {t['resources']})" for name, t in twin.worker_types.items()
    )
    gpus = any("GPU" in t["resources"] for t in twin.worker_types.values())
    lines = [
        f"[distcl] twin of {twin.name!r} up: node types {types}",
        "[distcl] GPUs kept"
        if gpus
        else "[distcl] GPUs mapped to none: runs train on CPU (runtime.use_gpu=auto decides from the node types)",
        f"[distcl] submit: RAY_AUTH_MODE=token ray job submit --address {twin.address} --working-dir . -- "
        "python jobs/train_cl.py ...",
        f"[distcl] join:   RAY_AUTH_MODE=token RAY_ADDRESS={twin.gcs_address} distcl run ...",
        f"[distcl] spot reclaim: distcl cluster local --preempt <node type> {cluster_file}",
        f"[distcl] stop:   distcl cluster local --down {cluster_file}",
    ]
    return "\n".join(lines)
